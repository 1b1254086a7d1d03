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

// The offsets b [T, K] (row-major, written) of the B x K logits L with group ids g.
void balance_offsets(const double* L, const int64_t* g, int64_t B, int64_t K, int64_t T, int64_t max_iter,
                     double tol, double* b) {

  std::vector<double> E(B * K), counts(T, 0.0), total(K, 0.0);
  for (int64_t i = 0; i < B; ++i) {
    const double* row = L + i * K;
    double row_max = -std::numeric_limits<double>::infinity();
    for (int64_t k = 0; k < K; ++k) row_max = std::max(row_max, row[k]);
    double sum = 0.0;
    for (int64_t k = 0; k < K; ++k) sum += (E[i * K + k] = std::exp(row[k] - row_max));
    for (int64_t k = 0; k < K; ++k) total[k] += E[i * K + k] / sum;
    counts[g[i]] += 1.0;
  }
  double rows = 0.0;
  for (int64_t t = 0; t < T; ++t) rows += counts[t];
  std::vector<double> log_p(K);
  for (int64_t k = 0; k < K; ++k) log_p[k] = std::max(std::log(total[k] / std::max(rows, 1.0)), kLogFloor);

  std::fill(b, b + T * K, 0.0);
  std::vector<double> w(T * K), sums(T * K);
  for (int64_t iteration = 0; iteration < max_iter; ++iteration) {
    for (int64_t t = 0; t < T; ++t) {
      double b_max = -std::numeric_limits<double>::infinity();
      for (int64_t k = 0; k < K; ++k) b_max = std::max(b_max, b[t * K + k]);
      for (int64_t k = 0; k < K; ++k) w[t * K + k] = std::exp(b[t * K + k] - b_max);
    }
    std::fill(sums.begin(), sums.end(), 0.0);
    for (int64_t i = 0; i < B; ++i) {
      const double* e = E.data() + i * K;
      const double* wg = w.data() + g[i] * K;
      double* s = sums.data() + g[i] * K;
      double den = 0.0;
      for (int64_t k = 0; k < K; ++k) den += e[k] * wg[k];
      if (den > 0.0 && std::isfinite(den)) {
        const double inv = 1.0 / den;
        for (int64_t k = 0; k < K; ++k) s[k] += e[k] * wg[k] * inv;
      } else {  // both factors underflowed where the other is large: the exact softmax, in logs
        const double* row = L + i * K;
        const double* bg = b + g[i] * K;
        double m = -std::numeric_limits<double>::infinity();
        for (int64_t k = 0; k < K; ++k) m = std::max(m, row[k] + bg[k]);
        double z = 0.0;
        for (int64_t k = 0; k < K; ++k) z += std::exp(row[k] + bg[k] - m);
        for (int64_t k = 0; k < K; ++k) s[k] += std::exp(row[k] + bg[k] - m) / z;
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

std::tuple<at::Tensor, at::Tensor> dec_batch_target(const at::Tensor& q_in, const at::Tensor& groups_in,
                                                    const std::optional<at::Tensor>& running_in, double momentum,
                                                    bool balance, int64_t num_groups, int64_t max_iter, double tol) {
  check_matrix(q_in, "q");
  const int64_t B = q_in.size(0), K = q_in.size(1), T = num_groups;
  TORCH_CHECK(num_groups >= 1, "num_groups must be >= 1");
  check_groups(groups_in, B);
  if (running_in.has_value())
    TORCH_CHECK(running_in->dim() == 1 && running_in->size(0) == K, "running frequency must have ", K, " entries");
  const at::Tensor q = q_in.to(at::kDouble).contiguous();
  const at::Tensor groups = groups_in.to(at::kLong).contiguous();
  const double* qp = q.data_ptr<double>();
  const int64_t* g = groups.data_ptr<int64_t>();
  if (balance) check_group_range(g, B, T);

  // f: the running mean of the batches' normalised column sums (docs/math.md §4).
  std::vector<double> columns(K, 0.0);
  for (int64_t i = 0; i < B; ++i)
    for (int64_t k = 0; k < K; ++k) columns[k] += qp[i * K + k];
  double column_total = 0.0;
  for (int64_t k = 0; k < K; ++k) column_total += columns[k];
  at::Tensor frequency = at::empty({K}, q.options());
  double* f = frequency.data_ptr<double>();
  at::Tensor running;
  if (running_in.has_value()) running = running_in->to(at::kDouble).contiguous();
  for (int64_t k = 0; k < K; ++k) {
    const double batch = columns[k] / std::max(column_total, kLogEps);
    f[k] = running.defined() ? momentum * running.data_ptr<double>()[k] + (1.0 - momentum) * batch : batch;
  }
  at::Tensor target = at::empty({B, K}, q.options());
  double* p = target.data_ptr<double>();
  for (int64_t i = 0; i < B; ++i) {
    double total = 0.0;
    for (int64_t k = 0; k < K; ++k) total += (p[i * K + k] = qp[i * K + k] * qp[i * K + k] / std::max(f[k], kLogEps));
    const double inv = 1.0 / std::max(total, kLogEps);
    for (int64_t k = 0; k < K; ++k) p[i * K + k] *= inv;
  }
  if (balance) {  // P <- softmax(log P + c_g), c the offsets that give every group the set's mean target
    std::vector<double> log_p(B * K), c(T * K);
    for (int64_t e = 0; e < B * K; ++e) log_p[e] = std::log(std::max(p[e], kLogEps));
    balance_offsets(log_p.data(), g, B, K, T, max_iter, tol, c.data());
    for (int64_t i = 0; i < B; ++i) {
      double row_max = -std::numeric_limits<double>::infinity();
      for (int64_t k = 0; k < K; ++k) row_max = std::max(row_max, log_p[i * K + k] + c[g[i] * K + k]);
      double total = 0.0;
      for (int64_t k = 0; k < K; ++k) total += (p[i * K + k] = std::exp(log_p[i * K + k] + c[g[i] * K + k] - row_max));
      for (int64_t k = 0; k < K; ++k) p[i * K + k] /= total;
    }
  }
  const auto acc = q_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return {target.to(q_in.scalar_type()), frequency.to(acc)};
}

}  // namespace fairkernels::cpu
