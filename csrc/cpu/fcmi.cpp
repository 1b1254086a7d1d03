// Fused FCMI loss kernels (SPEC 3): one read of the logits in the forward, one read and one
// write in the backward, no N x K temporary.
#include "kernels.h"

#include "common.h"
#include "fcmi_rows.h"

namespace fairkernels::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> fcmi_fwd(const at::Tensor& logits_in, const at::Tensor& groups_in,
                                                        int64_t num_groups, bool /*deterministic: always*/) {
  check_matrix(logits_in, "logits");
  check_groups(groups_in, logits_in.size(0));
  TORCH_CHECK(num_groups >= 1, "num_groups must be >= 1, got ", num_groups);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor groups = groups_in.contiguous();
  const int64_t rows = logits.size(0), num_clusters = logits.size(1);
  TORCH_CHECK(num_clusters >= 1, "logits must have at least one column");
  at::Tensor lse = at::empty({rows}, logits.options());
  at::Tensor joint = at::empty({num_groups, num_clusters}, logits.options());
  at::Tensor ent_sum = at::empty({}, logits.options());
  const int64_t table_elems = num_groups * num_clusters;
  const ChunkPlan plan = plan_chunks(rows, table_elems);
  std::vector<double> joint_partial(plan.num_chunks * table_elems, 0.0);
  std::vector<double> ent_partial(plan.num_chunks, 0.0);
  std::vector<GroupErrors> group_errors(plan.num_chunks);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "fcmi_fwd", [&] {
    AT_DISPATCH_INDEX_TYPES(groups.scalar_type(), "fcmi_fwd_groups", [&] {
      const scalar_t* x = logits.const_data_ptr<scalar_t>();
      const index_t* g = groups.const_data_ptr<index_t>();
      scalar_t* lse_ptr = lse.mutable_data_ptr<scalar_t>();
      parallel_chunks(plan, [&](int64_t chunk) {
        std::vector<scalar_t> row_exp(num_clusters);
        fcmi_fwd_rows<scalar_t, index_t>(x, g, plan.begin(chunk), plan.end(chunk, rows), num_clusters, num_groups,
                                         lse_ptr, joint_partial.data() + chunk * table_elems,
                                         ent_partial.data() + chunk, row_exp.data(), &group_errors[chunk]);
      });
      reduce_chunks(joint_partial, plan.num_chunks, table_elems, joint.mutable_data_ptr<scalar_t>());
      reduce_chunks(ent_partial, plan.num_chunks, 1, ent_sum.mutable_data_ptr<scalar_t>());
    });
  });
  raise_group_errors(group_errors, num_groups);
  return {lse, joint, ent_sum};
}

at::Tensor fcmi_bwd(const at::Tensor& logits_in, const at::Tensor& groups_in, const at::Tensor& lse_in,
                    const at::Tensor& table_in, const at::Tensor& logc_coef, bool /*deterministic: always*/) {
  check_matrix(logits_in, "logits");
  const int64_t rows = logits_in.size(0), num_clusters = logits_in.size(1);
  check_groups(groups_in, rows);
  TORCH_CHECK(lse_in.dim() == 1 && lse_in.size(0) == rows, "lse must be 1-D of length ", rows);
  TORCH_CHECK(table_in.dim() == 2 && table_in.size(1) == num_clusters, "table must be T x ", num_clusters);
  TORCH_CHECK(logc_coef.numel() == 1, "logc_coef must hold one value");
  const auto dtype = logits_in.scalar_type();
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor groups = groups_in.contiguous();
  const at::Tensor lse = lse_in.to(dtype).contiguous();
  const at::Tensor table = table_in.to(dtype).contiguous();
  const int64_t num_groups = table.size(0);
  at::Tensor grad = at::empty_like(logits);
  const ChunkPlan plan = plan_chunks(rows, 0);
  std::vector<GroupErrors> group_errors(plan.num_chunks);
  AT_DISPATCH_FLOATING_TYPES(dtype, "fcmi_bwd", [&] {
    AT_DISPATCH_INDEX_TYPES(groups.scalar_type(), "fcmi_bwd_groups", [&] {
      const scalar_t coef = logc_coef.item<double>();
      const scalar_t* x = logits.const_data_ptr<scalar_t>();
      const index_t* g = groups.const_data_ptr<index_t>();
      parallel_chunks(plan, [&](int64_t chunk) {
        std::vector<scalar_t> row_c(num_clusters), row_g(num_clusters);
        fcmi_bwd_rows<scalar_t, index_t>(x, g, lse.const_data_ptr<scalar_t>(), table.const_data_ptr<scalar_t>(),
                                         coef, plan.begin(chunk), plan.end(chunk, rows), num_clusters, num_groups,
                                         grad.mutable_data_ptr<scalar_t>(), row_c.data(), row_g.data(),
                                         &group_errors[chunk]);
      });
    });
  });
  raise_group_errors(group_errors, num_groups);
  return grad;
}

}  // namespace fairkernels::cpu
