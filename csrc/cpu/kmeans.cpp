// k-means assignment step: nearest center by squared Euclidean distance, streamed over row
// chunks (a chunk x K tile of dot products from BLAS), so the N x K distance matrix never exists.
#include "kernels.h"

#include "common.h"

namespace fairkernels::cpu {
namespace {

// Rows [0, rows) of one chunk: argmin_k of the SPEC 1.1 clamped distance; first minimum wins ties.
template <typename scalar_t>
void argmin_rows(const scalar_t* dots, const scalar_t* x_sq, const scalar_t* mu_sq, int64_t rows,
                 int64_t num_clusters, int64_t* labels, scalar_t* min_dist) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* row = dots + i * num_clusters;
    scalar_t best = std::numeric_limits<scalar_t>::infinity();
    int64_t best_k = 0;
    for (int64_t k = 0; k < num_clusters; ++k) {
      const scalar_t d = std::max(x_sq[i] + mu_sq[k] - scalar_t(2) * row[k], scalar_t(0));
      if (d < best) {
        best = d;
        best_k = k;
      }
    }
    labels[i] = best_k;
    min_dist[i] = best;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> kmeans_assign(const at::Tensor& x_in, const at::Tensor& centers_in) {
  check_matrix(x_in, "x");
  check_matrix(centers_in, "centers");
  TORCH_CHECK(x_in.size(1) == centers_in.size(1), "centers has ", centers_in.size(1), " columns but x has ",
              x_in.size(1));
  TORCH_CHECK(x_in.scalar_type() == centers_in.scalar_type(), "centers and x must have the same dtype");
  const at::Tensor x = x_in.contiguous(), centers = centers_in.contiguous();
  const int64_t rows = x.size(0), num_clusters = centers.size(0);
  TORCH_CHECK(num_clusters >= 1, "centers must have at least one row");
  at::Tensor labels = at::empty({rows}, x.options().dtype(at::kLong));
  at::Tensor min_dist = at::empty({rows}, x.options());
  const at::Tensor x_sq = x.mul(x).sum(1).contiguous();
  const at::Tensor mu_sq = centers.mul(centers).sum(1).contiguous();
  const at::Tensor centers_t = centers.t();
  // ~4 MB of dot products per chunk whatever N and K are.
  const int64_t chunk_rows = std::max<int64_t>(1, (int64_t(1) << 20) / num_clusters);
  at::Tensor dots = at::empty({std::min(chunk_rows, rows), num_clusters}, x.options());
  for (int64_t start = 0; start < rows; start += chunk_rows) {
    const int64_t stop = std::min(rows, start + chunk_rows);
    at::Tensor tile = dots.narrow(0, 0, stop - start);
    at::mm_out(tile, x.narrow(0, start, stop - start), centers_t);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kmeans_assign", [&] {
      argmin_rows(tile.const_data_ptr<scalar_t>(), x_sq.const_data_ptr<scalar_t>() + start,
                  mu_sq.const_data_ptr<scalar_t>(), stop - start, num_clusters,
                  labels.mutable_data_ptr<int64_t>() + start, min_dist.mutable_data_ptr<scalar_t>() + start);
    });
  }
  return {labels, min_dist};
}

}  // namespace fairkernels::cpu
