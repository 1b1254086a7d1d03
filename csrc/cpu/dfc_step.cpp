// The whole DFC clustering loss of a batch, from the embeddings (SPEC 1.1 + 4): Student-t
// assignments Q to shared [K, d] or per-group [T, K, d] centroids, KL(P || Q), and
// gamma * KL(Psi || Phi) with the eq. 12 ridge centroids and the fairoids, value and both
// gradients in one call.
//
// Why one kernel: at DFC's batch of 256 rows and K = 10 the arithmetic is a few hundred
// microseconds of flops at most, but the composition of tensor ops (Student-t, KL, the
// fairoid term's Cholesky and closed-form backward) is about 60 dispatches forward and
// backward, more time than a narrow encoder's own step (README, Training speed). Everything is
// computed in float64 (the inputs are converted once), row passes are cut into the fixed chunks
// of ChunkPlan (deterministic at any thread count), and the O(K^3 + K T d) middle is serial.
// The two row passes (dfc_rows_forward, dfc_rows_backward) are compiled for AVX2 + FMA and for
// the baseline ISA, and keep their running sums in Vec4 registers: with per-feature sums that
// went through memory (a store and a reload per centroid) the call took 125-150 us at B = 256,
// K = d = 10 on one thread, and 60-76 us with them (2-core AMD EPYC VM).
// The math and the backward are those of fairkernels/ops/fairoid.py (docs/math.md §4 and §8).
#include "kernels.h"

#include <limits>

#include "common.h"

namespace fairkernels::cpu {
namespace {

constexpr double kLogEps = 1e-12;     // reference.LOG_EPS
constexpr double kPhiEps = 1e-12;     // reference.fairoid_target's eps
constexpr int64_t kRowsPerChunk = 128;

inline double log_clamped(double x) { return std::log(std::max(x, kLogEps)); }

// Distances are accumulated kLanes centroids at a time, in two Vec4 registers across the d-loop
// (a K-long accumulator went through memory once per feature).
constexpr int64_t kLanes = 8;

inline int64_t padded(int64_t k) { return (k + kLanes - 1) / kLanes * kLanes; }

// What both row passes read. Arrays are row-major; centers_t is the centers transposed to
// [set][d][padded(K)] with zero padding (the lanes past K are computed and dropped).
struct StepRows {
  const double* z;          // [B, d]
  const double* centers_t;  // [sets, d, padded(K)]
  const double* target;     // [B, K]
  const int64_t* groups;    // [B]
  double* q;                // [B, K]   written by pass 1
  double* dist;             // [B, K]   written by pass 1
  double* row_mass;         // [B]      written by pass 1
  int64_t K, d, T;
  bool per_group, fair, weights_from_q, unit_alpha;
  double alpha, exponent;
};

// Pass 1 over rows [begin, end): distances, Q, the KL, and into s the chunk's sums
// [kl, sum W^2, W^T [W | Z] (K x (K + d)), counts (T), group sums (T x d)].
// Compiled for AVX2 + FMA and the baseline ISA (FAIRKERNELS_MULTIVERSION): the Gram and moment
// updates are the bulk of the arithmetic, 2 doubles wide at baseline and 4 with FMA here.
FAIRKERNELS_MULTIVERSION void dfc_rows_forward(const StepRows& a, int64_t begin, int64_t end, double* s,
                                              GroupErrors& errors) {
  const int64_t K = a.K, d = a.d, T = a.T, Kp = padded(K), width = K + d;
  double* __restrict gram = s + 2;                   // [K][K + d]
  double* __restrict counts = gram + K * width;
  double* __restrict sums = counts + T;
  std::vector<double> wz(width);                     // this row's [w | z], contiguous
  double kl_sum = 0.0, w_squares = 0.0;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t g = a.groups[i];
    if (errors.out_of_range(g, T)) continue;
    const double* __restrict zi = a.z + i * d;
    const double* __restrict ct = a.centers_t + (a.per_group ? g * d * Kp : 0);
    const double* __restrict pi_row = a.target + i * K;
    double* __restrict qi = a.q + i * K;
    double* __restrict di = a.dist + i * K;
    for (int64_t k0 = 0; k0 < K; k0 += kLanes) {
      Vec4 low = splat4(0.0), high = splat4(0.0);
      for (int64_t j = 0; j < d; ++j) {
        const Vec4 zj = splat4(zi[j]);
        const double* column = ct + j * Kp + k0;
        const Vec4 v0 = zj - load4(column), v1 = zj - load4(column + 4);
        low += v0 * v0;
        high += v1 * v1;
      }
      double acc[kLanes];
      store4(acc, low);
      store4(acc + 4, high);
      const int64_t lanes = std::min(kLanes, K - k0);
      for (int64_t l = 0; l < lanes; ++l) di[k0 + l] = acc[l];
    }
    double kl, mass = 0.0;
    if (a.unit_alpha) {
      // alpha = 1 (DEC's and the paper's choice): u_k = 1 / (1 + |z - mu_k|^2) needs no exp or
      // log, and KL(P||Q) = sum_k p_k log(p_k (1 + d_k)) + (sum_k p_k) log(sum_k u_k), one log
      // per entry instead of three transcendentals; the same value to rounding.
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) qi[k] = 1.0 / (1.0 + di[k]);
      double total = 0.0, p_log = 0.0;
      for (int64_t k = 0; k < K; ++k) total += qi[k];
      const double inv_total = 1.0 / total;
      for (int64_t k = 0; k < K; ++k) {
        const double p = pi_row[k];
        mass += p;
        if (p > 0.0) p_log += p * std::log(std::max(p, kLogEps) * (1.0 + di[k]));
        else if (p < 0.0) p_log += p * std::log1p(di[k]);
      }
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) qi[k] *= inv_total;
      kl = p_log + mass * std::log(total);
    } else {
      double row_max = -std::numeric_limits<double>::infinity();
      for (int64_t k = 0; k < K; ++k) {
        qi[k] = a.exponent * std::log(1.0 + di[k] / a.alpha);   // log, not log1p: 2x faster, same to ~1e-16 absolute
        row_max = std::max(row_max, qi[k]);
      }
      // log q_k = s_k - lse exactly; the KL's clamp of q at LOG_EPS (reference.kl_div) only
      // matters below q = 1e-12, which the heavy-tailed kernel does not reach on finite input.
      double total = 0.0, p_log_p = 0.0, p_s = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        const double p = pi_row[k];
        mass += p;
        p_s += p * (qi[k] - row_max);
        if (p > 0.0) p_log_p += p * log_clamped(p);
        total += (qi[k] = std::exp(qi[k] - row_max));
      }
      const double inv_total = 1.0 / total;
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) qi[k] *= inv_total;
      kl = p_log_p - p_s + mass * std::log(total);
    }
    a.row_mass[i] = mass;
    kl_sum += kl;
    counts[g] += 1.0;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) sums[g * d + j] += zi[j];
    if (!a.fair) continue;
    const double* wi = a.weights_from_q ? qi : pi_row;
    for (int64_t k = 0; k < K; ++k) wz[k] = wi[k];
    for (int64_t j = 0; j < d; ++j) wz[K + j] = zi[j];
    const double* __restrict row = wz.data();
    for (int64_t k = 0; k < K; ++k) {
      const double wk = row[k];
      w_squares += wk * wk;
      double* __restrict gram_row = gram + k * width;
#pragma omp simd
      for (int64_t c = 0; c < width; ++c) gram_row[c] += wk * row[c];
    }
  }
  s[0] += kl_sum;
  s[1] += w_squares;
}

// What pass 2 reads besides StepRows: the fairness term's pieces of the backward, and the rows
// it writes. The *_pad arrays hold rows of dp = padded4(d) doubles (zero padding), so the
// feature loop runs in whole Vec4 blocks that stay in registers across the K centroids.
struct StepGrads {
  int64_t dp;
  const double* z_pad;        // [B, dp]
  const double* centers_pad;  // [sets, K, dp]
  const double* pi_grad_pad;  // [T, dp] dL/dpi_t / n_t (fair)
  const double* Y_pad;        // [K, dp] A^-1 dL/dM (fair)
  const double* Y_t;          // [d, K] (weights_from_q)
  const double* sym;          // [K, K] (weights_from_q)
  double trace_term;          // (weights_from_q)
  double inv_b;
};

inline int64_t padded4(int64_t n) { return (n + 3) / 4 * 4; }

// Pass 2 over rows [begin, end): dL/ds (KL, and the fairness term through W = Q), then the
// Student-t backward: grad_z rows written to gz [B, dp], the chunk's grad_centers accumulated
// into gc [sets, K, dp]. Each feature's sum runs in the reference formulas' order (dL/dpi term,
// W_i Y over k, then the Student-t terms over k).
FAIRKERNELS_MULTIVERSION void dfc_rows_backward(const StepRows& a, const StepGrads& b, int64_t begin, int64_t end,
                                               double* gz, double* gc) {
  const int64_t K = a.K, d = a.d, dp = b.dp;
  std::vector<double> ds(K), gw(K), coef(K);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t g = a.groups[i];
    const double* __restrict zi = a.z + i * d;
    const double* __restrict z_row = b.z_pad + i * dp;
    const double* __restrict ci = b.centers_pad + (a.per_group ? g * K * dp : 0);
    double* __restrict gci = gc + (a.per_group ? g * K * dp : 0);
    const double* __restrict qi = a.q + i * K;
    const double* __restrict pi_row = a.target + i * K;
    const double* __restrict di = a.dist + i * K;
    double* __restrict gzi = gz + i * dp;
    const double mass = a.row_mass[i];
    const double* __restrict wi = a.weights_from_q ? qi : pi_row;
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) ds[k] = (qi[k] * mass - pi_row[k]) * b.inv_b;
    if (a.fair && a.weights_from_q) {
#pragma omp simd
      for (int64_t c = 0; c < K; ++c) gw[c] = b.trace_term * wi[c];
      for (int64_t r = 0; r < K; ++r) {
        const double wr = wi[r];
        const double* __restrict sym_row = b.sym + r * K;
#pragma omp simd
        for (int64_t c = 0; c < K; ++c) gw[c] += wr * sym_row[c];
      }
      for (int64_t j = 0; j < d; ++j) {
        const double zj = zi[j];
        const double* __restrict y_column = b.Y_t + j * K;
#pragma omp simd
        for (int64_t c = 0; c < K; ++c) gw[c] += zj * y_column[c];
      }
      double weighted = 0.0;
      for (int64_t c = 0; c < K; ++c) weighted += qi[c] * gw[c];
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) ds[k] += qi[k] * (gw[k] - weighted);
    }
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) coef[k] = 2.0 * ds[k] * a.exponent / (a.alpha + di[k]);
    for (int64_t j0 = 0; j0 < dp; j0 += 4) {
      Vec4 acc = splat4(0.0);
      if (a.fair) {
        acc = load4(b.pi_grad_pad + g * dp + j0);                        // dL/dpi_{g_i} / n_{g_i}
        for (int64_t k = 0; k < K; ++k) acc += splat4(wi[k]) * load4(b.Y_pad + k * dp + j0);   // + W_i Y
      }
      const Vec4 zj = load4(z_row + j0);
      for (int64_t k = 0; k < K; ++k) {
        const Vec4 v = splat4(coef[k]) * (zj - load4(ci + k * dp + j0));
        acc += v;
        double* gck = gci + k * dp + j0;
        store4(gck, load4(gck) - v);
      }
      store4(gzi + j0, acc);
    }
  }
}

}  // namespace

DFCStepOutputs dfc_step(
    const at::Tensor& z_in, const at::Tensor& centers_in, const at::Tensor& groups_in, const at::Tensor& target_in,
    const std::optional<at::Tensor>& previous_in, int64_t num_groups, double alpha, double beta, double gamma,
    double ridge, bool weights_from_q) {
  check_matrix(z_in, "z");
  check_matrix(target_in, "target");
  TORCH_CHECK(centers_in.dim() == 2 || centers_in.dim() == 3, "centers must be [K, d] or [T, K, d], got ",
              centers_in.dim(), "-D");
  TORCH_CHECK(centers_in.scalar_type() == at::kFloat || centers_in.scalar_type() == at::kDouble,
              "centers must be float32 or float64 for the cpu backend");
  TORCH_CHECK(centers_in.device().is_cpu(), "centers must be a CPU tensor");
  const int64_t B = z_in.size(0), d = z_in.size(1);
  const bool per_group = centers_in.dim() == 3;
  const int64_t K = centers_in.size(per_group ? 1 : 0), T = num_groups;
  TORCH_CHECK(num_groups >= 1, "num_groups must be >= 1");
  TORCH_CHECK(centers_in.size(-1) == d, "centers have ", centers_in.size(-1), " columns but z has ", d);
  TORCH_CHECK(!per_group || centers_in.size(0) == T, "per-group centers must have num_groups=", T, " rows, got ",
              centers_in.size(0));
  TORCH_CHECK(target_in.size(0) == B && target_in.size(1) == K, "target must be [", B, ", ", K, "]");
  check_groups(groups_in, B);
  if (previous_in.has_value())
    TORCH_CHECK(previous_in->dim() == 2 && previous_in->size(0) == T && previous_in->size(1) == d,
                "previous must be [", T, ", ", d, "]");

  // Inputs read as float64 and outputs written in their dtypes without Tensor::to (DoubleValues).
  const DoubleValues z(z_in), centers(centers_in), target(target_in);
  const at::Tensor groups = long_groups(groups_in);
  const double* zp = z.data();
  const double* cp = centers.data();
  const double* pp = target.data();
  const int64_t* gp = groups.data_ptr<int64_t>();
  const bool fair = gamma != 0.0;
  const double exponent = -(alpha + 1.0) / 2.0;

  // ---- pass 1 over the rows: distances, Q, the KL and the sums the fairness term needs.
  std::vector<double> dist(B * K), row_mass(B), q_values(B * K);
  double* q = q_values.data();
  const int64_t sets = per_group ? T : 1;
  const int64_t center_elems = sets * K * d;
  const int64_t Kp = padded(K);
  // Centers transposed to [set][d][padded K]: the distance loop then runs over contiguous
  // centroids with no reduction chain, which the compiler vectorises (the j-inner loop did not).
  std::vector<double> centers_t(sets * d * Kp, 0.0);
  for (int64_t c = 0; c < sets; ++c)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < d; ++j) centers_t[(c * d + j) * Kp + k] = cp[(c * K + k) * d + j];
  const StepRows rows{zp, centers_t.data(), pp, gp, q, dist.data(), row_mass.data(), K, d, T, per_group, fair,
                      weights_from_q, alpha == 1.0, alpha, exponent};
  const int64_t width = K + d;
  const int64_t stats = 2 + K * width + T + T * d;   // kl, sum W^2, W^T [W | Z], counts, group sums
  // 128 rows a chunk: a row costs a few hundred nanoseconds (K d distances, the K x (K + d)
  // Gram and moment update, K logs), so DFC's batch of 256 is two chunks, one per thread.
  const ChunkPlan plan = plan_chunks(B, stats + center_elems, kRowsPerChunk);
  std::vector<double> partial(plan.num_chunks * stats, 0.0);
  std::vector<GroupErrors> errors(plan.num_chunks);
  parallel_chunks(plan, [&](int64_t chunk) {
    dfc_rows_forward(rows, plan.begin(chunk), plan.end(chunk, B), partial.data() + chunk * stats, errors[chunk]);
  });
  raise_group_errors(errors, T);
  std::vector<double> total(stats);
  reduce_chunks(partial, plan.num_chunks, stats, total.data());
  const double kl = total[0] / static_cast<double>(B);

  // ---- the fairness term (serial, O(K^3 + K T d)): forward and the small part of its backward.
  std::vector<double> Y(K * d, 0.0), d_pi(T * d, 0.0), sym(K * K, 0.0), inv_counts(T, 0.0), pi(T * d, 0.0);
  double fair_value = 0.0, trace_term = 0.0;
  {
    const double* counts = total.data() + 2 + K * width;
    const double* sums = counts + T;
    std::vector<bool> present(T);
    std::optional<DoubleValues> previous;
    if (previous_in.has_value()) previous.emplace(*previous_in);
    const double* prev = previous ? previous->data() : nullptr;
    for (int64_t t = 0; t < T; ++t) {
      present[t] = counts[t] > 0.0;
      inv_counts[t] = present[t] ? 1.0 / counts[t] : 0.0;
      for (int64_t j = 0; j < d; ++j)
        pi[t * d + j] = present[t] ? sums[t * d + j] * inv_counts[t] : (prev ? prev[t * d + j] : 0.0);
    }
    if (fair) {
      const double lam = ridge * std::max(total[1], kLogEps) / static_cast<double>(K);
      std::vector<double> A(K * K), M(K * d);       // W^T W + lam I and W^T Z, from the [K][K + d] block
      for (int64_t k = 0; k < K; ++k) {
        const double* gram_row = total.data() + 2 + k * width;
        std::copy(gram_row, gram_row + K, A.begin() + k * K);
        std::copy(gram_row + K, gram_row + width, M.begin() + k * d);
        A[k * K + k] += lam;
      }
      const bool factored = cholesky_lower(A, K);
      if (factored) cholesky_solve(A, K, M, d);
      std::vector<double> D(K * T), phi(K * T, 0.0), psi(K * T, 0.0), f_group(T, 0.0);
      for (int64_t k = 0; k < K; ++k) {
        double row_max = -std::numeric_limits<double>::infinity();
        for (int64_t t = 0; t < T; ++t) {
          double sq = 0.0;
          for (int64_t j = 0; j < d; ++j) {
            const double v = M[k * d + j] - pi[t * d + j];
            sq += v * v;
          }
          D[k * T + t] = sq;
          if (present[t]) {
            phi[k * T + t] = exponent * std::log1p(sq / alpha);
            row_max = std::max(row_max, phi[k * T + t]);
          }
        }
        double row_total = 0.0;
        for (int64_t t = 0; t < T; ++t)
          if (present[t]) row_total += (phi[k * T + t] = std::exp(phi[k * T + t] - row_max));
        for (int64_t t = 0; t < T; ++t) {
          phi[k * T + t] = present[t] ? phi[k * T + t] / row_total : 0.0;
          f_group[t] += phi[k * T + t];
        }
      }
      for (int64_t k = 0; k < K; ++k) {       // Psi, the smoothed target (reference.fairoid_target)
        double row_total = 0.0;
        for (int64_t t = 0; t < T; ++t) {
          const double w = present[t] ? std::pow(phi[k * T + t] + kPhiEps, 1.0 / beta) /
                                            std::max(f_group[t], kLogEps) : 0.0;
          psi[k * T + t] = w;
          row_total += w;
        }
        for (int64_t t = 0; t < T; ++t) {
          double& v = psi[k * T + t];
          v /= std::max(row_total, kLogEps);
          fair_value += (v > 0.0 ? v * log_clamped(v) : 0.0) - v * log_clamped(phi[k * T + t]);
        }
      }
      fair_value /= static_cast<double>(K);
      // Backward of gamma * L_fr down to M and pi (ops/fairoid.py), then Y = A^-1 dL/dM.
      std::vector<double> d_dist(K * T);
      for (int64_t k = 0; k < K; ++k)
        for (int64_t t = 0; t < T; ++t)
          d_dist[k * T + t] = (phi[k * T + t] - psi[k * T + t]) * (gamma / K) * exponent / (alpha + D[k * T + t]);
      for (int64_t k = 0; k < K; ++k)
        for (int64_t t = 0; t < T; ++t)
          for (int64_t j = 0; j < d; ++j) {
            const double diff = M[k * d + j] - pi[t * d + j];
            Y[k * d + j] += 2.0 * d_dist[k * T + t] * diff;
            d_pi[t * d + j] -= 2.0 * d_dist[k * T + t] * diff;
          }
      if (factored) {
        cholesky_solve(A, K, Y, d);
      } else {
        const double nan = std::numeric_limits<double>::quiet_NaN();
        std::fill(Y.begin(), Y.end(), nan);
        fair_value = nan;
      }
      if (weights_from_q) {                    // dA = -Y M^T; dL/dW = W (dA + dA^T) + Z Y^T + 2 ridge tr(dA) / K W
        for (int64_t a = 0; a < K; ++a)
          for (int64_t b = 0; b < K; ++b) {
            double ya_mb = 0.0, yb_ma = 0.0;
            for (int64_t j = 0; j < d; ++j) {
              ya_mb += Y[a * d + j] * M[b * d + j];
              yb_ma += Y[b * d + j] * M[a * d + j];
            }
            sym[a * K + b] = -(ya_mb + yb_ma);
            if (a == b) trace_term -= ya_mb;
          }
        trace_term *= 2.0 * ridge / static_cast<double>(K);
      }
    }
  }

  // ---- pass 2 over the rows: the backward (dfc_rows_backward), on copies padded to dp features.
  const int64_t dp = padded4(d);
  auto pad_rows = [&](const double* source, int64_t rows, std::vector<double>& out) {
    out.assign(rows * dp, 0.0);
    for (int64_t r = 0; r < rows; ++r) std::copy(source + r * d, source + (r + 1) * d, out.begin() + r * dp);
  };
  std::vector<double> z_pad, centers_pad, pi_grad_pad, Y_pad;
  pad_rows(zp, B, z_pad);
  pad_rows(cp, sets * K, centers_pad);
  if (fair) {
    pad_rows(Y.data(), K, Y_pad);
    pi_grad_pad.assign(T * dp, 0.0);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < d; ++j) pi_grad_pad[t * dp + j] = d_pi[t * d + j] * inv_counts[t];
  }
  std::vector<double> grad_z_pad(B * dp);
  const int64_t padded_centers = sets * K * dp;
  std::vector<double> grad_c_partial(plan.num_chunks * padded_centers, 0.0);
  std::vector<double> Y_t(fair && weights_from_q ? d * K : 0);   // Y transposed, for the weights_from_q gradient
  if (!Y_t.empty())
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < d; ++j) Y_t[j * K + k] = Y[k * d + j];
  const StepGrads grads{dp, z_pad.data(), centers_pad.data(), pi_grad_pad.data(), Y_pad.data(), Y_t.data(),
                        sym.data(), trace_term, 1.0 / static_cast<double>(B)};
  parallel_chunks(plan, [&](int64_t chunk) {
    dfc_rows_backward(rows, grads, plan.begin(chunk), plan.end(chunk, B), grad_z_pad.data(),
                      grad_c_partial.data() + chunk * padded_centers);
  });
  std::vector<double> grad_c_pad(padded_centers);
  reduce_chunks(grad_c_partial, plan.num_chunks, padded_centers, grad_c_pad.data());
  std::vector<double> grad_z(B * d), grad_c(center_elems);
  auto unpad_rows = [&](const std::vector<double>& source, int64_t rows, std::vector<double>& out) {
    for (int64_t r = 0; r < rows; ++r)
      std::copy(source.begin() + r * dp, source.begin() + r * dp + d, out.begin() + r * d);
  };
  unpad_rows(grad_z_pad, B, grad_z);
  unpad_rows(grad_c_pad, sets * K, grad_c);
  double* gz = grad_z.data();

  // loss = l_cl + gamma * l_fr is summed here in float64, then each is rounded to z's dtype.
  const auto options = z_in.options();
  const double fair_term = fair ? fair_value : 0.0;
  const double loss = fair ? kl + gamma * fair_term : kl;
  return {tensor_from_doubles(&loss, {}, options), tensor_from_doubles(&kl, {}, options),
          tensor_from_doubles(&fair_term, {}, options), tensor_from_doubles(q, {B, K}, options),
          tensor_from_doubles(pi.data(), {T, d}, options), tensor_from_doubles(gz, {B, d}, options),
          tensor_from_doubles(grad_c.data(), centers_in.sizes(), centers_in.options())};
}

}  // namespace fairkernels::cpu
