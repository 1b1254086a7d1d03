// Per-row FCMI loops (SPEC 3) shared by the logits kernels (fcmi.cpp) and the fused embedding
// kernels (fcmi_emb.cpp). Internal linkage: each translation unit gets its own multiversioned copy.
#pragma once

#include "common.h"

namespace fairkernels::cpu {
namespace {

// One chunk of rows of the forward: writes lse, accumulates c into joint (T x K, double) and
// sum c log c into *ent. `row_exp` holds K values of exp(x - max) for the current row. A row
// with a non-finite logit adds NaN to *ent (the fused input check, see kernels.h).
template <typename scalar_t, typename index_t>
FAIRKERNELS_MULTIVERSION void fcmi_fwd_rows(const scalar_t* logits, const index_t* groups, int64_t row_begin, int64_t row_end,
                   int64_t num_clusters, int64_t num_groups, scalar_t* lse, double* joint, double* ent,
                   scalar_t* row_exp, GroupErrors* group_errors) {
  double ent_chunk = 0.0;
  for (int64_t i = row_begin; i < row_end; ++i) {
    const scalar_t* x = logits + i * num_clusters;
    const int64_t g = static_cast<int64_t>(groups[i]);
    if (group_errors->out_of_range(g, num_groups)) continue;
    scalar_t row_max = x[0];
    scalar_t probe = 0;  // 0, or NaN when the row holds +-inf / NaN
#pragma omp simd reduction(max : row_max) reduction(+ : probe)
    for (int64_t k = 0; k < num_clusters; ++k) {
      row_max = std::max(row_max, x[k]);
      probe += finite_probe(x[k]);
    }
    scalar_t exp_sum = 0;
#pragma omp simd reduction(+ : exp_sum)
    for (int64_t k = 0; k < num_clusters; ++k) {
      row_exp[k] = fast_exp<scalar_t>(x[k] - row_max);
      exp_sum += row_exp[k];
    }
    const scalar_t log_sum = std::log(exp_sum);
    const scalar_t inv_sum = scalar_t(1) / exp_sum;
    lse[i] = row_max + log_sum;
    double* joint_row = joint + g * num_clusters;
    scalar_t ent_row = 0;
    // log c = (x - max) - log(sum exp): stable for any logit magnitude (SPEC 3).
#pragma omp simd reduction(+ : ent_row)
    for (int64_t k = 0; k < num_clusters; ++k) {
      const scalar_t c = row_exp[k] * inv_sum;
      joint_row[k] += static_cast<double>(c);
      ent_row += c * ((x[k] - row_max) - log_sum);
    }
    ent_chunk += static_cast<double>(ent_row + probe);
  }
  *ent += ent_chunk;
}

template <typename scalar_t, typename index_t>
FAIRKERNELS_MULTIVERSION void fcmi_bwd_rows(const scalar_t* logits, const index_t* groups, const scalar_t* lse, const scalar_t* table,
                   scalar_t logc_coef, int64_t row_begin, int64_t row_end, int64_t num_clusters,
                   int64_t num_groups, scalar_t* grad, scalar_t* row_c, scalar_t* row_g, GroupErrors* group_errors) {
  for (int64_t i = row_begin; i < row_end; ++i) {
    const scalar_t* x = logits + i * num_clusters;
    scalar_t* out = grad + i * num_clusters;
    const int64_t g = static_cast<int64_t>(groups[i]);
    if (group_errors->out_of_range(g, num_groups)) continue;
    const scalar_t* table_row = table + g * num_clusters;
    const scalar_t row_lse = lse[i];
    scalar_t weighted = 0;  // sum_k c_ik G_ik
#pragma omp simd reduction(+ : weighted)
    for (int64_t k = 0; k < num_clusters; ++k) {
      const scalar_t log_c = x[k] - row_lse;
      const scalar_t c = fast_exp<scalar_t>(log_c);
      const scalar_t grad_c = table_row[k] - logc_coef * log_c;
      row_c[k] = c;
      row_g[k] = grad_c;
      weighted += c * grad_c;
    }
#pragma omp simd
    for (int64_t k = 0; k < num_clusters; ++k) out[k] = row_c[k] * (row_g[k] - weighted);
  }
}

}  // namespace
}  // namespace fairkernels::cpu
