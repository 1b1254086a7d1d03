// k-means on the CPU: the assignment step (nearest center by squared Euclidean distance) and the
// fused Lloyd step (assignment + per-cluster sums and counts in the same pass over x).
//
// The distances come from a register-blocked micro-kernel instead of a BLAS call per tile: for
// 6 rows x 16 centers it keeps the 12 vector accumulators of m_k = |mu_k|^2 - 2 x.mu_k in
// registers over the d FMAs and folds them into a running per-lane minimum, so no tile x K block
// of dot products is ever written to memory, and the labels, the clamped distance and the
// per-cluster sums follow from the rows while they are still in L1. The centers are packed once
// per call as -2 mu in 32-byte column groups (zero padding, +inf |mu|^2 padding: never chosen).
#include "kernels.h"

#include "common.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>

#include <limits>

// The vector helpers below pass 32-byte vectors by value; they are always inlined, so the ABI
// note GCC gives for the baseline build does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace fairkernels::cpu {
namespace {

// One 32-byte SIMD vector (8 floats or 4 doubles; two SSE registers on the baseline build).
template <typename scalar_t>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
  typedef int32_t index __attribute__((vector_size(32)));  // lane indices for __builtin_shuffle
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
  typedef int64_t index __attribute__((vector_size(32)));
};

template <typename scalar_t>
constexpr int64_t kLanes = 32 / sizeof(scalar_t);
// Micro-kernel tile: kRows rows x kGroups column groups of kLanes centers. 12 accumulators, 2
// center loads and 1 broadcast fit the 16 vector registers of AVX2.
constexpr int64_t kRows = 6;
constexpr int64_t kGroups = 2;
// Rows per cache tile: the tile's rows (240 x d) stay in L1/L2 while every column block of the
// packed centers (d x 16, in L1) passes over them, for any d and K.
constexpr int64_t kTileRows = 40 * kRows;

// Centers as the micro-kernel reads them. neg2_mu: [groups][dims][kLanes], -2 mu_kj (0 in the
// padding columns); mu_sq: [groups * kLanes], |mu_k|^2 (+inf in the padding).
template <typename scalar_t>
struct PackedCenters {
  at::Tensor neg2_mu, mu_sq;
  int64_t num_groups;
};

template <typename scalar_t>
PackedCenters<scalar_t> pack_centers(const at::Tensor& centers) {
  const int64_t num_clusters = centers.size(0), dims = centers.size(1), lanes = kLanes<scalar_t>;
  const int64_t num_groups = (num_clusters + lanes - 1) / lanes;
  at::Tensor neg2_mu = at::zeros({num_groups, dims, lanes}, centers.options());
  at::Tensor mu_sq = at::full({num_groups * lanes}, std::numeric_limits<scalar_t>::infinity(), centers.options());
  const scalar_t* mu = centers.const_data_ptr<scalar_t>();
  scalar_t* packed = neg2_mu.mutable_data_ptr<scalar_t>();
  scalar_t* sq = mu_sq.mutable_data_ptr<scalar_t>();
  for (int64_t k = 0; k < num_clusters; ++k) {
    scalar_t total = 0;
    for (int64_t j = 0; j < dims; ++j) {
      const scalar_t value = mu[k * dims + j];
      total += value * value;
      packed[((k / lanes) * dims + j) * lanes + k % lanes] = scalar_t(-2) * value;
    }
    sq[k] = total;
  }
  return {neg2_mu, mu_sq, num_groups};
}

// Where one call writes: labels/min_dist per row; sums [K, d] (float64) and counts [K] when the
// call accumulates (nullptr otherwise), for the rows of one chunk.
template <typename scalar_t>
struct ChunkOut {
  int64_t* labels;
  scalar_t* min_dist;
  double* sums;
  int64_t* counts;
};

template <typename vec>
__attribute__((always_inline)) inline vec vec_min(vec a, vec b) {
  return a < b ? a : b;
}

// v with its lanes permuted by constant indices (GCC and Clang spell the builtin differently).
#if defined(__clang__)
#define FAIRKERNELS_PERMUTE(v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
#else
#define FAIRKERNELS_PERMUTE(v, ...) __builtin_shuffle(v, typename Vec<scalar_t>::index{__VA_ARGS__})
#endif

// Every lane of the result holds op-reduction (minimum, sum) over the lanes of v: log2(lanes)
// butterfly shuffles with constant masks.
template <typename scalar_t, typename Op>
__attribute__((always_inline)) inline typename Vec<scalar_t>::type lane_reduce(typename Vec<scalar_t>::type v,
                                                                               Op op) {
  if constexpr (kLanes<scalar_t> == 8) {
    v = op(v, FAIRKERNELS_PERMUTE(v, 4, 5, 6, 7, 0, 1, 2, 3));
    v = op(v, FAIRKERNELS_PERMUTE(v, 2, 3, 0, 1, 6, 7, 4, 5));
    v = op(v, FAIRKERNELS_PERMUTE(v, 1, 0, 3, 2, 5, 4, 7, 6));
  } else {
    static_assert(kLanes<scalar_t> == 4, "32-byte vectors of float or double");
    v = op(v, FAIRKERNELS_PERMUTE(v, 2, 3, 0, 1));
    v = op(v, FAIRKERNELS_PERMUTE(v, 1, 0, 3, 2));
  }
  return v;
}

// {0, 1, ..., lanes - 1}: the center offsets of the lanes within a column group.
template <typename scalar_t>
__attribute__((always_inline)) inline typename Vec<scalar_t>::type lane_offsets() {
  if constexpr (kLanes<scalar_t> == 8) {
    return typename Vec<scalar_t>::type{0, 1, 2, 3, 4, 5, 6, 7};
  } else {
    return typename Vec<scalar_t>::type{0, 1, 2, 3};
  }
}

template <typename scalar_t>
__attribute__((always_inline)) inline typename Vec<scalar_t>::type lane_min(typename Vec<scalar_t>::type v) {
  return lane_reduce<scalar_t>(v, [](auto a, auto b) { return vec_min(a, b); });
}

// |x|^2 of one row: vector partial sums over full vectors, then the lanes, then the remainder.
template <typename scalar_t>
__attribute__((always_inline)) inline scalar_t row_sq_norm(const scalar_t* row, int64_t dims) {
  using vec = typename Vec<scalar_t>::type;
  constexpr int64_t lanes = kLanes<scalar_t>;
  vec partial{};
  int64_t j = 0;
  for (; j + lanes <= dims; j += lanes) {
    vec v;
    __builtin_memcpy(&v, row + j, sizeof(vec));
    partial += v * v;
  }
  scalar_t total = lane_reduce<scalar_t>(partial, [](auto a, auto b) { return a + b; })[0];
  for (; j < dims; ++j) total += row[j] * row[j];
  return total;
}

// One register block: block_rows (<= rows_) rows of `block` (rows_ readable rows, stride dims)
// against the groups_ column groups starting at `group`. The accumulators start at |mu_k|^2 and
// take the d FMAs with -2 mu_kj, giving m_k = |mu_k|^2 - 2 x.mu_k; then each row's running
// minimum (best) and its center index (best_k, lane-wise) are updated with a strict <, which
// keeps the lowest index of each lane.
template <typename scalar_t, int64_t rows_, int64_t groups_>
__attribute__((always_inline)) inline void min_block(const scalar_t* block, int64_t block_rows, int64_t dims,
                                                     const scalar_t* neg2_mu, const scalar_t* mu_sq, int64_t group,
                                                     typename Vec<scalar_t>::type* best,
                                                     typename Vec<scalar_t>::type* best_k) {
  using vec = typename Vec<scalar_t>::type;
  constexpr int64_t lanes = kLanes<scalar_t>;
  vec acc[rows_][groups_];
  for (int64_t g = 0; g < groups_; ++g) {
    vec start;
    __builtin_memcpy(&start, mu_sq + (group + g) * lanes, sizeof(vec));
    for (int64_t r = 0; r < rows_; ++r) acc[r][g] = start;
  }
  const scalar_t* cols = neg2_mu + group * dims * lanes;
  for (int64_t j = 0; j < dims; ++j) {
    vec c[groups_];
    for (int64_t g = 0; g < groups_; ++g) __builtin_memcpy(&c[g], cols + (g * dims + j) * lanes, sizeof(vec));
#pragma GCC unroll 12
    for (int64_t r = 0; r < rows_; ++r) {
      const scalar_t xv = block[r * dims + j];
      for (int64_t g = 0; g < groups_; ++g) acc[r][g] += xv * c[g];
    }
  }
  vec index[groups_];
  for (int64_t g = 0; g < groups_; ++g) index[g] = lane_offsets<scalar_t>() + scalar_t((group + g) * lanes);
  for (int64_t r = 0; r < block_rows; ++r) {
    for (int64_t g = 0; g < groups_; ++g) {
      const auto closer = acc[r][g] < best[r];
      best[r] = closer ? acc[r][g] : best[r];
      best_k[r] = closer ? index[g] : best_k[r];
    }
  }
}

// Rows [0, rows) (rows <= kTileRows) of one cache tile against every center: column blocks of
// kGroups groups (one group in a ragged last block, with twice the rows so the registers stay
// busy) pass over the row blocks of the tile. The per-lane minima are then reduced across lanes:
// the lowest k that reaches the minimum wins ties, as in the reference. The index is carried as
// scalar_t, exact since K < 2^24. min_dist = max(|x_i|^2 + m_best, 0): the SPEC 1.1 clamped
// distance.
template <typename scalar_t>
FAIRKERNELS_MULTIVERSION void nearest_in_tile(const scalar_t* x, int64_t rows, int64_t dims,
                                              const scalar_t* neg2_mu, const scalar_t* mu_sq, int64_t num_groups,
                                              int32_t num_clusters, const ChunkOut<scalar_t>& out,
                                              scalar_t* row_pad) {
  using vec = typename Vec<scalar_t>::type;
  constexpr scalar_t inf = std::numeric_limits<scalar_t>::infinity();
  vec best[kTileRows], best_k[kTileRows];
  for (int64_t i = 0; i < rows; ++i) {
    best[i] = vec{} + inf;
    best_k[i] = vec{};
  }
  // A ragged last row block runs on a zero-padded copy; its extra rows are never read back.
  auto rows_at = [&](int64_t row, int64_t block_rows) {
    if (row + block_rows <= rows) return x + row * dims;
    std::fill(row_pad, row_pad + block_rows * dims, scalar_t(0));
    std::copy(x + row * dims, x + rows * dims, row_pad);
    return static_cast<const scalar_t*>(row_pad);
  };
  int64_t group = 0;
  for (; group + kGroups <= num_groups; group += kGroups) {
    for (int64_t row = 0; row < rows; row += kRows) {
      min_block<scalar_t, kRows, kGroups>(rows_at(row, kRows), std::min(kRows, rows - row), dims, neg2_mu, mu_sq,
                                          group, best + row, best_k + row);
    }
  }
  for (; group < num_groups; ++group) {
    for (int64_t row = 0; row < rows; row += kGroups * kRows) {
      min_block<scalar_t, kGroups * kRows, 1>(rows_at(row, kGroups * kRows), std::min(kGroups * kRows, rows - row),
                                              dims, neg2_mu, mu_sq, group, best + row, best_k + row);
    }
  }

  for (int64_t i = 0; i < rows; ++i) {
    const vec m = lane_min<scalar_t>(best[i]);
    const scalar_t k = lane_min<scalar_t>(best[i] == m ? best_k[i] : vec{} + inf)[0];
    const scalar_t* x_row = x + i * dims;
    const scalar_t x_sq = row_sq_norm(x_row, dims);
    // No center reached: every m was NaN or +inf (non-finite input); label 0 as the reference.
    const int64_t label = m[0] < inf ? static_cast<int64_t>(k) : 0;
    out.labels[i] = label;
    out.min_dist[i] = std::max(x_sq + m[0], scalar_t(0));
    if (out.sums != nullptr && label < num_clusters) {
      double* sum_row = out.sums + label * dims;
#pragma omp simd
      for (int64_t j = 0; j < dims; ++j) sum_row[j] += static_cast<double>(x_row[j]);
      out.counts[label] += 1;
    }
  }
}

void check_inputs(const at::Tensor& x, const at::Tensor& centers) {
  check_matrix(x, "x");
  check_matrix(centers, "centers");
  TORCH_CHECK(x.size(1) == centers.size(1), "centers has ", centers.size(1), " columns but x has ", x.size(1));
  TORCH_CHECK(x.scalar_type() == centers.scalar_type(), "centers and x must have the same dtype");
  TORCH_CHECK(centers.size(0) >= 1, "centers must have at least one row");
  TORCH_CHECK(centers.size(0) <= (int64_t(1) << 24), "centers must have at most 2^24 rows, got ", centers.size(0));
}

// Every chunk of the plan: its tiles in order, into the chunk's own sum/count buffers (when
// chunk_sums is not null). Chunks are claimed dynamically, so a thread descheduled on a shared
// machine does not hold the others back; the result does not depend on who ran which chunk.
// Like at::parallel_for: torch.set_num_threads' count from any calling thread, and serial when
// called inside a parallel region.
template <typename scalar_t>
void assign_chunks(const at::Tensor& x, const PackedCenters<scalar_t>& packed, int64_t num_clusters,
                   const ChunkPlan& plan, int64_t* labels, scalar_t* min_dist, double* chunk_sums,
                   int64_t* chunk_counts) {
  const int64_t rows = x.size(0), dims = x.size(1);
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const scalar_t* neg2_mu = packed.neg2_mu.template const_data_ptr<scalar_t>();
  const scalar_t* mu_sq = packed.mu_sq.template const_data_ptr<scalar_t>();
  const int threads = at::in_parallel_region() ? 1 : at::get_num_threads();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t chunk = 0; chunk < plan.num_chunks; ++chunk) {
    std::vector<scalar_t> row_pad(kGroups * kRows * dims);
    const int64_t end = plan.end(chunk, rows);
    for (int64_t start = plan.begin(chunk); start < end; start += kTileRows) {
      const ChunkOut<scalar_t> out{labels + start, min_dist + start,
                                   chunk_sums ? chunk_sums + chunk * num_clusters * dims : nullptr,
                                   chunk_counts ? chunk_counts + chunk * num_clusters : nullptr};
      nearest_in_tile<scalar_t>(x_data + start * dims, std::min(kTileRows, end - start), dims, neg2_mu, mu_sq,
                                packed.num_groups, static_cast<int32_t>(num_clusters), out, row_pad.data());
    }
  }
}

// Labels and min_dist of every row; with accumulate, also the per-cluster float64 sums and int64
// counts. Rows are split by plan_chunks (a function of N and K only) and each chunk adds into
// its own buffers, summed in chunk order: the result is bitwise the same for any thread count.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nearest_centers(const at::Tensor& x_in,
                                                                           const at::Tensor& centers_in,
                                                                           bool accumulate) {
  check_inputs(x_in, centers_in);
  const at::Tensor x = x_in.contiguous(), centers = centers_in.contiguous();
  const int64_t rows = x.size(0), dims = x.size(1), num_clusters = centers.size(0);
  at::Tensor labels = at::empty({rows}, x.options().dtype(at::kLong));
  at::Tensor min_dist = at::empty({rows}, x.options());
  at::Tensor sums = at::zeros({accumulate ? num_clusters : 0, dims}, x.options().dtype(at::kDouble));
  at::Tensor counts = at::zeros({accumulate ? num_clusters : 0}, x.options().dtype(at::kLong));
  if (rows == 0) return {labels, min_dist, sums, counts};
  const int64_t sum_elems = num_clusters * dims;
  const ChunkPlan plan = plan_chunks(rows, accumulate ? sum_elems + num_clusters : 0);
  const int64_t buffered = accumulate ? plan.num_chunks : 0;
  std::vector<double> chunk_sums(buffered * sum_elems, 0.0);
  std::vector<int64_t> chunk_counts(buffered * num_clusters, 0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kmeans", [&] {
    assign_chunks<scalar_t>(x, pack_centers<scalar_t>(centers), num_clusters, plan,
                            labels.mutable_data_ptr<int64_t>(), min_dist.mutable_data_ptr<scalar_t>(),
                            accumulate ? chunk_sums.data() : nullptr, accumulate ? chunk_counts.data() : nullptr);
  });
  if (accumulate) {
    reduce_chunks(chunk_sums, plan.num_chunks, sum_elems, sums.mutable_data_ptr<double>());
    int64_t* total = counts.mutable_data_ptr<int64_t>();
    for (int64_t chunk = 0; chunk < plan.num_chunks; ++chunk)
      for (int64_t k = 0; k < num_clusters; ++k) total[k] += chunk_counts[chunk * num_clusters + k];
  }
  return {labels, min_dist, sums, counts};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> kmeans_assign(const at::Tensor& x, const at::Tensor& centers) {
  auto [labels, min_dist, sums, counts] = nearest_centers(x, centers, /*accumulate=*/false);
  return {labels, min_dist};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kmeans_step(const at::Tensor& x,
                                                                       const at::Tensor& centers) {
  return nearest_centers(x, centers, /*accumulate=*/true);
}

}  // namespace fairkernels::cpu
