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
  // Centers transposed to [set][d][K]: the distance loop then runs over K contiguous columns
  // with no reduction chain, which the compiler vectorises (the j-inner loop did not).
  std::vector<double> centers_t(center_elems);
  for (int64_t c = 0; c < sets; ++c)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < d; ++j) centers_t[(c * d + j) * K + k] = cp[(c * K + k) * d + j];
  // alpha = 1 (DEC's and the paper's choice): u_k = 1 / (1 + |z - mu_k|^2) needs no exp or log,
  // and KL(P||Q) = sum_k p_k log(p_k (1 + d_k)) + (sum_k p_k) log(sum_k u_k), one log per
  // entry instead of three transcendentals; the same value to rounding.
  const bool unit_alpha = alpha == 1.0;
  const int64_t stats = 2 + K * K + K * d + T + T * d;   // kl, sum W^2, W^T W, W^T Z, counts, group sums
  // 128 rows a chunk: a row costs about half a microsecond (K d distances, the K x K Gram
  // update, logs), so DFC's batch of 256 is two chunks, worth waking a second thread for.
  const ChunkPlan plan = plan_chunks(B, stats + center_elems, kRowsPerChunk);
  std::vector<double> partial(plan.num_chunks * stats, 0.0);
  std::vector<GroupErrors> errors(plan.num_chunks);
  parallel_chunks(plan, [&](int64_t chunk) {
    double* __restrict s = partial.data() + chunk * stats;
    double* __restrict wtw = s + 2;
    double* __restrict wtz = wtw + K * K;
    double* __restrict counts = wtz + K * d;
    double* __restrict sums = counts + T;
    double kl_sum = 0.0, w_squares = 0.0;
    for (int64_t i = plan.begin(chunk); i < plan.end(chunk, B); ++i) {
      const int64_t g = gp[i];
      if (errors[chunk].out_of_range(g, T)) continue;
      const double* __restrict zi = zp + i * d;
      const double* __restrict ct = centers_t.data() + (per_group ? g * K * d : 0);
      const double* __restrict pi_row = pp + i * K;
      double* __restrict qi = q + i * K;
      double* __restrict di = dist.data() + i * K;
      for (int64_t k = 0; k < K; ++k) di[k] = 0.0;
      for (int64_t j = 0; j < d; ++j) {
        const double zj = zi[j];
        const double* __restrict column = ct + j * K;
        for (int64_t k = 0; k < K; ++k) {
          const double v = zj - column[k];
          di[k] += v * v;
        }
      }
      double kl, mass = 0.0;
      if (unit_alpha) {
        double total = 0.0, p_log = 0.0;
        for (int64_t k = 0; k < K; ++k) total += (qi[k] = 1.0 / (1.0 + di[k]));
        const double inv_total = 1.0 / total;
        for (int64_t k = 0; k < K; ++k) {
          const double p = pi_row[k];
          mass += p;
          if (p > 0.0) p_log += p * std::log(std::max(p, kLogEps) * (1.0 + di[k]));
          else if (p < 0.0) p_log += p * std::log1p(di[k]);
          qi[k] *= inv_total;
        }
        kl = p_log + mass * std::log(total);
      } else {
        double row_max = -std::numeric_limits<double>::infinity();
        for (int64_t k = 0; k < K; ++k) {
          qi[k] = exponent * std::log(1.0 + di[k] / alpha);   // log, not log1p: 2x faster, same to ~1e-16 absolute
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
        for (int64_t k = 0; k < K; ++k) qi[k] *= inv_total;
        kl = p_log_p - p_s + mass * std::log(total);
      }
      row_mass[i] = mass;
      kl_sum += kl;
      counts[g] += 1.0;
      for (int64_t j = 0; j < d; ++j) sums[g * d + j] += zi[j];
      if (!fair) continue;
      // Not __restrict: with weights_from_q it is qi, written above through another pointer.
      const double* wi = weights_from_q ? qi : pi_row;
      for (int64_t a = 0; a < K; ++a) {
        const double wa = wi[a];
        w_squares += wa * wa;
        double* __restrict gram_row = wtw + a * K;
        for (int64_t b = 0; b < K; ++b) gram_row[b] += wa * wi[b];
        double* __restrict moment_row = wtz + a * d;
        for (int64_t j = 0; j < d; ++j) moment_row[j] += wa * zi[j];
      }
    }
    s[0] = kl_sum;
    s[1] = w_squares;
  });
  raise_group_errors(errors, T);
  std::vector<double> total(stats);
  reduce_chunks(partial, plan.num_chunks, stats, total.data());
  const double kl = total[0] / static_cast<double>(B);

  // ---- the fairness term (serial, O(K^3 + K T d)): forward and the small part of its backward.
  std::vector<double> Y(K * d, 0.0), d_pi(T * d, 0.0), sym(K * K, 0.0), inv_counts(T, 0.0), pi(T * d, 0.0);
  double fair_value = 0.0, trace_term = 0.0;
  {
    const double* counts = total.data() + 2 + K * K + K * d;
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
      std::vector<double> A(total.begin() + 2, total.begin() + 2 + K * K);
      for (int64_t k = 0; k < K; ++k) A[k * K + k] += lam;
      std::vector<double> M(total.begin() + 2 + K * K, total.begin() + 2 + K * K + K * d);
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

  // ---- pass 2 over the rows: dL/ds (KL, and the fairness term through W = Q), then the
  // Student-t backward to z and the centers.
  std::vector<double> grad_z(B * d);
  double* gz = grad_z.data();
  std::vector<double> grad_c_partial(plan.num_chunks * center_elems, 0.0);
  const double inv_b = 1.0 / static_cast<double>(B);
  std::vector<double> Y_t(fair && weights_from_q ? d * K : 0);   // Y transposed, for the weights_from_q gradient
  if (!Y_t.empty())
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < d; ++j) Y_t[j * K + k] = Y[k * d + j];
  // Loops run over contiguous j (or a) with the sums in the order of the reference formulas.
  parallel_chunks(plan, [&](int64_t chunk) {
    double* __restrict gc = grad_c_partial.data() + chunk * center_elems;
    std::vector<double> ds(K), gw(K);
    for (int64_t i = plan.begin(chunk); i < plan.end(chunk, B); ++i) {
      const int64_t g = gp[i];
      const double* __restrict zi = zp + i * d;
      const double* __restrict ci = cp + (per_group ? g * K * d : 0);
      double* __restrict gci = gc + (per_group ? g * K * d : 0);
      const double* __restrict qi = q + i * K;
      const double* __restrict pi_row = pp + i * K;
      const double* __restrict di = dist.data() + i * K;
      double* __restrict gzi = gz + i * d;
      for (int64_t k = 0; k < K; ++k) ds[k] = (qi[k] * row_mass[i] - pi_row[k]) * inv_b;
      if (fair) {
        const double* __restrict wi = weights_from_q ? qi : pi_row;
        for (int64_t j = 0; j < d; ++j) gzi[j] = d_pi[g * d + j] * inv_counts[g];   // dL/dpi_{g_i} / n_{g_i}
        for (int64_t k = 0; k < K; ++k) {                                          // + W_i Y
          const double wk = wi[k];
          const double* __restrict y_row = Y.data() + k * d;
          for (int64_t j = 0; j < d; ++j) gzi[j] += wk * y_row[j];
        }
        if (weights_from_q) {
          for (int64_t a = 0; a < K; ++a) gw[a] = trace_term * wi[a];
          for (int64_t b = 0; b < K; ++b) {
            const double wb = wi[b];
            const double* __restrict sym_row = sym.data() + b * K;
            for (int64_t a = 0; a < K; ++a) gw[a] += wb * sym_row[a];
          }
          for (int64_t j = 0; j < d; ++j) {
            const double zj = zi[j];
            const double* __restrict y_column = Y_t.data() + j * K;
            for (int64_t a = 0; a < K; ++a) gw[a] += zj * y_column[a];
          }
          double weighted = 0.0;
          for (int64_t a = 0; a < K; ++a) weighted += qi[a] * gw[a];
          for (int64_t k = 0; k < K; ++k) ds[k] += qi[k] * (gw[k] - weighted);
        }
      } else {
        for (int64_t j = 0; j < d; ++j) gzi[j] = 0.0;
      }
      for (int64_t k = 0; k < K; ++k) {
        const double coef = 2.0 * ds[k] * exponent / (alpha + di[k]);
        const double* __restrict ck = ci + k * d;
        double* __restrict gck = gci + k * d;
        for (int64_t j = 0; j < d; ++j) {
          const double v = coef * (zi[j] - ck[j]);
          gzi[j] += v;
          gck[j] -= v;
        }
      }
    }
  });
  std::vector<double> grad_c(center_elems);
  reduce_chunks(grad_c_partial, plan.num_chunks, center_elems, grad_c.data());

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
