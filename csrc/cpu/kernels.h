// CPU kernels of fairkernels, registered as torch.ops.fairkernels.* in csrc/ops.cpp.
// Interface and semantics: fairkernels/ops/torch_kernels.py (one Python body per kernel).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace fairkernels::cpu {

// SPEC 3 forward statistics: (lse[N], joint[T,K] = sum_{i in t} c_ik, ent_sum = sum c log c).
// Fused input check: ent_sum is NaN whenever some logit is +-inf or NaN (and finite otherwise,
// unless logits differ by more than the dtype's range), so the ops layer validates the values
// by reading one scalar. Group ids outside [0, num_groups) raise ValueError.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fcmi_fwd(const at::Tensor& logits, const at::Tensor& groups,
                                                        int64_t num_groups, bool deterministic);
// SPEC 3 backward: grad_ik = c_ik (G_ik - sum_k' c_ik' G_ik'), G_ik = table[g_i,k] - logc_coef log c_ik.
at::Tensor fcmi_bwd(const at::Tensor& logits, const at::Tensor& groups, const at::Tensor& lse,
                    const at::Tensor& table, const at::Tensor& logc_coef, bool deterministic);

// SPEC 1.2 + 3 fused: the statistics of fcmi_fwd for logits = cos(h, centers) / tau, and the
// gradients of the loss (given table, logc_coef as in fcmi_bwd) w.r.t. h and centers. As in
// fcmi_fwd, ent_sum is NaN whenever h or centers hold +-inf or NaN.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fcmi_emb_fwd(const at::Tensor& h, const at::Tensor& centers,
                                                            const at::Tensor& groups, int64_t num_groups,
                                                            double tau, bool deterministic);
std::tuple<at::Tensor, at::Tensor> fcmi_emb_bwd(const at::Tensor& h, const at::Tensor& centers,
                                                const at::Tensor& groups, const at::Tensor& lse,
                                                const at::Tensor& table, const at::Tensor& logc_coef, double tau,
                                                bool deterministic);

// SPEC 2.1: J_tk = sum_{g_i = t} w_i P_ik and its gather backward.
at::Tensor histogram_fwd(const at::Tensor& probs, const at::Tensor& groups, const std::optional<at::Tensor>& weights,
                         int64_t num_groups, bool deterministic);
// histogram_fwd plus its fused input check: flags[3] (int64) = (probs hold +-inf/NaN, probs hold
// a negative entry, weights hold +-inf/NaN), found in the same pass that builds the table.
std::tuple<at::Tensor, at::Tensor> histogram_fwd_checked(const at::Tensor& probs, const at::Tensor& groups,
                                                         const std::optional<at::Tensor>& weights,
                                                         int64_t num_groups, bool deterministic);
at::Tensor histogram_bwd(const at::Tensor& grad_joint, const at::Tensor& groups,
                         const std::optional<at::Tensor>& weights);

// SPEC 1.1 Student-t soft assignment and its backward.
at::Tensor student_t_fwd(const at::Tensor& z, const at::Tensor& centers, double alpha);
std::tuple<at::Tensor, at::Tensor> student_t_bwd(const at::Tensor& grad_q, const at::Tensor& q, const at::Tensor& z,
                                                 const at::Tensor& centers, double alpha);

// SPEC 1.2 cosine softmax and its backward.
at::Tensor cosine_fwd(const at::Tensor& h, const at::Tensor& centers, double tau);
std::tuple<at::Tensor, at::Tensor> cosine_bwd(const at::Tensor& grad_c, const at::Tensor& c, const at::Tensor& h,
                                              const at::Tensor& centers, double tau);

// SPEC 1.1 + 4 fused DFC clustering loss of a batch: Student-t Q of z to centers ([K, d] shared
// or [T, K, d] per group, row i using its group's), l_cl = KL(P || Q), l_fr = KL(Psi || Phi) with
// the eq. 12 ridge centroids fitted to P (or to Q when weights_from_q), loss = l_cl + gamma * l_fr
// (the three 0-d in z's dtype), q [B, K], the fairoids [T, d] (absent groups keep previous), and
// the gradients of loss w.r.t. z and centers. gamma = 0 skips the fairness term (l_fr = 0).
// float64 inside.
using DFCStepOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
DFCStepOutputs dfc_step(
    const at::Tensor& z, const at::Tensor& centers, const at::Tensor& groups, const at::Tensor& target,
    const std::optional<at::Tensor>& previous, int64_t num_groups, double alpha, double beta, double gamma,
    double ridge, bool weights_from_q);

// dfc_step with its gradients as autograd (csrc/cpu/dfc_loss.cpp): (loss = l_cl + gamma * l_fr,
// l_cl, l_fr, q, fairoids), the three losses 0-d in z's dtype; only loss is differentiable.
using DFCLossOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
DFCLossOutputs dfc_loss(const at::Tensor& z, const at::Tensor& centers, const at::Tensor& groups,
                        const at::Tensor& target, const std::optional<at::Tensor>& previous, int64_t num_groups,
                        double alpha, double beta, double gamma, double ridge, bool weights_from_q);
DFCLossOutputs dfc_loss_autograd(const at::Tensor& z, const at::Tensor& centers, const at::Tensor& groups,
                                 const at::Tensor& target, const std::optional<at::Tensor>& previous,
                                 int64_t num_groups, double alpha, double beta, double gamma, double ridge,
                                 bool weights_from_q);

// docs/math.md §8 balancing offsets b [T, K] (logits' dtype): the root of log q_t(b_t) = log p that
// gives every group's mean softmax(logits_i + b_{g_i}) the whole set's mean softmax(logits_i), by
// safeguarded Newton steps (a Sinkhorn step where one does not help), at most max_iter passes
// over the rows, a group stopping once its largest |log q_t - log p| is <= tol.
at::Tensor group_offsets(const at::Tensor& logits, const at::Tensor& groups, int64_t num_groups, int64_t max_iter,
                         double tol);

// The DFC trainer's per-batch DEC target (docs/math.md §4): f = momentum * running + (1 - momentum)
// * (normalised column sums of q) (just the batch's when running is None), p_ik = q_ik^2 / f_k normalised over k,
// and with balance the balancing of group_offsets applied to log p, its iterations started
// from offsets (the previous batch's, [T, K] float64; zeros when None). -> (p [B, K] in q's
// dtype, f [K] acc, the offsets reached [T, K] float64: zeros without balance, and a group with
// no rows keeps its starting value).
std::tuple<at::Tensor, at::Tensor, at::Tensor> dec_batch_target(
    const at::Tensor& q, const at::Tensor& groups, const std::optional<at::Tensor>& running,
    const std::optional<at::Tensor>& offsets, double momentum, bool balance, int64_t num_groups, int64_t max_iter,
    double tol);

// dec_batch_target of each batch of a list in turn, each given the previous one's frequency and
// (with balance) offsets: (the targets concatenated [sum B, K] in q's dtype, the last f, the last
// offsets), the values of those calls. The DFC trainer makes a segment's lagged targets in one call.
std::tuple<at::Tensor, at::Tensor, at::Tensor> dec_batch_targets(
    at::TensorList q, at::TensorList groups, const std::optional<at::Tensor>& running,
    const std::optional<at::Tensor>& offsets, double momentum, bool balance, int64_t num_groups, int64_t max_iter,
    double tol);

// Nearest center by squared Euclidean distance: (labels[N] int64, min_sq_dist[N]).
std::tuple<at::Tensor, at::Tensor> kmeans_assign(const at::Tensor& x, const at::Tensor& centers);
// One fused Lloyd pass: kmeans_assign's outputs plus per-cluster row sums [K, d] (float64) and
// counts [K] (int64) of the rows by their new label.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kmeans_step(const at::Tensor& x, const at::Tensor& centers);

}  // namespace fairkernels::cpu
