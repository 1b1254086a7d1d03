// Soft assignments: Student-t (SPEC 1.1) and cosine softmax (SPEC 1.2). The dot products come
// from BLAS (at::mm); everything after them runs in one fused OpenMP pass over the N x K tile.
#include "kernels.h"

#include <ATen/TensorOperators.h>

#include "common.h"

namespace fairkernels::cpu {
namespace {

constexpr double kNormEps = 1e-12;  // SPEC 1.2: norms clamped below as F.normalize

// centred[i] = x[i] - shift and sq[i] = |x[i] - shift|^2, in one pass over x.
template <typename scalar_t>
void centre_rows(const scalar_t* x, const scalar_t* shift, int64_t rows, int64_t dims, scalar_t* centred,
                 scalar_t* sq) {
  parallel_rows(rows, dims, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      scalar_t total = 0;
#pragma omp simd reduction(+ : total)
      for (int64_t j = 0; j < dims; ++j) {
        const scalar_t v = x[i * dims + j] - shift[j];
        centred[i * dims + j] = v;
        total += v * v;
      }
      sq[i] = total;
    }
  });
}

// In place on a K-vector: v <- softmax(v).
template <typename scalar_t>
inline void softmax_row(scalar_t* v, int64_t num_clusters) {
  scalar_t row_max = v[0];
#pragma omp simd reduction(max : row_max)
  for (int64_t k = 0; k < num_clusters; ++k) row_max = std::max(row_max, v[k]);
  scalar_t total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t k = 0; k < num_clusters; ++k) {
    v[k] = fast_exp<scalar_t>(v[k] - row_max);
    total += v[k];
  }
  const scalar_t inv_total = scalar_t(1) / total;
#pragma omp simd
  for (int64_t k = 0; k < num_clusters; ++k) v[k] *= inv_total;
}

// SPEC 1.1 distance: d_ik = ||z_i||^2 + ||mu_k||^2 - 2 z_i.mu_k clamped at 0, evaluated on data and
// centres shifted by the centres' mean (see CentredPair): the distance is shift-invariant, and
// the expansion then cancels terms of the size of the spread around the centres, not of the
// embeddings' norm.
template <typename scalar_t>
inline scalar_t clamped_distance(scalar_t z_sq, scalar_t mu_sq, scalar_t dot) {
  return std::max(z_sq + mu_sq - scalar_t(2) * dot, scalar_t(0));
}

// Gradient through x / max(||x||, eps) (torch_kernels.normalize_backward), row by row, in place
// on grad (dL/d unit in, dL/dx out).
template <typename scalar_t>
void normalize_backward_rows(const scalar_t* x, int64_t rows, int64_t dims, scalar_t* grad) {
  parallel_rows(rows, dims, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* x_row = x + i * dims;
      scalar_t* g_row = grad + i * dims;
      scalar_t sq = 0;
#pragma omp simd reduction(+ : sq)
      for (int64_t j = 0; j < dims; ++j) sq += x_row[j] * x_row[j];
      const scalar_t norm = std::sqrt(sq);
      const scalar_t inv_norm = scalar_t(1) / std::max(norm, scalar_t(kNormEps));
      scalar_t radial = 0;  // <unit, grad_unit>
#pragma omp simd reduction(+ : radial)
      for (int64_t j = 0; j < dims; ++j) radial += x_row[j] * inv_norm * g_row[j];
      // Below the clamp the map is x / eps, linear: no radial term.
      if (!(norm > scalar_t(kNormEps))) radial = 0;
#pragma omp simd
      for (int64_t j = 0; j < dims; ++j) g_row[j] = (g_row[j] - radial * x_row[j] * inv_norm) * inv_norm;
    }
  });
}

// SPEC 1.1 forward epilogue, in place on the N x K dot products: q = softmax_k(-(a+1)/2 log1p(d / a)).
template <typename scalar_t>
void student_t_epilogue(const scalar_t* z_sq, const scalar_t* mu_sq, int64_t rows, int64_t num_clusters,
                        double alpha, scalar_t* dots) {
  const scalar_t exponent = -(alpha + 1.0) / 2.0, inv_alpha = 1.0 / alpha;
  parallel_rows(rows, num_clusters, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* row = dots + i * num_clusters;
      for (int64_t k = 0; k < num_clusters; ++k)
        row[k] = exponent * std::log1p(clamped_distance(z_sq[i], mu_sq[k], row[k]) * inv_alpha);
      softmax_row(row, num_clusters);
    }
  });
}

// SPEC 1.1 backward epilogue, in place on the dot products: S = q (G - <q, G>),
// c = S (-(a+1)/2) / (a + d); also the row sums of c.
template <typename scalar_t>
void student_t_grad_epilogue(const scalar_t* q, const scalar_t* grad_q, const scalar_t* z_sq, const scalar_t* mu_sq,
                             int64_t rows, int64_t num_clusters, double alpha, scalar_t* dots, scalar_t* row_sum) {
  const scalar_t a = alpha, exponent = -(alpha + 1.0) / 2.0;
  parallel_rows(rows, num_clusters, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* q_row = q + i * num_clusters;
      const scalar_t* g_row = grad_q + i * num_clusters;
      scalar_t* c_row = dots + i * num_clusters;
      scalar_t weighted = 0;
#pragma omp simd reduction(+ : weighted)
      for (int64_t k = 0; k < num_clusters; ++k) weighted += q_row[k] * g_row[k];
      scalar_t total = 0;
#pragma omp simd reduction(+ : total)
      for (int64_t k = 0; k < num_clusters; ++k) {
        const scalar_t s = q_row[k] * (g_row[k] - weighted);
        c_row[k] = s * exponent / (a + clamped_distance(z_sq[i], mu_sq[k], c_row[k]));
        total += c_row[k];
      }
      row_sum[i] = total;
    }
  });
}

// SPEC 1.2 forward epilogue, in place on <h_i, u_k/|u_k|>: c = softmax_k(dot / (max(|h_i|, eps) tau)).
template <typename scalar_t>
void cosine_epilogue(const scalar_t* inv_norm, int64_t rows, int64_t num_clusters, double tau, scalar_t* dots) {
  const scalar_t inv_tau = 1.0 / tau;
  parallel_rows(rows, num_clusters, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* row = dots + i * num_clusters;
      const scalar_t scale = inv_norm[i] * inv_tau;
#pragma omp simd
      for (int64_t k = 0; k < num_clusters; ++k) row[k] *= scale;
      softmax_row(row, num_clusters);
    }
  });
}

// Softmax backward with the 1/tau of the logits: grad_s = c (G - <c, G>) / tau.
template <typename scalar_t>
void softmax_grad(const scalar_t* c, const scalar_t* grad_c, int64_t rows, int64_t num_clusters, double tau,
                  scalar_t* grad_s) {
  const scalar_t inv_tau = 1.0 / tau;
  parallel_rows(rows, num_clusters, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* c_row = c + i * num_clusters;
      const scalar_t* g_row = grad_c + i * num_clusters;
      scalar_t weighted = 0;
#pragma omp simd reduction(+ : weighted)
      for (int64_t k = 0; k < num_clusters; ++k) weighted += c_row[k] * g_row[k];
#pragma omp simd
      for (int64_t k = 0; k < num_clusters; ++k) grad_s[i * num_clusters + k] = c_row[k] * (g_row[k] - weighted) * inv_tau;
    }
  });
}

// z and the centres shifted by the centres' mean, with their squared norms. Student-t
// distances and their gradients are invariant under a common shift; after it the expansion
// |z|^2 + |mu|^2 - 2 z.mu cancels terms of the size of the data's spread around the centres
// instead of the embeddings' norm (float32 relative error ~1e-6 at norm 10^3, not ~1e-2).
struct CentredPair {
  at::Tensor z, centers, z_sq, mu_sq;
};

CentredPair centre_pair(const at::Tensor& z_in, const at::Tensor& centers_in) {
  const at::Tensor z = z_in.contiguous(), centers = centers_in.contiguous();
  const int64_t rows = z.size(0), num_clusters = centers.size(0), dims = z.size(1);
  const at::Tensor shift = centers.mean(0).contiguous();
  CentredPair pair{at::empty_like(z), at::empty_like(centers), at::empty({rows}, z.options()),
                   at::empty({num_clusters}, z.options())};
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "centre_pair", [&] {
    const scalar_t* m = shift.const_data_ptr<scalar_t>();
    centre_rows(z.const_data_ptr<scalar_t>(), m, rows, dims, pair.z.mutable_data_ptr<scalar_t>(),
                pair.z_sq.mutable_data_ptr<scalar_t>());
    centre_rows(centers.const_data_ptr<scalar_t>(), m, num_clusters, dims, pair.centers.mutable_data_ptr<scalar_t>(),
                pair.mu_sq.mutable_data_ptr<scalar_t>());
  });
  return pair;
}

at::Tensor unit_rows(const at::Tensor& x) {
  return x / x.norm(2, {1}, true).clamp_min(kNormEps);
}

at::Tensor inverse_row_norms(const at::Tensor& x) {
  return x.norm(2, {1}, false).clamp_min(kNormEps).reciprocal();
}

void check_pair(const at::Tensor& x, const char* name, const at::Tensor& centers) {
  check_matrix(x, name);
  check_matrix(centers, "centers");
  TORCH_CHECK(x.size(1) == centers.size(1), "centers has ", centers.size(1), " columns but ", name, " has ",
              x.size(1));
  TORCH_CHECK(x.scalar_type() == centers.scalar_type(), "centers and ", name, " must have the same dtype");
  // The softmax epilogues start from v[0] of every row: K = 0 would read past an empty tile.
  TORCH_CHECK(centers.size(0) >= 1, "centers must have at least one row");
}

void check_like(const at::Tensor& t, const char* name, int64_t rows, int64_t cols, at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name, " must be ", rows, " x ", cols);
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype);
}

}  // namespace

at::Tensor student_t_fwd(const at::Tensor& z_in, const at::Tensor& centers_in, double alpha) {
  check_pair(z_in, "z", centers_in);
  TORCH_CHECK(alpha > 0, "alpha must be > 0, got ", alpha);
  const CentredPair pair = centre_pair(z_in, centers_in);
  const int64_t rows = pair.z.size(0), num_clusters = pair.centers.size(0);
  at::Tensor q = at::mm(pair.z, pair.centers.t());  // dot products, overwritten by q below
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "student_t_fwd", [&] {
    student_t_epilogue(pair.z_sq.const_data_ptr<scalar_t>(), pair.mu_sq.const_data_ptr<scalar_t>(), rows,
                       num_clusters, alpha, q.mutable_data_ptr<scalar_t>());
  });
  return q;
}

std::tuple<at::Tensor, at::Tensor> student_t_bwd(const at::Tensor& grad_q_in, const at::Tensor& q_in,
                                                 const at::Tensor& z_in, const at::Tensor& centers_in, double alpha) {
  check_pair(z_in, "z", centers_in);
  const int64_t rows = z_in.size(0), num_clusters = centers_in.size(0);
  check_like(q_in, "q", rows, num_clusters, z_in.scalar_type());
  check_like(grad_q_in, "grad_q", rows, num_clusters, z_in.scalar_type());
  const at::Tensor q = q_in.contiguous(), grad_q = grad_q_in.contiguous();
  const CentredPair pair = centre_pair(z_in, centers_in);
  const at::Tensor& z = pair.z;
  const at::Tensor& centers = pair.centers;
  at::Tensor coef = at::mm(z, centers.t());  // dot products, overwritten by c_ik below
  at::Tensor coef_row_sum = at::empty({rows, 1}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "student_t_bwd", [&] {
    student_t_grad_epilogue(q.const_data_ptr<scalar_t>(), grad_q.const_data_ptr<scalar_t>(),
                            pair.z_sq.const_data_ptr<scalar_t>(), pair.mu_sq.const_data_ptr<scalar_t>(), rows,
                            num_clusters, alpha, coef.mutable_data_ptr<scalar_t>(),
                            coef_row_sum.mutable_data_ptr<scalar_t>());
  });
  // dL/dz = 2 (rowsum(c) z - c mu),  dL/dmu = -2 (c^T z - colsum(c) mu): shift-invariant, so the
  // centred z and mu give the same gradients without the cancellation of the raw ones.
  at::Tensor grad_z = (coef_row_sum * z - at::mm(coef, centers)).mul_(2.0);
  at::Tensor grad_centers = (coef.sum(0).unsqueeze(1) * centers - at::mm(coef.t(), z)).mul_(2.0);
  return {grad_z, grad_centers};
}

at::Tensor cosine_fwd(const at::Tensor& h_in, const at::Tensor& centers_in, double tau) {
  check_pair(h_in, "h", centers_in);
  TORCH_CHECK(tau > 0, "tau must be > 0, got ", tau);
  const at::Tensor h = h_in.contiguous();
  const at::Tensor centers_unit = unit_rows(centers_in.contiguous());
  const at::Tensor inv_norm = inverse_row_norms(h);
  const int64_t rows = h.size(0), num_clusters = centers_unit.size(0);
  // <h_i, u_k / |u_k|>; the 1 / max(|h_i|, eps) row scale is folded into the epilogue.
  at::Tensor c = at::mm(h, centers_unit.t());
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "cosine_fwd", [&] {
    cosine_epilogue(inv_norm.const_data_ptr<scalar_t>(), rows, num_clusters, tau, c.mutable_data_ptr<scalar_t>());
  });
  return c;
}

std::tuple<at::Tensor, at::Tensor> cosine_bwd(const at::Tensor& grad_c_in, const at::Tensor& c_in,
                                              const at::Tensor& h_in, const at::Tensor& centers_in, double tau) {
  check_pair(h_in, "h", centers_in);
  const at::Tensor h = h_in.contiguous(), centers = centers_in.contiguous();
  const int64_t rows = h.size(0), num_clusters = centers.size(0), dims = h.size(1);
  check_like(c_in, "c", rows, num_clusters, h.scalar_type());
  check_like(grad_c_in, "grad_c", rows, num_clusters, h.scalar_type());
  const at::Tensor c = c_in.contiguous(), grad_c = grad_c_in.contiguous();
  const at::Tensor centers_unit = unit_rows(centers);
  const at::Tensor inv_norm = inverse_row_norms(h);
  at::Tensor grad_s = at::empty({rows, num_clusters}, h.options());
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "cosine_bwd_softmax", [&] {
    softmax_grad(c.const_data_ptr<scalar_t>(), grad_c.const_data_ptr<scalar_t>(), rows, num_clusters, tau,
                 grad_s.mutable_data_ptr<scalar_t>());
  });
  at::Tensor grad_h = at::mm(grad_s, centers_unit);  // dL/d(h unit), then through the normalisation
  // dL/d(u unit) = grad_s^T (h / |h|) = (diag(1/|h|) grad_s)^T h: no N x d unit copy of h.
  at::Tensor grad_centers = at::mm(grad_s.mul_(inv_norm.unsqueeze(1)).t(), h);
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "cosine_bwd_normalize", [&] {
    normalize_backward_rows(h.const_data_ptr<scalar_t>(), rows, dims, grad_h.mutable_data_ptr<scalar_t>());
    normalize_backward_rows(centers.const_data_ptr<scalar_t>(), num_clusters, dims,
                            grad_centers.mutable_data_ptr<scalar_t>());
  });
  return {grad_h, grad_centers};
}

}  // namespace fairkernels::cpu
