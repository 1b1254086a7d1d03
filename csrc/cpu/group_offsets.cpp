// Per-(group, cluster) logit offsets that balance every group's mean soft assignment to the
// whole set's (docs/math.md §8, fairkernels.train.matched_centers.group_offsets): the root b_t
// of log q_t(b_t) = log p, the fixed point of the Sinkhorn step b_t <- b_t + log p - log q_t.
//
// Why a kernel: the DFC trainer balances every batch's DEC target with it on large sets, and
// in tensor ops each Sinkhorn iteration is a softmax, a gather and a grouped sum, about 1 ms per
// batch of 256 rows (more than a narrow encoder's step). Here softmax(L_i + b_g) is factorised
// as E_ik w_gk / sum_k' E_ik' w_gk', with E_ik = exp(L_ik - max_k L_ik) computed once and
// w_gk = exp(b_gk - max_k b_gk) per pass, so a pass costs B x K multiplies and T x K exps.
// Why Newton: the Sinkhorn step converges linearly (about 0.85 a step on DFC's batches, 40-60
// steps to 1e-6, 0.3-0.6 ms of every matched DFC step); Newton steps, with a line search and a
// Sinkhorn step where they fail, take 4-7 passes there (about 0.1 ms). Same steps and stopping rule as
// the tensor-op loop (fairkernels/ops/torch_kernels.py), so the offsets agree with it to
// float64 rounding. dec_batch_target builds the DFC trainer's per-batch DEC target with it
// (fairkernels/train/dfc.py, batch_target).
#include "kernels.h"

#include <array>
#include <limits>

#include "common.h"

namespace fairkernels::cpu {
namespace {

constexpr double kLogFloor = -80.0;   // the Python loop's clamp_min(-80)
constexpr double kLogEps = 1e-12;     // reference.LOG_EPS
constexpr double kMaxStep = 50.0;     // a Newton step moves no offset further (its merit test follows)

// The rows' weights E_ik (exp(L_ik) up to a positive factor per row) with every row zero-padded
// to Kp = K rounded up to 4 columns, and the buffers of group_shares, made once per balancing:
// a pass then runs 4 clusters at a time with no remainder loop, and allocates nothing.
struct ShareRows {
  int64_t K, Kp, T;
  std::vector<double> E;      // [B, Kp]
  std::vector<double> w;      // [T, Kp] exp(b_gk - max_k b_gk), zero past K
  std::vector<double> sums;   // [T, Kp]
  std::vector<double> outer;  // [T, K, Kp] lower triangle used (and a few entries past it)
  std::vector<double> s;      // [Kp] one row's soft assignment
  ShareRows(int64_t B, int64_t K_, int64_t T_)
      : K(K_), Kp((K_ + 3) / 4 * 4), T(T_), E(B * Kp, 0.0), w(T * Kp, 0.0), sums(T * Kp), outer(T * K * Kp),
        s(Kp, 0.0) {}
};

// Per-group sums of the soft assignments s_i = softmax(L_i + b_{g_i}) (sums [T, K]) and of their
// outer products s_i s_i^T (outer [T, K, K], the lower triangle), from the factorised form
// E_ik w_gk / sum_k' E_ik' w_gk'. Compiled for AVX2 + FMA and the baseline ISA: the outer
// products are most of a pass, and as scalar loops a pass took about 15 us at B = 256, K = 10
// (four passes a balanced DFC batch target, 2-core AMD EPYC VM).
FAIRKERNELS_MULTIVERSION void group_shares(const double* L, const int64_t* g, int64_t B, const double* b, ShareRows& a,
                                           double* sums, double* outer) {
  const int64_t K = a.K, Kp = a.Kp, T = a.T, lanes = Kp / 4;
  double* w = a.w.data();
  for (int64_t t = 0; t < T; ++t) {
    double b_max = -std::numeric_limits<double>::infinity();
    for (int64_t k = 0; k < K; ++k) b_max = std::max(b_max, b[t * K + k]);
    for (int64_t k = 0; k < K; ++k) w[t * Kp + k] = std::exp(b[t * K + k] - b_max);
  }
  std::fill(a.sums.begin(), a.sums.end(), 0.0);
  std::fill(a.outer.begin(), a.outer.end(), 0.0);
  double* s = a.s.data();
  for (int64_t i = 0; i < B; ++i) {
    const double* e = a.E.data() + i * Kp;
    const double* wg = w + g[i] * Kp;
    Vec4 den4 = splat4(0.0);
    for (int64_t c = 0; c < lanes; ++c) den4 += load4(e + 4 * c) * load4(wg + 4 * c);
    const double den = (den4[0] + den4[1]) + (den4[2] + den4[3]);
    if (den > 0.0 && std::isfinite(den)) {
      const Vec4 inv = splat4(1.0 / den);
      for (int64_t c = 0; c < lanes; ++c) store4(s + 4 * c, load4(e + 4 * c) * load4(wg + 4 * c) * inv);
    } else {  // both factors underflowed where the other is large: the exact softmax, in logs
      const double* bg = b + g[i] * K;
      double m = -std::numeric_limits<double>::infinity();
      for (int64_t k = 0; k < K; ++k) m = std::max(m, s[k] = (L != nullptr ? L[i * K + k] : std::log(e[k])) + bg[k]);
      double z = 0.0;
      for (int64_t k = 0; k < K; ++k) z += (s[k] = std::exp(s[k] - m));
      for (int64_t k = 0; k < K; ++k) s[k] /= z;
    }
    double* sg = a.sums.data() + g[i] * Kp;
    for (int64_t c = 0; c < lanes; ++c) store4(sg + 4 * c, load4(sg + 4 * c) + load4(s + 4 * c));
    double* og = a.outer.data() + g[i] * K * Kp;
    for (int64_t k = 0; k < K; ++k) {
      const Vec4 sk = splat4(s[k]);
      double* row = og + k * Kp;
      for (int64_t c = 0; c <= k / 4; ++c) store4(row + 4 * c, load4(row + 4 * c) + sk * load4(s + 4 * c));
    }
  }
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < K; ++k) {
      sums[t * K + k] = a.sums[t * Kp + k];
      for (int64_t l = 0; l <= k; ++l) outer[(t * K + k) * K + l] = a.outer[(t * K + k) * Kp + l];
    }
}

// The Newton step d [K] of group t on the system log q_t(b_t) = log p: J = diag(1/q) H with
// H = (diag(sums) - outer) / n the Hessian of the dual, singular along 1 (a shift of b_t
// changes nothing). Solved in the scaled variables y = sqrt(q) d, where H~ = D H D has null
// vector u = sqrt(q) and entries in [-1, 1]; the part of the right-hand side along u (the
// unreachable shift) is dropped and H~ + u u^T is factorised. false: no usable step (a pivot
// <= 1e-14 or a non-finite step; the caller takes a Sinkhorn step instead).
bool newton_step(const double* sums, const double* outer, const double* residual, double n, int64_t K, double* d) {
  std::vector<double> root(K), A(K * K), rhs(K);
  for (int64_t k = 0; k < K; ++k) root[k] = std::sqrt(std::max(sums[k] / n, 1e-200));
  double u_norm = 0.0;
  for (int64_t k = 0; k < K; ++k) u_norm += root[k] * root[k];
  u_norm = std::sqrt(u_norm);
  double along = 0.0;
  for (int64_t k = 0; k < K; ++k) along += (rhs[k] = root[k] * residual[k]) * root[k] / u_norm;
  for (int64_t k = 0; k < K; ++k) rhs[k] = -(rhs[k] - along * root[k] / u_norm);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t l = 0; l <= k; ++l) {
      const double h = ((k == l ? sums[k] : 0.0) - outer[k * K + l]) / n;
      A[k * K + l] = h / (root[k] * root[l]) + root[k] * root[l] / (u_norm * u_norm) + (k == l ? 1e-12 : 0.0);
    }
  if (!cholesky_lower(A, K)) return false;
  for (int64_t j = 0; j < K; ++j)
    if (!(A[j * K + j] * A[j * K + j] > 1e-14)) return false;   // a near-singular pivot
  cholesky_solve(A, K, rhs, 1);
  for (int64_t k = 0; k < K; ++k) {
    d[k] = rhs[k] / root[k];
    if (!std::isfinite(d[k])) return false;
    d[k] = std::min(std::max(d[k], -kMaxStep), kMaxStep);
  }
  return true;
}

// The offsets b [T, K] (row-major) of the B x K logits L with group ids g, iterated from the
// values b holds (warm) or from zeros. weights: exp(L) up to a positive factor per row, when
// the caller has it without exponentials (L may then be null); else computed here from L.
void balance_offsets(const double* L, const int64_t* g, int64_t B, int64_t K, int64_t T, int64_t max_iter,
                     double tol, double* b, bool warm = false, const double* weights = nullptr) {
  ShareRows rows_of(B, K, T);
  const int64_t Kp = rows_of.Kp;
  for (int64_t i = 0; i < B; ++i) {
    double* e = rows_of.E.data() + i * Kp;
    if (weights != nullptr) {
      std::copy(weights + i * K, weights + (i + 1) * K, e);
      continue;
    }
    const double* row = L + i * K;
    double row_max = -std::numeric_limits<double>::infinity();
    for (int64_t k = 0; k < K; ++k) row_max = std::max(row_max, row[k]);
    for (int64_t k = 0; k < K; ++k) e[k] = std::exp(row[k] - row_max);
  }
  std::vector<double> counts(T, 0.0), total(K, 0.0);
  for (int64_t i = 0; i < B; ++i) {
    const double* e = rows_of.E.data() + i * Kp;
    double sum = 0.0;
    for (int64_t k = 0; k < K; ++k) sum += e[k];
    for (int64_t k = 0; k < K; ++k) total[k] += e[k] / sum;
    counts[g[i]] += 1.0;
  }
  double rows = 0.0;
  for (int64_t t = 0; t < T; ++t) rows += counts[t];
  std::vector<double> log_p(K);
  for (int64_t k = 0; k < K; ++k) log_p[k] = std::max(std::log(total[k] / std::max(rows, 1.0)), kLogFloor);

  if (!warm) std::fill(b, b + T * K, 0.0);
  // Newton on r_t(b_t) = log q_t - log p = 0 per group (newton_step) with a backtracking line
  // search on the merit |r_t|^2 (the Newton direction of r_t = 0 descends it): a step that does
  // not lower it is halved, down to an eighth, and then replaced by the Sinkhorn step
  // b_t <- b_t - r_t from where it started. A group is done when max_k |r_tk| <= tol;
  // max_iter counts passes over the rows.
  std::vector<double> sums(T * K), outer(T * K * K), residual(T * K), start(T * K), start_residual(T * K);
  std::vector<double> start_step(T * K), scale(T, 1.0), d(K);
  std::vector<double> start_merit(T, std::numeric_limits<double>::infinity());
  std::vector<char> after_newton(T, 0), retaken(T, 0), done(T, 0);
  for (int64_t pass = 0; pass < max_iter; ++pass) {
    group_shares(L, g, B, b, rows_of, sums.data(), outer.data());
    bool all_done = true;
    for (int64_t t = 0; t < T; ++t) {
      retaken[t] = 0;
      if (!(counts[t] > 0.0) || done[t]) continue;
      double merit = 0.0, largest = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        const double r = std::max(std::log(sums[t * K + k] / counts[t]), kLogFloor) - log_p[k];
        residual[t * K + k] = r;
        merit += r * r;
        largest = std::max(largest, std::abs(r));
      }
      if (!std::isfinite(merit)) merit = largest = std::numeric_limits<double>::infinity();
      double* bt = b + t * K;
      if (after_newton[t] && !(merit < start_merit[t])) {   // back off from start, or the Sinkhorn step
        scale[t] *= 0.5;
        const bool retry = scale[t] >= 0.125;
        for (int64_t k = 0; k < K; ++k)
          bt[k] = start[t * K + k] + (retry ? scale[t] * start_step[t * K + k] : -start_residual[t * K + k]);
        after_newton[t] = retry;
        retaken[t] = 1;
        all_done = false;
        continue;
      }
      if (largest <= tol) {
        done[t] = 1;
      } else {
        all_done = false;
        start_merit[t] = merit;
      }
    }
    if (all_done) break;
    for (int64_t t = 0; t < T; ++t) {
      if (!(counts[t] > 0.0) || done[t] || retaken[t]) continue;
      double* bt = b + t * K;
      const double* rt = residual.data() + t * K;
      std::copy(bt, bt + K, start.data() + t * K);
      std::copy(rt, rt + K, start_residual.data() + t * K);
      scale[t] = 1.0;
      after_newton[t] = newton_step(sums.data() + t * K, outer.data() + t * K * K, rt, counts[t], K, d.data());
      if (after_newton[t]) std::copy(d.begin(), d.end(), start_step.data() + t * K);
      for (int64_t k = 0; k < K; ++k) bt[k] += after_newton[t] ? d[k] : -rt[k];
    }
  }
}

void check_group_range(const int64_t* g, int64_t B, int64_t T) {
  std::vector<GroupErrors> errors(1);
  for (int64_t i = 0; i < B; ++i) errors[0].out_of_range(g[i], T);
  raise_group_errors(errors, T);
}

}  // namespace

at::Tensor group_offsets(const at::Tensor& logits_in, const at::Tensor& groups_in, int64_t num_groups,
                         int64_t max_iter, double tol) {
  check_matrix(logits_in, "logits");
  const int64_t B = logits_in.size(0), K = logits_in.size(1), T = num_groups;
  TORCH_CHECK(num_groups >= 1, "num_groups must be >= 1");
  check_groups(groups_in, B);
  const at::Tensor logits = logits_in.to(at::kDouble).contiguous();
  const at::Tensor groups = groups_in.to(at::kLong).contiguous();
  check_group_range(groups.data_ptr<int64_t>(), B, T);
  at::Tensor offsets = at::empty({T, K}, logits.options());
  balance_offsets(logits.data_ptr<double>(), groups.data_ptr<int64_t>(), B, K, T, max_iter, tol,
                  offsets.data_ptr<double>());
  return offsets.to(logits_in.scalar_type());
}

namespace {

// One batch's DEC target into p [B, K] (docs/math.md §4): f [K] holds the running frequency on
// entry (used when has_running) and the batch's on return; c [T, K] the balancing's starting
// offsets on entry (used when warm) and the offsets reached on return (zeros without balance).
void batch_target_into(const double* qp, const int64_t* g, int64_t B, int64_t K, int64_t T, bool has_running,
                       double momentum, bool balance, bool warm, int64_t max_iter, double tol, double* f, double* c,
                       double* p) {
  // f: the running mean of the batches' normalised column sums.
  std::vector<double> columns(K, 0.0);
  for (int64_t i = 0; i < B; ++i)
    for (int64_t k = 0; k < K; ++k) columns[k] += qp[i * K + k];
  double column_total = 0.0;
  for (int64_t k = 0; k < K; ++k) column_total += columns[k];
  for (int64_t k = 0; k < K; ++k) {
    const double batch = columns[k] / std::max(column_total, kLogEps);
    f[k] = has_running ? momentum * f[k] + (1.0 - momentum) * batch : batch;
  }
  for (int64_t i = 0; i < B; ++i) {
    double total = 0.0;
    for (int64_t k = 0; k < K; ++k) total += (p[i * K + k] = qp[i * K + k] * qp[i * K + k] / std::max(f[k], kLogEps));
    const double inv = 1.0 / std::max(total, kLogEps);
    for (int64_t k = 0; k < K; ++k) p[i * K + k] *= inv;
  }
  if (!balance) {
    std::fill(c, c + T * K, 0.0);
    return;
  }
  // P <- softmax(log P + c_g), c the offsets that give every group the set's mean target.
  // Started from the previous batch's offsets: consecutive batches need nearly the same ones,
  // and from zeros the iterations took about 0.4 ms of every matched DFC step.
  if (!warm) std::fill(c, c + T * K, 0.0);
  // exp(log max(p, eps)) is max(p, eps): the iterations and the final softmax need no
  // exponential or logarithm per entry (they took about 0.15 ms of a batch), only K T of them.
  // Every row's weights lie in [eps, 1], so no row sum underflows.
  std::vector<double> weights(B * K);
  for (int64_t e = 0; e < B * K; ++e) weights[e] = std::max(p[e], kLogEps);
  balance_offsets(nullptr, g, B, K, T, max_iter, tol, c, warm, weights.data());
  std::vector<double> scale(T * K);   // exp(c_t - max_k c_t): softmax(log p + c) = p * scale / sum
  for (int64_t t = 0; t < T; ++t) {
    double c_max = -std::numeric_limits<double>::infinity();
    for (int64_t k = 0; k < K; ++k) c_max = std::max(c_max, c[t * K + k]);
    for (int64_t k = 0; k < K; ++k) scale[t * K + k] = std::exp(c[t * K + k] - c_max);
  }
  for (int64_t i = 0; i < B; ++i) {
    const double* row_scale = scale.data() + g[i] * K;
    double total = 0.0;
    for (int64_t k = 0; k < K; ++k) total += (p[i * K + k] = weights[i * K + k] * row_scale[k]);
    for (int64_t k = 0; k < K; ++k) p[i * K + k] /= total;
  }
}

void check_batch_state(const std::optional<at::Tensor>& running, const std::optional<at::Tensor>& offsets, int64_t K,
                       int64_t T) {
  if (running.has_value())
    TORCH_CHECK(running->dim() == 1 && running->size(0) == K, "running frequency must have ", K, " entries");
  if (offsets.has_value())
    TORCH_CHECK(offsets->dim() == 2 && offsets->size(0) == T && offsets->size(1) == K,
                "offsets must be [", T, ", ", K, "]");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> dec_batch_target(
    const at::Tensor& q, const at::Tensor& groups, const std::optional<at::Tensor>& running,
    const std::optional<at::Tensor>& offsets, double momentum, bool balance, int64_t num_groups, int64_t max_iter,
    double tol) {
  // The list op on one batch: the same checks, the same values.
  const std::array<at::Tensor, 1> q_list{q}, groups_list{groups};
  return dec_batch_targets(q_list, groups_list, running, offsets, momentum, balance, num_groups, max_iter, tol);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dec_batch_targets(
    at::TensorList q_list, at::TensorList groups_list, const std::optional<at::Tensor>& running_in,
    const std::optional<at::Tensor>& offsets_in, double momentum, bool balance, int64_t num_groups, int64_t max_iter,
    double tol) {
  TORCH_CHECK(!q_list.empty(), "q must hold at least one batch");
  TORCH_CHECK(groups_list.size() == q_list.size(), "groups must hold one tensor per batch of q (", q_list.size(),
              "), got ", groups_list.size());
  TORCH_CHECK(num_groups >= 1, "num_groups must be >= 1");
  const int64_t K = q_list[0].dim() == 2 ? q_list[0].size(1) : 0, T = num_groups;
  int64_t rows = 0;
  for (const at::Tensor& q : q_list) {
    check_matrix(q, "q");
    TORCH_CHECK(q.size(1) == K && q.scalar_type() == q_list[0].scalar_type() && q.device() == q_list[0].device(),
                "every batch of q must have ", K, " columns and the first batch's dtype and device");
    rows += q.size(0);
  }
  check_batch_state(running_in, offsets_in, K, T);
  // Every batch as dec_batch_target would make it called on each in turn, each call given the
  // previous one's frequency (rounded to its dtype, as that call returns it) and offsets.
  const auto acc = q_list[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  std::vector<double> f(K, 0.0), c(T * K, 0.0), target(rows * K);
  bool has_running = running_in.has_value(), warm = offsets_in.has_value();
  if (has_running) {
    const DoubleValues running(*running_in);
    std::copy(running.data(), running.data() + K, f.begin());
  }
  if (balance && warm) {
    const DoubleValues start(*offsets_in);
    std::copy(start.data(), start.data() + T * K, c.begin());
  }
  int64_t row = 0;
  for (size_t b = 0; b < q_list.size(); ++b) {
    const int64_t B = q_list[b].size(0);
    check_groups(groups_list[b], B);
    const DoubleValues q(q_list[b]);
    const at::Tensor groups = long_groups(groups_list[b]);
    const int64_t* g = groups.data_ptr<int64_t>();
    if (balance) check_group_range(g, B, T);
    batch_target_into(q.data(), g, B, K, T, has_running, momentum, balance, warm, max_iter, tol, f.data(), c.data(),
                      target.data() + row * K);
    if (acc == at::kFloat)
      for (double& value : f) value = static_cast<double>(static_cast<float>(value));
    has_running = true;
    warm = warm || balance;   // the caller passes a batch's offsets on only when it balances
    row += B;
  }
  return {tensor_from_doubles(target.data(), {rows, K}, q_list[0].options()),
          tensor_from_doubles(f.data(), {K}, q_list[0].options().dtype(acc)),
          tensor_from_doubles(c.data(), {T, K}, q_list[0].options().dtype(at::kDouble))};
}

}  // namespace fairkernels::cpu
