// Shared helpers of the CPU kernels: argument checks, the fixed row-chunk plan that makes the
// reductions deterministic, the parallel loops (torch's own thread pool), and a vectorisable
// float exp.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
// The per-operator headers of the few ATen functions the kernels call (not <ATen/ATen.h>, which
// declares every operator and dominates the build time).
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// Hot row loops are compiled twice, for AVX2+FMA (x86-64-v3) and for the baseline ISA, and the
// loader picks one at run time, so one binary is both portable and 8 floats wide where it can.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FAIRKERNELS_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FAIRKERNELS_MULTIVERSION
#endif

namespace fairkernels::cpu {

// Four doubles in one value (GCC/Clang vector extension): a local of this type lives in a
// register (one ymm in the AVX2 clone, two xmm at baseline), where a local double[8] was kept
// on the stack and every update went through a store and a reload (dfc_step, group_offsets).
typedef double Vec4 __attribute__((vector_size(32)));

inline Vec4 load4(const double* p) {
  Vec4 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store4(double* p, Vec4 v) { std::memcpy(p, &v, sizeof(v)); }
inline Vec4 splat4(double x) { return Vec4{x, x, x, x}; }


// Rows are cut into a fixed number of chunks that depends only on the problem size, never on
// the thread count. Each chunk reduces into its own buffer and the buffers are summed in chunk
// order, so every reduction is bitwise identical whatever OMP_NUM_THREADS is.
struct ChunkPlan {
  int64_t num_chunks;
  int64_t rows_per_chunk;
  int64_t begin(int64_t chunk) const { return chunk * rows_per_chunk; }
  int64_t end(int64_t chunk, int64_t rows) const { return std::min(rows, (chunk + 1) * rows_per_chunk); }
};

// In-place lower Cholesky factor of the n x n SPD matrix a (row-major); false when a pivot is
// not positive (or NaN), as torch.linalg.cholesky_ex reports it (dfc_step, group_offsets).
inline bool cholesky_lower(std::vector<double>& a, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    double pivot = a[j * n + j];
    for (int64_t p = 0; p < j; ++p) pivot -= a[j * n + p] * a[j * n + p];
    if (!(pivot > 0.0)) return false;
    const double root = std::sqrt(pivot);
    a[j * n + j] = root;
    for (int64_t i = j + 1; i < n; ++i) {
      double v = a[i * n + j];
      for (int64_t p = 0; p < j; ++p) v -= a[i * n + p] * a[j * n + p];
      a[i * n + j] = v / root;
    }
  }
  return true;
}

// b (n x m, row-major) <- A^-1 b for A = L L^T.
inline void cholesky_solve(const std::vector<double>& l, int64_t n, std::vector<double>& b, int64_t m) {
  for (int64_t i = 0; i < n; ++i) {          // L y = b
    for (int64_t p = 0; p < i; ++p)
      for (int64_t c = 0; c < m; ++c) b[i * m + c] -= l[i * n + p] * b[p * m + c];
    for (int64_t c = 0; c < m; ++c) b[i * m + c] /= l[i * n + i];
  }
  for (int64_t i = n - 1; i >= 0; --i) {     // L^T x = y
    for (int64_t p = i + 1; p < n; ++p)
      for (int64_t c = 0; c < m; ++c) b[i * m + c] -= l[p * n + i] * b[p * m + c];
    for (int64_t c = 0; c < m; ++c) b[i * m + c] /= l[i * n + i];
  }
}

// min_rows_per_chunk: 2048 keeps the per-chunk buffer cost negligible for cheap rows; a kernel
// whose rows cost microseconds each passes fewer, so that a training batch spreads over threads.
inline ChunkPlan plan_chunks(int64_t rows, int64_t partial_elems, int64_t min_rows_per_chunk = 2048) {
  constexpr int64_t kMaxChunks = 64;           // enough parallel slack for 64 cores
  constexpr int64_t kMaxPartialElems = 1 << 22;  // caps the chunk buffers at 32 MB of doubles
  const int64_t by_rows = (rows + min_rows_per_chunk - 1) / min_rows_per_chunk;
  const int64_t by_memory = std::max<int64_t>(1, kMaxPartialElems / std::max<int64_t>(partial_elems, 1));
  int64_t chunks = std::max<int64_t>(1, std::min({kMaxChunks, by_rows, by_memory}));
  const int64_t rows_per_chunk = std::max<int64_t>(1, (rows + chunks - 1) / chunks);
  chunks = std::max<int64_t>(1, (rows + rows_per_chunk - 1) / rows_per_chunk);
  return {chunks, rows_per_chunk};
}

// exp(x) for float, branch-free so that GCC vectorises the loops that call it (std::exp does
// not vectorise without -ffast-math; the selects below need -fno-trapping-math, set by every
// build of csrc/: setup.py, fairkernels/_extension.py, CMakeLists.txt). Cephes expf: range reduction x = n ln2 + r, |r| <= ln2/2,
// degree-6 polynomial; about 1 ulp. Inputs below -87.3 (exp underflows) give exactly 0, so
// 0 log 0 terms vanish as SPEC 3 requires.
inline float exp_float(float x) {
  const float clamped = std::min(std::max(x, -87.0f), 88.0f);
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const float n = (clamped * 1.44269504088896341f + round_magic) - round_magic;
  float r = clamped - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}

template <typename scalar_t>
inline scalar_t fast_exp(scalar_t x) {
  return std::exp(x);
}
template <>
inline float fast_exp<float>(float x) {
  return exp_float(x);
}

// The float64 values of a float32 or float64 tensor, row-major, read without an ATen dispatch:
// the tensor's own memory when it is contiguous float64, else a converted copy. The small
// per-batch kernels (dfc_step, dec_batch_target) called Tensor::to for every input and output;
// at DFC's batch of 256 those conversions, each a dispatch and an allocation, cost more than
// the arithmetic.
class DoubleValues {
 public:
  explicit DoubleValues(const at::Tensor& t) {
    const at::Tensor dense = t.is_contiguous() ? t : t.contiguous();
    if (dense.scalar_type() == at::kDouble) {
      keep_ = dense;
      data_ = dense.data_ptr<double>();
      return;
    }
    TORCH_CHECK(dense.scalar_type() == at::kFloat, "expected a float32 or float64 tensor, got ", dense.scalar_type());
    const float* source = dense.data_ptr<float>();
    copy_.assign(source, source + dense.numel());
    data_ = copy_.data();
  }
  const double* data() const { return data_; }

 private:
  at::Tensor keep_;
  std::vector<double> copy_;
  const double* data_ = nullptr;
};

// A fresh contiguous tensor of the given sizes and dtype (float32 or float64) holding values.
inline at::Tensor tensor_from_doubles(const double* values, at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  const int64_t n = out.numel();
  if (out.scalar_type() == at::kDouble) {
    std::copy(values, values + n, out.data_ptr<double>());
  } else {
    float* dst = out.data_ptr<float>();
    for (int64_t e = 0; e < n; ++e) dst[e] = static_cast<float>(values[e]);
  }
  return out;
}

// int64 group ids, without a dispatch when they already are contiguous int64.
inline at::Tensor long_groups(const at::Tensor& groups) {
  if (groups.scalar_type() == at::kLong && groups.is_contiguous()) return groups;
  return groups.to(at::kLong).contiguous();
}

inline void check_matrix(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2, name, " must be 2-D, got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, name,
              " must be float32 or float64 for the cpu backend, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor");
}

inline void check_groups(const at::Tensor& groups, int64_t rows) {
  TORCH_CHECK(groups.dim() == 1 && groups.size(0) == rows, "groups must be 1-D of length ", rows);
  TORCH_CHECK(groups.scalar_type() == at::kInt || groups.scalar_type() == at::kLong,
              "groups must be int32 or int64, got ", groups.scalar_type());
}

// Group ids outside [0, num_groups) seen by one chunk of rows. The kernels skip such rows and
// raise once after the parallel loop, so the range check costs no pass of its own.
struct GroupErrors {
  int64_t lowest = 0;    // the smallest negative id seen (0: none)
  int64_t highest = -1;  // the largest id >= num_groups seen (-1: none)
  // True (and recorded) when g is out of range.
  bool out_of_range(int64_t g, int64_t num_groups) {
    if (g >= 0 && g < num_groups) return false;
    if (g < 0) lowest = std::min(lowest, g);
    else highest = std::max(highest, g);
    return true;
  }
};

// Raises ValueError with the messages of fairkernels/_checks.py (check_group_values), so a user
// sees the same error whichever layer caught it.
inline void raise_group_errors(const std::vector<GroupErrors>& errors, int64_t num_groups) {
  int64_t lowest = 0, highest = -1;
  for (const GroupErrors& e : errors) {
    lowest = std::min(lowest, e.lowest);
    highest = std::max(highest, e.highest);
  }
  TORCH_CHECK_VALUE(lowest >= 0, "groups must be >= 0, found ", lowest);
  TORCH_CHECK_VALUE(highest < 0, "groups must be < num_groups=", num_groups, ", found ", highest);
}

// x * 0 is 0 for finite x and NaN for +-inf or NaN (the compiler may not fold it: no
// -ffinite-math-only), so a sum of these probes is a one-instruction finiteness check that
// rides along a loop that reads x anyway.
template <typename scalar_t>
inline scalar_t finite_probe(scalar_t x) {
  return x * scalar_t(0);
}

// Runs body(chunk) for every chunk of the plan on torch's intra-op thread pool (at::parallel_for:
// the same OpenMP runtime and the thread count of torch.set_num_threads, in any calling
// thread). Chunks are independent, so which thread runs which chunk never changes a result.
template <typename Body>
inline void parallel_chunks(const ChunkPlan& plan, const Body& body) {
  at::parallel_for(0, plan.num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) body(chunk);
  });
}

// Runs body(begin, end) over row ranges on torch's thread pool; work_per_row (elements touched
// per row) sets the grain so that small problems stay on one thread. Rows are independent.
template <typename Body>
inline void parallel_rows(int64_t rows, int64_t work_per_row, const Body& body) {
  constexpr int64_t kGrainElems = 32768;  // at::internal::GRAIN_SIZE
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(work_per_row, 1)), body);
}

// Sums per-chunk buffers (num_chunks x elems, row-major) in chunk order into out.
template <typename out_t>
inline void reduce_chunks(const std::vector<double>& partial, int64_t num_chunks, int64_t elems, out_t* out) {
  for (int64_t e = 0; e < elems; ++e) {
    double total = 0.0;
    for (int64_t chunk = 0; chunk < num_chunks; ++chunk) total += partial[chunk * elems + e];
    out[e] = static_cast<out_t>(total);
  }
}

}  // namespace fairkernels::cpu
