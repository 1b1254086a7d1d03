// Per-(group, cluster) logit offsets that balance every group's mean soft assignment to the
// whole set's (docs/math.md §8, fairkernels.train.matched_centers.group_offsets): the
// Sinkhorn fixed point b_t <- b_t + log p - log q_t.
//
// Why a kernel: the DFC trainer balances every batch's DEC target with it on large sets, and
// in tensor ops each of its 20-60 iterations is a softmax, a gather and a grouped sum, about
// 1 ms per batch of 256 rows (more than a narrow encoder's step). Here softmax(L_i + b_g) is
// factorised as E_ik w_gk / sum_k' E_ik' w_gk', with E_ik = exp(L_ik - max_k L_ik) computed
// once and w_gk = exp(b_gk - max_k b_gk) per iteration, so an iteration costs B x K multiplies
// and T x K exps. Same iterations and stopping rule as the Python loop (convergence tested
// every 10th iteration), so the offsets agree with it to float64 rounding. dec_batch_target
// builds the DFC trainer's per-batch DEC target with it (fairkernels/train/dfc.py, batch_target).
#include "kernels.h"

#include <limits>

#include "common.h"

namespace fairkernels::cpu {
namespace {

constexpr double kLogFloor = -80.0;   // the Python loop's clamp_min(-80)
constexpr double kLogEps = 1e-12;     // reference.LOG_EPS

// The offsets b [T, K] (row-major) of the B x K logits L with group ids g, iterated from the
// values b holds (warm) or from zeros. weights: exp(L) up to a positive factor per row, when
// the caller has it without exponentials (L may then be null); else computed here from L.
void balance_offsets(const double* L, const int64_t* g, int64_t B, int64_t K, int64_t T, int64_t max_iter,
                     double tol, double* b, bool warm = false, const double* weights = nullptr) {
  std::vector<double> computed;
  if (weights == nullptr) {
    computed.resize(B * K);
    for (int64_t i = 0; i < B; ++i) {
      const double* row = L + i * K;
      double row_max = -std::numeric_limits<double>::infinity();
      for (int64_t k = 0; k < K; ++k) row_max = std::max(row_max, row[k]);
      for (int64_t k = 0; k < K; ++k) computed[i * K + k] = std::exp(row[k] - row_max);
    }
    weights = computed.data();
  }
  const double* E = weights;
  std::vector<double> counts(T, 0.0), total(K, 0.0);
  for (int64_t i = 0; i < B; ++i) {
    double sum = 0.0;
    for (int64_t k = 0; k < K; ++k) sum += E[i * K + k];
    for (int64_t k = 0; k < K; ++k) total[k] += E[i * K + k] / sum;
    counts[g[i]] += 1.0;
  }
  double rows = 0.0;
  for (int64_t t = 0; t < T; ++t) rows += counts[t];
  std::vector<double> log_p(K);
  for (int64_t k = 0; k < K; ++k) log_p[k] = std::max(std::log(total[k] / std::max(rows, 1.0)), kLogFloor);

  if (!warm) std::fill(b, b + T * K, 0.0);
  std::vector<double> w(T * K), sums(T * K);
  for (int64_t iteration = 0; iteration < max_iter; ++iteration) {
    for (int64_t t = 0; t < T; ++t) {
      double b_max = -std::numeric_limits<double>::infinity();
      for (int64_t k = 0; k < K; ++k) b_max = std::max(b_max, b[t * K + k]);
      for (int64_t k = 0; k < K; ++k) w[t * K + k] = std::exp(b[t * K + k] - b_max);
    }
    std::fill(sums.begin(), sums.end(), 0.0);
    for (int64_t i = 0; i < B; ++i) {
      const double* e = E + i * K;
      const double* wg = w.data() + g[i] * K;
      double* s = sums.data() + g[i] * K;
      double den = 0.0;
      for (int64_t k = 0; k < K; ++k) den += e[k] * wg[k];
      if (den > 0.0 && std::isfinite(den)) {
        const double inv = 1.0 / den;
        for (int64_t k = 0; k < K; ++k) s[k] += e[k] * wg[k] * inv;
      } else {  // both factors underflowed where the other is large: the exact softmax, in logs
        const double* bg = b + g[i] * K;
        std::vector<double> logit(K);
        for (int64_t k = 0; k < K; ++k) logit[k] = (L != nullptr ? L[i * K + k] : std::log(e[k])) + bg[k];
        const double m = *std::max_element(logit.begin(), logit.end());
        double z = 0.0;
        for (int64_t k = 0; k < K; ++k) z += std::exp(logit[k] - m);
        for (int64_t k = 0; k < K; ++k) s[k] += std::exp(logit[k] - m) / z;
      }
    }
    double largest = 0.0;
    bool finite = true;
    for (int64_t t = 0; t < T; ++t) {
      if (!(counts[t] > 0.0)) continue;
      for (int64_t k = 0; k < K; ++k) {
        const double step = log_p[k] - std::max(std::log(sums[t * K + k] / counts[t]), kLogFloor);
        b[t * K + k] += step;
        finite = finite && std::isfinite(step);
        largest = std::max(largest, std::abs(step));
      }
    }
    if (iteration % 10 == 9 && finite && largest <= tol) break;
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> dec_batch_target(
    const at::Tensor& q_in, const at::Tensor& groups_in, const std::optional<at::Tensor>& running_in,
    const std::optional<at::Tensor>& offsets_in, double momentum, bool balance, int64_t num_groups, int64_t max_iter,
    double tol) {
  check_matrix(q_in, "q");
  const int64_t B = q_in.size(0), K = q_in.size(1), T = num_groups;
  TORCH_CHECK(num_groups >= 1, "num_groups must be >= 1");
  check_groups(groups_in, B);
  if (running_in.has_value())
    TORCH_CHECK(running_in->dim() == 1 && running_in->size(0) == K, "running frequency must have ", K, " entries");
  if (offsets_in.has_value())
    TORCH_CHECK(offsets_in->dim() == 2 && offsets_in->size(0) == T && offsets_in->size(1) == K,
                "offsets must be [", T, ", ", K, "]");
  // Read and written without Tensor::to (common.h, DoubleValues): this runs every training step.
  const DoubleValues q(q_in);
  const at::Tensor groups = long_groups(groups_in);
  const double* qp = q.data();
  const int64_t* g = groups.data_ptr<int64_t>();
  if (balance) check_group_range(g, B, T);

  // f: the running mean of the batches' normalised column sums (docs/math.md §4).
  std::vector<double> columns(K, 0.0);
  for (int64_t i = 0; i < B; ++i)
    for (int64_t k = 0; k < K; ++k) columns[k] += qp[i * K + k];
  double column_total = 0.0;
  for (int64_t k = 0; k < K; ++k) column_total += columns[k];
  std::vector<double> f(K);
  std::optional<DoubleValues> running;
  if (running_in.has_value()) running.emplace(*running_in);
  for (int64_t k = 0; k < K; ++k) {
    const double batch = columns[k] / std::max(column_total, kLogEps);
    f[k] = running ? momentum * running->data()[k] + (1.0 - momentum) * batch : batch;
  }
  std::vector<double> target(B * K);
  double* p = target.data();
  for (int64_t i = 0; i < B; ++i) {
    double total = 0.0;
    for (int64_t k = 0; k < K; ++k) total += (p[i * K + k] = qp[i * K + k] * qp[i * K + k] / std::max(f[k], kLogEps));
    const double inv = 1.0 / std::max(total, kLogEps);
    for (int64_t k = 0; k < K; ++k) p[i * K + k] *= inv;
  }
  std::vector<double> c(T * K, 0.0);
  if (balance) {  // P <- softmax(log P + c_g), c the offsets that give every group the set's mean target
    // Started from the previous batch's offsets: consecutive batches need nearly the same ones,
    // and from zeros the iterations took about 0.4 ms of every matched DFC step.
    if (offsets_in.has_value()) {
      const DoubleValues start(*offsets_in);
      std::copy(start.data(), start.data() + T * K, c.begin());
    }
    // exp(log max(p, eps)) is max(p, eps): the iterations and the final softmax need no
    // exponential or logarithm per entry (they took about 0.15 ms of a batch), only K T of them.
    // Every row's weights lie in [eps, 1], so no row sum underflows.
    std::vector<double> weights(B * K);
    for (int64_t e = 0; e < B * K; ++e) weights[e] = std::max(p[e], kLogEps);
    balance_offsets(nullptr, g, B, K, T, max_iter, tol, c.data(), offsets_in.has_value(), weights.data());
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
  const auto acc = q_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return {tensor_from_doubles(p, {B, K}, q_in.options()), tensor_from_doubles(f.data(), {K}, q_in.options().dtype(acc)),
          tensor_from_doubles(c.data(), {T, K}, q_in.options().dtype(at::kDouble))};
}

}  // namespace fairkernels::cpu
