// k-means assignment step: nearest center by squared Euclidean distance, streamed over
// cache-sized row tiles (a tile x K block of dot products from BLAS, argmin fused right after),
// so the N x K distance matrix never exists.
#include "kernels.h"

#include "common.h"

#include <limits>

namespace fairkernels::cpu {
namespace {

// Rows per tile: a 256 x K block of dot products (100 KB at K = 100) and its 256 x d rows stay
// in L2 between the GEMM that writes them and the argmin that reads them.
constexpr int64_t kTileRows = 256;

// Rows [0, rows) of one tile: the nearest center by squared Euclidean distance. The argmin runs
// on m_k = |mu_k|^2 - 2 x_i.mu_k (|x_i|^2 is the same for every k) in two vectorised passes over
// the row (in L1): the minimum, then the lowest k that reaches it (ties -> lowest index; the
// index is carried as scalar_t, exact since K < 2^24). min_dist = max(|x_i|^2 + m_best, 0), the
// SPEC 1.1 clamped distance. The dot products are overwritten by m.
template <typename scalar_t>
FAIRKERNELS_MULTIVERSION void argmin_tile(const scalar_t* x, scalar_t* dots, const scalar_t* mu_sq, int64_t rows,
                                          int64_t dims, int32_t num_clusters, int64_t* labels,
                                          scalar_t* min_dist) {
  const scalar_t no_index = static_cast<scalar_t>(num_clusters);
  for (int64_t i = 0; i < rows; ++i) {
    scalar_t* row = dots + i * num_clusters;
    scalar_t best = std::numeric_limits<scalar_t>::infinity();
#pragma omp simd reduction(min : best)
    for (int32_t k = 0; k < num_clusters; ++k) {
      row[k] = mu_sq[k] - scalar_t(2) * row[k];
      best = std::min(best, row[k]);
    }
    scalar_t best_k = no_index;
#pragma omp simd reduction(min : best_k)
    for (int32_t k = 0; k < num_clusters; ++k) best_k = std::min(best_k, row[k] == best ? scalar_t(k) : no_index);
    const scalar_t* x_row = x + i * dims;
    scalar_t x_sq = 0;
#pragma omp simd reduction(+ : x_sq)
    for (int64_t j = 0; j < dims; ++j) x_sq += x_row[j] * x_row[j];
    labels[i] = best_k < no_index ? static_cast<int64_t>(best_k) : 0;  // no index: every m was NaN
    min_dist[i] = std::max(x_sq + best, scalar_t(0));
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
  const int64_t rows = x.size(0), dims = x.size(1), num_clusters = centers.size(0);
  TORCH_CHECK(num_clusters >= 1, "centers must have at least one row");
  TORCH_CHECK(num_clusters <= (int64_t(1) << 24), "centers must have at most 2^24 rows, got ", num_clusters);
  at::Tensor labels = at::empty({rows}, x.options().dtype(at::kLong));
  at::Tensor min_dist = at::empty({rows}, x.options());
  const at::Tensor mu_sq = centers.mul(centers).sum(1).contiguous();
  const at::Tensor centers_t = centers.t();
  const int64_t num_tiles = (rows + kTileRows - 1) / kTileRows;
  // Each tile is independent (one GEMM on its rows, then its argmin), so the result does not
  // depend on the thread count; BLAS runs single-threaded inside the parallel region.
#pragma omp parallel
  {
    at::Tensor dots = at::empty({std::min(kTileRows, rows), num_clusters}, x.options());
#pragma omp for schedule(static)
    for (int64_t tile_index = 0; tile_index < num_tiles; ++tile_index) {
      const int64_t start = tile_index * kTileRows, stop = std::min(rows, start + kTileRows);
      at::Tensor tile = dots.narrow(0, 0, stop - start);
      at::mm_out(tile, x.narrow(0, start, stop - start), centers_t);
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kmeans_assign", [&] {
        argmin_tile(x.const_data_ptr<scalar_t>() + start * dims, tile.mutable_data_ptr<scalar_t>(),
                    mu_sq.const_data_ptr<scalar_t>(), stop - start, dims, static_cast<int32_t>(num_clusters),
                    labels.mutable_data_ptr<int64_t>() + start, min_dist.mutable_data_ptr<scalar_t>() + start);
      });
    }
  }
  return {labels, min_dist};
}

}  // namespace fairkernels::cpu
