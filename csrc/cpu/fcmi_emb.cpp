// Fused FCMI loss from embeddings (SPEC 1.2 + 3): logits = (h_i / max(|h_i|, eps)) . v_k with
// v = (u / max(|u|, eps)) / tau. Rows are streamed in small blocks (a block x K logits tile in
// cache), so the forward reads h once, the backward reads h once and writes grad_h once, and no
// N x K tensor ever exists. Same results as the chunked Python path of fairkernels/ops/fcmi.py.
#include "kernels.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>

#include "common.h"
#include "fcmi_rows.h"

namespace fairkernels::cpu {
namespace {

constexpr double kNormEps = 1e-12;   // SPEC 1.2: norms clamped below as F.normalize
constexpr int64_t kBlockRows = 64;   // rows per cache-resident tile (64 x K logits, 64 x d units)

// unit[i] = h[i] / max(|h[i]|, eps) for the rows of one block; norm[i] = |h[i]| (unclamped).
template <typename scalar_t>
FAIRKERNELS_MULTIVERSION void unit_block(const scalar_t* h, int64_t rows, int64_t dims, scalar_t* unit,
                                         scalar_t* norm) {
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* x = h + i * dims;
    scalar_t sq = 0;
#pragma omp simd reduction(+ : sq)
    for (int64_t j = 0; j < dims; ++j) sq += x[j] * x[j];
    norm[i] = std::sqrt(sq);
    const scalar_t denom = std::max(norm[i], scalar_t(kNormEps));
#pragma omp simd
    for (int64_t j = 0; j < dims; ++j) unit[i * dims + j] = x[j] / denom;
  }
}

// logits[i, k] = sum_j unit[i, j] v_t[j, k]: outer-product order, so the inner loop runs over
// K contiguous floats (no horizontal sums).
template <typename scalar_t>
FAIRKERNELS_MULTIVERSION void logits_block(const scalar_t* unit, const scalar_t* v_t, int64_t rows, int64_t dims,
                                           int64_t num_clusters, scalar_t* logits) {
  for (int64_t i = 0; i < rows; ++i) {
    scalar_t* out = logits + i * num_clusters;
    std::fill(out, out + num_clusters, scalar_t(0));
    for (int64_t j = 0; j < dims; ++j) {
      const scalar_t a = unit[i * dims + j];
      const scalar_t* v_row = v_t + j * num_clusters;
#pragma omp simd
      for (int64_t k = 0; k < num_clusters; ++k) out[k] += a * v_row[k];
    }
  }
}

// Given dL/dlogits (rows x K) of one block: grad_h = normalize_backward(h, unit, dL/dlogits v)
// (torch_kernels.normalize_backward: no radial term where the norm is clamped), and
// grad_v += dL/dlogits^T unit.
template <typename scalar_t>
FAIRKERNELS_MULTIVERSION void grad_block(const scalar_t* unit, const scalar_t* norm, const scalar_t* grad_logits,
                                         const scalar_t* v, int64_t rows, int64_t dims, int64_t num_clusters,
                                         scalar_t* grad_unit, scalar_t* grad_h, scalar_t* grad_v) {
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* u_row = unit + i * dims;
    const scalar_t* gl_row = grad_logits + i * num_clusters;
    std::fill(grad_unit, grad_unit + dims, scalar_t(0));
    for (int64_t k = 0; k < num_clusters; ++k) {
      const scalar_t gl = gl_row[k];
      const scalar_t* v_row = v + k * dims;
      scalar_t* gv_row = grad_v + k * dims;
#pragma omp simd
      for (int64_t j = 0; j < dims; ++j) {
        grad_unit[j] += gl * v_row[j];
        gv_row[j] += gl * u_row[j];
      }
    }
    scalar_t radial = 0;
#pragma omp simd reduction(+ : radial)
    for (int64_t j = 0; j < dims; ++j) radial += u_row[j] * grad_unit[j];
    if (!(norm[i] > scalar_t(kNormEps))) radial = 0;  // below the clamp the map is h / eps, linear
    const scalar_t denom = std::max(norm[i], scalar_t(kNormEps));
    scalar_t* out = grad_h + i * dims;
#pragma omp simd
    for (int64_t j = 0; j < dims; ++j) out[j] = (grad_unit[j] - radial * u_row[j]) / denom;
  }
}

at::Tensor unit_rows(const at::Tensor& x) {
  return x / x.norm(2, {1}, true).clamp_min(kNormEps);
}

void check_embeddings(const at::Tensor& h, const at::Tensor& centers, const at::Tensor& groups, double tau) {
  check_matrix(h, "h");
  check_matrix(centers, "centers");
  TORCH_CHECK(h.size(1) == centers.size(1), "centers has ", centers.size(1), " columns but h has ", h.size(1));
  TORCH_CHECK(h.scalar_type() == centers.scalar_type(), "centers and h must have the same dtype");
  TORCH_CHECK(centers.size(0) >= 1, "centers must have at least one row");
  TORCH_CHECK(tau > 0, "tau must be > 0, got ", tau);
  check_groups(groups, h.size(0));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> fcmi_emb_fwd(const at::Tensor& h_in, const at::Tensor& centers_in,
                                                            const at::Tensor& groups_in, int64_t num_groups,
                                                            double tau, bool /*deterministic: always*/) {
  check_embeddings(h_in, centers_in, groups_in, tau);
  TORCH_CHECK(num_groups >= 1, "num_groups must be >= 1, got ", num_groups);
  const at::Tensor h = h_in.contiguous(), groups = groups_in.contiguous();
  const int64_t rows = h.size(0), dims = h.size(1), num_clusters = centers_in.size(0);
  const at::Tensor v_t = (unit_rows(centers_in.contiguous()) / tau).t().contiguous();  // d x K
  at::Tensor lse = at::empty({rows}, h.options());
  at::Tensor joint = at::empty({num_groups, num_clusters}, h.options());
  at::Tensor ent_sum = at::empty({}, h.options());
  const int64_t table_elems = num_groups * num_clusters;
  const ChunkPlan plan = plan_chunks(rows, table_elems);
  std::vector<double> joint_partial(plan.num_chunks * table_elems, 0.0);
  std::vector<double> ent_partial(plan.num_chunks, 0.0);
  std::vector<GroupErrors> group_errors(plan.num_chunks);
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "fcmi_emb_fwd", [&] {
    AT_DISPATCH_INDEX_TYPES(groups.scalar_type(), "fcmi_emb_fwd_groups", [&] {
      const scalar_t* h_ptr = h.const_data_ptr<scalar_t>();
      const scalar_t* v_ptr = v_t.const_data_ptr<scalar_t>();
      const index_t* g = groups.const_data_ptr<index_t>();
      scalar_t* lse_ptr = lse.mutable_data_ptr<scalar_t>();
      parallel_chunks(plan, [&](int64_t chunk) {
        std::vector<scalar_t> unit(kBlockRows * dims), norm(kBlockRows), logits(kBlockRows * num_clusters),
            row_exp(num_clusters);
        const int64_t stop = plan.end(chunk, rows);
        for (int64_t start = plan.begin(chunk); start < stop; start += kBlockRows) {
          const int64_t block = std::min(kBlockRows, stop - start);
          unit_block(h_ptr + start * dims, block, dims, unit.data(), norm.data());
          logits_block(unit.data(), v_ptr, block, dims, num_clusters, logits.data());
          fcmi_fwd_rows<scalar_t, index_t>(logits.data(), g + start, 0, block, num_clusters, num_groups,
                                           lse_ptr + start, joint_partial.data() + chunk * table_elems,
                                           ent_partial.data() + chunk, row_exp.data(), &group_errors[chunk]);
        }
      });
      reduce_chunks(joint_partial, plan.num_chunks, table_elems, joint.mutable_data_ptr<scalar_t>());
      reduce_chunks(ent_partial, plan.num_chunks, 1, ent_sum.mutable_data_ptr<scalar_t>());
    });
  });
  raise_group_errors(group_errors, num_groups);
  return {lse, joint, ent_sum};
}

std::tuple<at::Tensor, at::Tensor> fcmi_emb_bwd(const at::Tensor& h_in, const at::Tensor& centers_in,
                                                const at::Tensor& groups_in, const at::Tensor& lse_in,
                                                const at::Tensor& table_in, const at::Tensor& logc_coef, double tau,
                                                bool /*deterministic: always*/) {
  check_embeddings(h_in, centers_in, groups_in, tau);
  const int64_t rows = h_in.size(0), dims = h_in.size(1), num_clusters = centers_in.size(0);
  TORCH_CHECK(lse_in.dim() == 1 && lse_in.size(0) == rows, "lse must be 1-D of length ", rows);
  TORCH_CHECK(table_in.dim() == 2 && table_in.size(1) == num_clusters, "table must be T x ", num_clusters);
  TORCH_CHECK(logc_coef.numel() == 1, "logc_coef must hold one value");
  const auto dtype = h_in.scalar_type();
  const at::Tensor h = h_in.contiguous(), groups = groups_in.contiguous();
  const at::Tensor centers = centers_in.contiguous();
  const at::Tensor lse = lse_in.to(dtype).contiguous(), table = table_in.to(dtype).contiguous();
  const int64_t num_groups = table.size(0);
  const at::Tensor centers_unit = unit_rows(centers);
  const at::Tensor v = (centers_unit / tau).contiguous();  // K x d
  const at::Tensor v_t = v.t().contiguous();               // d x K
  at::Tensor grad_h = at::empty_like(h);
  const int64_t grad_elems = num_clusters * dims;
  const ChunkPlan plan = plan_chunks(rows, grad_elems);
  std::vector<double> grad_v_partial(plan.num_chunks * grad_elems, 0.0);
  std::vector<GroupErrors> group_errors(plan.num_chunks);
  at::Tensor grad_v = at::empty({num_clusters, dims}, h.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "fcmi_emb_bwd", [&] {
    AT_DISPATCH_INDEX_TYPES(groups.scalar_type(), "fcmi_emb_bwd_groups", [&] {
      const scalar_t coef = logc_coef.item<double>();
      const scalar_t* h_ptr = h.const_data_ptr<scalar_t>();
      const index_t* g = groups.const_data_ptr<index_t>();
      const scalar_t* lse_ptr = lse.const_data_ptr<scalar_t>();
      scalar_t* grad_h_ptr = grad_h.mutable_data_ptr<scalar_t>();
      parallel_chunks(plan, [&](int64_t chunk) {
        std::vector<scalar_t> unit(kBlockRows * dims), norm(kBlockRows), logits(kBlockRows * num_clusters),
            grad_logits(kBlockRows * num_clusters), row_c(num_clusters), row_g(num_clusters), grad_unit(dims),
            grad_v_block(grad_elems);
        double* grad_v_chunk = grad_v_partial.data() + chunk * grad_elems;
        const int64_t stop = plan.end(chunk, rows);
        for (int64_t start = plan.begin(chunk); start < stop; start += kBlockRows) {
          const int64_t block = std::min(kBlockRows, stop - start);
          unit_block(h_ptr + start * dims, block, dims, unit.data(), norm.data());
          logits_block(unit.data(), v_t.const_data_ptr<scalar_t>(), block, dims, num_clusters, logits.data());
          fcmi_bwd_rows<scalar_t, index_t>(logits.data(), g + start, lse_ptr + start,
                                           table.const_data_ptr<scalar_t>(), coef, 0, block, num_clusters,
                                           num_groups, grad_logits.data(), row_c.data(), row_g.data(), &group_errors[chunk]);
          std::fill(grad_v_block.begin(), grad_v_block.end(), scalar_t(0));
          grad_block(unit.data(), norm.data(), grad_logits.data(), v.const_data_ptr<scalar_t>(), block, dims,
                     num_clusters, grad_unit.data(), grad_h_ptr + start * dims, grad_v_block.data());
          // Block sums (<= 64 rows) in scalar_t, chunk sums in double: accurate and cheap.
          for (int64_t e = 0; e < grad_elems; ++e) grad_v_chunk[e] += grad_v_block[e];
        }
      });
      reduce_chunks(grad_v_partial, plan.num_chunks, grad_elems, grad_v.mutable_data_ptr<scalar_t>());
    });
  });
  raise_group_errors(group_errors, num_groups);
  // v = unit / tau, then through the center normalisation (torch_kernels.normalize_backward).
  const at::Tensor grad_unit = grad_v / tau;
  const at::Tensor norm = centers.norm(2, {1}, true);
  at::Tensor radial = (centers_unit * grad_unit).sum(1, true) * centers_unit;
  radial = at::where(norm > kNormEps, radial, at::zeros_like(radial));
  return {grad_h, (grad_unit - radial) / norm.clamp_min(kNormEps)};
}

}  // namespace fairkernels::cpu
