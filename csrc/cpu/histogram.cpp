// Joint group x cluster histogram (SPEC 2.1): J_tk = sum_{g_i = t} w_i P_ik and its backward.
#include "kernels.h"

#include "common.h"

namespace fairkernels::cpu {
namespace {

// Values seen by one chunk of rows that the fused input check reports (histogram_fwd_checked).
struct ValueFlags {
  bool probs_not_finite = false;
  bool probs_negative = false;
  bool weights_not_finite = false;
};

// out[i, :] = w_i table[g_i, :] for rows [begin, end); out-of-range groups are recorded.
template <typename scalar_t, typename index_t>
void gather_rows(const scalar_t* table, const index_t* groups, const scalar_t* weights, int64_t begin, int64_t end,
                 int64_t num_groups, int64_t num_clusters, scalar_t* out, GroupErrors* group_errors) {
  for (int64_t i = begin; i < end; ++i) {
    const int64_t t = static_cast<int64_t>(groups[i]);
    if (group_errors->out_of_range(t, num_groups)) continue;
    const scalar_t weight = weights ? weights[i] : scalar_t(1);
    const scalar_t* table_row = table + t * num_clusters;
    scalar_t* out_row = out + i * num_clusters;
#pragma omp simd
    for (int64_t k = 0; k < num_clusters; ++k) out_row[k] = weight * table_row[k];
  }
}

// Adds w_i P[i, :] into table[g_i, :] for rows [begin, end). kCheck: also finds non-finite or
// negative probabilities and non-finite weights in the same read (SPEC 7 input checks).
template <bool kCheck, typename scalar_t, typename index_t>
FAIRKERNELS_MULTIVERSION void scatter_rows(const scalar_t* probs, const index_t* groups, const scalar_t* weights,
                                           int64_t begin, int64_t end, int64_t num_groups, int64_t num_clusters,
                                           double* table, GroupErrors* group_errors, ValueFlags* flags) {
  scalar_t probe = 0, lowest = 0, weight_probe = 0;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t t = static_cast<int64_t>(groups[i]);
    if (group_errors->out_of_range(t, num_groups)) continue;
    const double weight = weights ? static_cast<double>(weights[i]) : 1.0;
    if (kCheck && weights) weight_probe += finite_probe(weights[i]);
    const scalar_t* row = probs + i * num_clusters;
    double* table_row = table + t * num_clusters;
    if (kCheck) {
#pragma omp simd reduction(+ : probe) reduction(min : lowest)
      for (int64_t k = 0; k < num_clusters; ++k) {
        table_row[k] += weight * static_cast<double>(row[k]);
        probe += finite_probe(row[k]);
        lowest = std::min(lowest, row[k]);
      }
    } else {
#pragma omp simd
      for (int64_t k = 0; k < num_clusters; ++k) table_row[k] += weight * static_cast<double>(row[k]);
    }
  }
  if (kCheck) {
    flags->probs_not_finite = !(probe == 0);
    flags->probs_negative = lowest < 0;
    flags->weights_not_finite = !(weight_probe == 0);
  }
}

// The shared body of histogram_fwd and histogram_fwd_checked.
template <bool kCheck>
at::Tensor histogram_table(const at::Tensor& probs_in, const at::Tensor& groups_in,
                           const std::optional<at::Tensor>& weights_in, int64_t num_groups, ValueFlags* flags) {
  check_matrix(probs_in, "probs");
  const int64_t rows = probs_in.size(0), num_clusters = probs_in.size(1);
  check_groups(groups_in, rows);
  TORCH_CHECK(num_groups >= 1, "num_groups must be >= 1, got ", num_groups);
  const auto dtype = probs_in.scalar_type();
  const at::Tensor probs = probs_in.contiguous();
  const at::Tensor groups = groups_in.contiguous();
  at::Tensor weights;
  if (weights_in.has_value()) {
    TORCH_CHECK(weights_in->dim() == 1 && weights_in->size(0) == rows, "weights must be 1-D of length ", rows);
    weights = weights_in->to(dtype).contiguous();
  }
  at::Tensor joint = at::empty({num_groups, num_clusters}, probs.options());
  const int64_t table_elems = num_groups * num_clusters;
  const ChunkPlan plan = plan_chunks(rows, table_elems);
  std::vector<double> partial(plan.num_chunks * table_elems, 0.0);
  std::vector<GroupErrors> group_errors(plan.num_chunks);
  std::vector<ValueFlags> chunk_flags(plan.num_chunks);
  AT_DISPATCH_FLOATING_TYPES(dtype, "histogram_fwd", [&] {
    AT_DISPATCH_INDEX_TYPES(groups.scalar_type(), "histogram_fwd_groups", [&] {
      const scalar_t* p = probs.const_data_ptr<scalar_t>();
      const index_t* g = groups.const_data_ptr<index_t>();
      const scalar_t* w = weights.defined() ? weights.const_data_ptr<scalar_t>() : nullptr;
      parallel_chunks(plan, [&](int64_t chunk) {
        scatter_rows<kCheck, scalar_t, index_t>(p, g, w, plan.begin(chunk), plan.end(chunk, rows), num_groups,
                                                num_clusters, partial.data() + chunk * table_elems,
                                                &group_errors[chunk], &chunk_flags[chunk]);
      });
      reduce_chunks(partial, plan.num_chunks, table_elems, joint.mutable_data_ptr<scalar_t>());
    });
  });
  raise_group_errors(group_errors, num_groups);
  for (const ValueFlags& f : chunk_flags) {
    flags->probs_not_finite |= f.probs_not_finite;
    flags->probs_negative |= f.probs_negative;
    flags->weights_not_finite |= f.weights_not_finite;
  }
  return joint;
}

}  // namespace

at::Tensor histogram_fwd(const at::Tensor& probs, const at::Tensor& groups,
                         const std::optional<at::Tensor>& weights, int64_t num_groups,
                         bool /*deterministic: always*/) {
  ValueFlags unused;
  return histogram_table<false>(probs, groups, weights, num_groups, &unused);
}

std::tuple<at::Tensor, at::Tensor> histogram_fwd_checked(const at::Tensor& probs, const at::Tensor& groups,
                                                         const std::optional<at::Tensor>& weights,
                                                         int64_t num_groups, bool /*deterministic: always*/) {
  ValueFlags flags;
  at::Tensor joint = histogram_table<true>(probs, groups, weights, num_groups, &flags);
  at::Tensor out = at::empty({3}, probs.options().dtype(at::kLong));
  int64_t* out_ptr = out.mutable_data_ptr<int64_t>();
  out_ptr[0] = flags.probs_not_finite;
  out_ptr[1] = flags.probs_negative;
  out_ptr[2] = flags.weights_not_finite;
  return {joint, out};
}

at::Tensor histogram_bwd(const at::Tensor& grad_joint_in, const at::Tensor& groups_in,
                         const std::optional<at::Tensor>& weights_in) {
  check_matrix(grad_joint_in, "grad_joint");
  const at::Tensor grad_joint = grad_joint_in.contiguous();
  const int64_t num_groups = grad_joint.size(0), num_clusters = grad_joint.size(1);
  const at::Tensor groups = groups_in.contiguous();
  TORCH_CHECK(groups.dim() == 1, "groups must be 1-D");
  const int64_t rows = groups.size(0);
  check_groups(groups, rows);
  at::Tensor weights;
  if (weights_in.has_value()) {
    TORCH_CHECK(weights_in->dim() == 1 && weights_in->size(0) == rows, "weights must be 1-D of length ", rows);
    weights = weights_in->to(grad_joint.scalar_type()).contiguous();
  }
  at::Tensor grad = at::empty({rows, num_clusters}, grad_joint.options());
  const ChunkPlan plan = plan_chunks(rows, 0);
  std::vector<GroupErrors> group_errors(plan.num_chunks);
  AT_DISPATCH_FLOATING_TYPES(grad_joint.scalar_type(), "histogram_bwd", [&] {
    AT_DISPATCH_INDEX_TYPES(groups.scalar_type(), "histogram_bwd_groups", [&] {
      parallel_chunks(plan, [&](int64_t chunk) {
        gather_rows<scalar_t, index_t>(grad_joint.const_data_ptr<scalar_t>(), groups.const_data_ptr<index_t>(),
                                       weights.defined() ? weights.const_data_ptr<scalar_t>() : nullptr,
                                       plan.begin(chunk), plan.end(chunk, rows), num_groups, num_clusters,
                                       grad.mutable_data_ptr<scalar_t>(), &group_errors[chunk]);
      });
    });
  });
  raise_group_errors(group_errors, num_groups);
  return grad;
}

}  // namespace fairkernels::cpu
