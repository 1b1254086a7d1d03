// Joint group x cluster histogram (SPEC 2.1): J_tk = sum_{g_i = t} w_i P_ik and its backward.
#include "kernels.h"

#include "common.h"

namespace fairkernels::cpu {
namespace {

// out[i, :] = w_i table[g_i, :]; returns true when some group lies outside [0, num_groups).
template <typename scalar_t, typename index_t>
bool gather_rows(const scalar_t* table, const index_t* groups, const scalar_t* weights, int64_t rows,
                 int64_t num_groups, int64_t num_clusters, scalar_t* out) {
  bool bad = false;
#pragma omp parallel for schedule(static) reduction(|| : bad)
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t t = static_cast<int64_t>(groups[i]);
    if (t < 0 || t >= num_groups) {
      bad = true;
      continue;
    }
    const scalar_t weight = weights ? weights[i] : scalar_t(1);
    const scalar_t* table_row = table + t * num_clusters;
    scalar_t* out_row = out + i * num_clusters;
#pragma omp simd
    for (int64_t k = 0; k < num_clusters; ++k) out_row[k] = weight * table_row[k];
  }
  return bad;
}

// Adds w_i P[i, :] into table[g_i, :] for rows [begin, end); false when a group is out of range.
template <typename scalar_t, typename index_t>
FAIRKERNELS_MULTIVERSION bool scatter_rows(const scalar_t* probs, const index_t* groups, const scalar_t* weights, int64_t begin, int64_t end,
                  int64_t num_groups, int64_t num_clusters, double* table) {
  bool ok = true;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t t = static_cast<int64_t>(groups[i]);
    if (t < 0 || t >= num_groups) {
      ok = false;
      continue;
    }
    const double weight = weights ? static_cast<double>(weights[i]) : 1.0;
    const scalar_t* row = probs + i * num_clusters;
    double* table_row = table + t * num_clusters;
#pragma omp simd
    for (int64_t k = 0; k < num_clusters; ++k) table_row[k] += weight * static_cast<double>(row[k]);
  }
  return ok;
}

}  // namespace

at::Tensor histogram_fwd(const at::Tensor& probs_in, const at::Tensor& groups_in,
                         const std::optional<at::Tensor>& weights_in, int64_t num_groups,
                         bool /*deterministic: always*/) {
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
  std::vector<char> bad(plan.num_chunks, 0);
  AT_DISPATCH_FLOATING_TYPES(dtype, "histogram_fwd", [&] {
    AT_DISPATCH_INDEX_TYPES(groups.scalar_type(), "histogram_fwd_groups", [&] {
      const scalar_t* p = probs.const_data_ptr<scalar_t>();
      const index_t* g = groups.const_data_ptr<index_t>();
      const scalar_t* w = weights.defined() ? weights.const_data_ptr<scalar_t>() : nullptr;
      parallel_chunks(plan, [&](int64_t chunk) {
        const bool ok = scatter_rows<scalar_t, index_t>(p, g, w, plan.begin(chunk), plan.end(chunk, rows), num_groups,
                                                        num_clusters, partial.data() + chunk * table_elems);
        bad[chunk] = !ok;
      });
      reduce_chunks(partial, plan.num_chunks, table_elems, joint.mutable_data_ptr<scalar_t>());
    });
  });
  TORCH_CHECK(std::none_of(bad.begin(), bad.end(), [](char b) { return b != 0; }),
              "groups must lie in [0, num_groups=", num_groups, ")");
  return joint;
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
  bool bad = false;
  AT_DISPATCH_FLOATING_TYPES(grad_joint.scalar_type(), "histogram_bwd", [&] {
    AT_DISPATCH_INDEX_TYPES(groups.scalar_type(), "histogram_bwd_groups", [&] {
      bad = gather_rows<scalar_t, index_t>(grad_joint.const_data_ptr<scalar_t>(), groups.const_data_ptr<index_t>(),
                                           weights.defined() ? weights.const_data_ptr<scalar_t>() : nullptr, rows,
                                           num_groups, num_clusters, grad.mutable_data_ptr<scalar_t>());
    });
  });
  TORCH_CHECK(!bad, "groups must lie in [0, num_groups=", num_groups, ")");
  return grad;
}

}  // namespace fairkernels::cpu
