"""Chunked Lloyd k-means on any device, with k-means++ seeding and optional torch.distributed.

The assignment step is the backend kernel `kmeans_assign(x_chunk, centers) -> (labels,
min_sq_dist)` (interface: fairkernels/ops/torch_kernels.py) run over row chunks, so no N x K
matrix is ever held: extra memory is O(chunk K + N + K d). The update is a segmented sum of the
rows per label (index_add_, or a sort + segment_reduce in float64 with deterministic=True) and
bincount for the counts. On the cpu backend one fused C++ kernel, `kmeans_step`, does both in a
single pass over x (labels, distances, float64 per-cluster sums and counts; csrc/cpu/kmeans.cpp).
With a process group the sums, counts and inertia are all-reduced, so every rank holds identical
centers, equal to those of one process on the concatenated data.

The FCMI trainer uses the spherical variant (rows and centers L2-normalised) on its normalised
embeddings.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fairkernels import _backend, distributed
from fairkernels._checks import FLOAT_DTYPES
from fairkernels.ops._dispatch import kernels
from fairkernels.reference import NORM_EPS

INITS = ("k-means++", "random")
# Elements of the chunk x K distance tile of one assignment call (the reference kernel holds it
# in the accumulation dtype: 2^22 float64 = 32 MB), whatever N is.
CHUNK_ELEMENTS = 1 << 22
# k-means++ seeds on a sample of this many points per cluster (at least SEED_SAMPLE_MIN points).
SEED_POINTS_PER_CLUSTER = 50
SEED_SAMPLE_MIN = 10_000


@dataclass(frozen=True)
class KMeansResult:
    """centers [K, d] in x's dtype, labels [N] int64 (nearest final center), inertia = sum of
    squared distances of every point to its center (float; of the unit rows when spherical),
    n_iter = Lloyd iterations run."""
    centers: torch.Tensor
    labels: torch.Tensor
    inertia: float
    n_iter: int


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(num_clusters: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(num_clusters, 1))


# --------------------------------------------------------------------------- validation
def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float32)
        with warnings.catch_warnings():  # read-only memmaps are only read here
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor or numpy array, got {type(x).__name__}")
    return x


def _check_int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _all_finite(x: torch.Tensor) -> bool:
    """Whether every element is finite. A NaN or inf makes the sum non-finite, so one reduction
    in x's dtype (no N x d bool mask; 30x faster than isfinite on 10^6 x 32 float32) settles the
    common case; only a sum that overflowed needs the elementwise check."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def _validate(x, n_clusters, init, n_iter, tol, sample_size, seed, init_centers):
    x = _as_tensor(x)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (N x d), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must have a floating dtype, got {x.dtype}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"x must have at least one row and one column, got shape {tuple(x.shape)}")
    n_clusters = _check_int(n_clusters, "n_clusters", 1)
    if not isinstance(init, str) or init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    n_iter = _check_int(n_iter, "n_iter", 0)
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    if sample_size is not None:
        sample_size = _check_int(sample_size, "sample_size", 1)
    _check_int(seed, "seed", 0)
    if not _all_finite(x):
        raise ValueError("x contains NaN or inf")
    if init_centers is not None:
        init_centers = _as_tensor(init_centers)
        if init_centers.dim() != 2 or tuple(init_centers.shape) != (n_clusters, x.shape[1]):
            raise ValueError(f"init_centers must have shape ({n_clusters}, {x.shape[1]}), "
                             f"got {tuple(init_centers.shape)}")
        if not init_centers.is_floating_point() or not bool(torch.isfinite(init_centers).all()):
            raise ValueError("init_centers must be finite floating-point values")
    return x, n_clusters, n_iter, float(tol), sample_size, init_centers


# --------------------------------------------------------------------------- assignment + update
def _is_cpu_extension(kernel, x) -> bool:
    """Whether kernel is the compiled extension running on CPU rows (the C++ kernels)."""
    return kernel is torch.ops.fairkernels and x.device.type == "cpu"


class _Lloyd:
    """Assignment and update steps over row chunks of one matrix, in the accumulation dtype."""

    def __init__(self, backend, spherical, deterministic, process_group, num_clusters):
        self.backend, self.spherical = backend, spherical
        self.deterministic, self.process_group = deterministic, process_group
        self.num_clusters = num_clusters

    def rows(self, x_chunk, acc):
        """Rows as the kernel sees them: x's dtype, or unit rows in acc when spherical."""
        if self.spherical:
            return F.normalize(x_chunk.to(acc), dim=1, eps=NORM_EPS)
        return x_chunk

    def chunks(self, x, fused):
        """Row slices that one kernel call takes. The reference kernel holds a chunk x K tile, so
        chunks bound it to CHUNK_ELEMENTS; the C++ kernels hold no such tile and read x in place,
        so they take every row at once unless the spherical copy of the rows must be bounded."""
        if fused and not self.spherical:
            step = x.shape[0]
        elif fused:
            step = max(1, CHUNK_ELEMENTS // x.shape[1])
        else:
            step = _chunk_rows(self.num_clusters)
        for start in range(0, x.shape[0], step):
            yield slice(start, min(start + step, x.shape[0]))

    def chosen(self, x, acc):
        dtype = acc if self.spherical else x.dtype
        return kernels(_backend.choose(self.backend, x.device, dtype, "kmeans_assign")), dtype

    def assign(self, x, centers):
        """-> (labels [N] int64, min_sq_dist [N] acc) of every row of x to centers (acc)."""
        acc = centers.dtype
        kernel, dtype = self.chosen(x, acc)
        centers_in = centers.to(dtype)
        parts = [kernel.kmeans_assign(self.rows(x[rows], acc), centers_in)
                 for rows in self.chunks(x, _is_cpu_extension(kernel, x))]
        labels, min_dist = parts[0] if len(parts) == 1 else (torch.cat(part) for part in zip(*parts))
        return labels, min_dist.to(acc)

    def sums(self, x, labels, acc):
        """-> (per-cluster row sums [K, d] (float64 when deterministic), counts [K] acc)."""
        num_clusters = self.num_clusters
        sum_dtype = torch.float64 if self.deterministic else acc
        sums = torch.zeros(num_clusters, x.shape[1], dtype=sum_dtype, device=x.device)
        step = _chunk_rows(num_clusters)
        for start in range(0, x.shape[0], step):
            stop = min(start + step, x.shape[0])
            rows = self.rows(x[start:stop], acc).to(sum_dtype)
            chunk_labels = labels[start:stop]
            if self.deterministic:
                # Sort by label, then one reduction per segment in a fixed order: bitwise
                # reproducible on every device (index_add_ uses atomics on CUDA).
                order = torch.argsort(chunk_labels, stable=True)
                lengths = torch.bincount(chunk_labels, minlength=num_clusters)
                sums += torch.segment_reduce(rows[order], "sum", lengths=lengths, axis=0, unsafe=True)
            else:
                sums.index_add_(0, chunk_labels, rows)
        counts = torch.bincount(labels, minlength=num_clusters).to(sums.dtype)
        return sums, counts

    def fused(self, x, acc):
        """The C++ kmeans_step kernel (assignment + float64 sums + counts in one pass) when the
        cpu backend runs this step, else None."""
        kernel, dtype = self.chosen(x, acc)
        if _is_cpu_extension(kernel, x) and hasattr(kernel, "kmeans_step"):
            return kernel.kmeans_step, dtype
        return None, dtype

    def assign_and_sum(self, x, centers):
        """-> (labels, min_dist, sums, counts) of one Lloyd pass over x against centers (acc)."""
        acc = centers.dtype
        fused, dtype = self.fused(x, acc)
        if fused is None:
            labels, min_dist = self.assign(x, centers)
            return (labels, min_dist) + self.sums(x, labels, acc)
        # One pass over the rows: no N x K matrix and no second read of x for the sums.
        centers_in = centers.to(dtype)
        parts = [fused(self.rows(x[rows], acc), centers_in) for rows in self.chunks(x, True)]
        if len(parts) == 1:
            labels, min_dist, sums, counts = parts[0]
        else:
            labels, min_dist, sums, counts = zip(*parts)
            labels, min_dist = torch.cat(labels), torch.cat(min_dist)
            sums, counts = torch.stack(sums).sum(0), torch.stack(counts).sum(0)
        return labels, min_dist, sums, counts.to(torch.float64)

    def step(self, x, centers, previous_labels=None):
        """One Lloyd iteration -> (new centers acc, inertia of the old centers, empty mask,
        min_dist and labels of the old centers, number of labels that changed since
        previous_labels (every row when None), all-reduced over the process group)."""
        acc = centers.dtype
        labels, min_dist, sums, counts = self.assign_and_sum(x, centers)
        changed = x.shape[0] if previous_labels is None else (labels != previous_labels).sum()
        inertia = min_dist.sum(dtype=torch.float64).to(sums.dtype).reshape(1)
        changed = torch.as_tensor(changed, dtype=sums.dtype, device=x.device).reshape(1)
        packed = torch.cat([sums.reshape(-1), counts.to(sums.dtype), inertia, changed])
        distributed.all_reduce_(packed, self.process_group)
        num_clusters, dim = sums.shape
        sums = packed[: num_clusters * dim].view(num_clusters, dim)
        counts = packed[num_clusters * dim: -2]
        empty = counts == 0
        new_centers = (sums / counts.clamp_min(1)[:, None]).to(acc)
        new_centers = torch.where(empty[:, None], centers, new_centers)
        if self.spherical:
            new_centers = F.normalize(new_centers, dim=1, eps=NORM_EPS)
        return new_centers, float(packed[-2]), empty, min_dist, labels, int(packed[-1])

    def reseed_empty(self, x, centers, empty, min_dist):
        """Move each empty cluster onto one of the points farthest from their centers (the
        globally farthest across ranks), so no center is left without points."""
        num_empty = int(empty.sum())
        if num_empty == 0:
            return centers
        acc = centers.dtype
        local = min(num_empty, x.shape[0])
        far_dist, far_idx = torch.topk(min_dist, local)
        candidates = torch.full((num_empty, x.shape[1] + 1), -1.0, dtype=acc, device=x.device)
        candidates[:local, 0] = far_dist
        candidates[:local, 1:] = self.rows(x[far_idx], acc)
        pool = torch.cat(distributed.all_gather(candidates, self.process_group))
        best = torch.topk(pool[:, 0], num_empty).indices
        centers = centers.clone()
        centers[empty] = pool[best, 1:]
        return centers


# --------------------------------------------------------------------------- seeding
def _seed_sample(x, size, generator):
    """`size` distinct rows of x drawn with the generator, gathered in row order (sequential
    reads of a memmap); never materialises a permutation of all N when size << N."""
    num_rows = x.shape[0]
    if size >= num_rows:
        return x
    if 4 * size < num_rows:
        idx = torch.unique(torch.randint(num_rows, (size + size // 4 + 16,), generator=generator))
        if idx.numel() < size:  # vanishingly rare: fall back to an exact draw
            idx = torch.randperm(num_rows, generator=generator)[:size]
        else:
            idx = idx[torch.randperm(idx.numel(), generator=generator)[:size]]
    else:
        idx = torch.randperm(num_rows, generator=generator)[:size]
    return x[torch.sort(idx).values.to(x.device)]


def _kmeans_plus_plus(points, num_clusters, generator):
    """Greedy k-means++ (Arthur & Vassilvitskii; sklearn's 2 + log K local trials) on points
    [S, d] (acc). Sampling draws uniforms on the CPU generator: reproducible for a seed."""
    num_points = points.shape[0]
    trials = 2 + int(math.log(num_clusters))
    sq_norms = (points * points).sum(1)

    def sq_dist_to(rows):  # [len(rows), S], clamped as docs/math.md §1.1
        return (sq_norms[None, :] + (rows * rows).sum(1)[:, None] - 2.0 * rows @ points.t()).clamp_min(0)

    first = int(torch.randint(num_points, (1,), generator=generator))
    centers = [points[first]]
    closest = sq_dist_to(points[first:first + 1])[0]
    for _ in range(1, num_clusters):
        cumulative = torch.cumsum(closest.double(), 0)
        total = cumulative[-1]
        if total <= 0:  # every point coincides with a center: any point will do
            pick = torch.randint(num_points, (trials,), generator=generator).to(points.device)
        else:
            uniforms = torch.rand(trials, generator=generator, dtype=torch.float64).to(points.device)
            pick = torch.searchsorted(cumulative, uniforms * total).clamp_max(num_points - 1)
        candidate_closest = torch.minimum(closest[None, :], sq_dist_to(points[pick]))
        best = int(torch.argmin(candidate_closest.sum(1)))
        centers.append(points[pick[best]])
        closest = candidate_closest[best]
    return torch.stack(centers)


def _initial_centers(lloyd, x, num_clusters, init, sample_size, generator, acc):
    size = sample_size or max(SEED_POINTS_PER_CLUSTER * num_clusters, SEED_SAMPLE_MIN)
    sample = lloyd.rows(_seed_sample(x, max(size, num_clusters), generator), acc).to(acc)
    if init == "random":
        pick = torch.randperm(sample.shape[0], generator=generator)[:num_clusters]
        return sample[pick.to(sample.device)].clone()
    return _kmeans_plus_plus(sample, num_clusters, generator)


# --------------------------------------------------------------------------- public API
@torch.no_grad()
def kmeans(x, n_clusters, *, init="k-means++", n_iter=100, tol=1e-4, spherical=False, sample_size=None,
           seed=0, backend="auto", deterministic=False, process_group=None, init_centers=None) -> KMeansResult:
    """Lloyd k-means of the rows of x (torch tensor on any device, or numpy array / memmap).

    init: "k-means++" (greedy, on a seeded sample of sample_size or max(50 K, 10^4) rows) or
    "random" (K distinct sample rows); init_centers [K, d] overrides both. Iterates until no
    label changes (the centers are then final: as scikit-learn's strict convergence), the
    relative change of inertia is <= tol, or n_iter iterations ran; the returned labels and
    inertia are those of every row against the returned centers. spherical=True clusters the
    L2-normalised rows with unit centers (cosine k-means). sample_size caps the rows used in
    the Lloyd iterations (a seeded random subset) for very large N; the final labels still
    cover all rows. Empty clusters are re-seeded at the points farthest from their centers.

    backend picks the assignment kernel (fairkernels._backend.choose, op "kmeans_assign").
    deterministic=True sums the clusters by sort + segment_reduce in float64 (bitwise
    reproducible on any device); the default index_add_ is already deterministic on CPU, and
    the cpu backend's fused kernel always sums in float64 in a fixed chunk order (bitwise the
    same for any thread count).
    process_group (a torch.distributed group, or True for the default one): each rank passes
    its own rows; centers are seeded from rank 0's sample and broadcast, the per-cluster
    sums, counts and inertia are all-reduced, so every rank gets the same centers (those of
    one process on the concatenated rows, up to float rounding), its own rows' labels, and
    the global inertia. sample_size then caps the rows of each rank.
    """
    x, n_clusters, n_iter, tol, sample_size, init_centers = _validate(
        x, n_clusters, init, n_iter, tol, sample_size, seed, init_centers)
    _backend.choose(backend, x.device, x.dtype, "kmeans_assign")  # raises early on a bad backend
    acc = _acc_dtype(x.dtype)
    lloyd = _Lloyd(backend, bool(spherical), bool(deterministic), process_group, n_clusters)
    # Every rank learns every rank's row count, so a bad n_clusters raises on all of them
    # (not only on rank 0, which would leave the others waiting in the broadcast).
    row_counts = [int(c) for c in distributed.all_gather(
        torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device), process_group)]
    if n_clusters > sum(row_counts):
        raise ValueError(f"n_clusters={n_clusters} must be <= the number of rows ({sum(row_counts)})")
    if init_centers is None and n_clusters > row_counts[0]:
        raise ValueError(f"n_clusters={n_clusters} exceeds the {row_counts[0]} rows of x on rank 0, "
                         "which seeds the centers; pass init_centers")

    group_rank = distributed.rank(process_group) if process_group is not None else 0
    generator = torch.Generator().manual_seed(int(seed) + 7919 * group_rank)
    if init_centers is not None:
        centers = init_centers.to(device=x.device, dtype=acc)
        if spherical:
            centers = F.normalize(centers, dim=1, eps=NORM_EPS)
    else:
        centers = torch.empty(n_clusters, x.shape[1], dtype=acc, device=x.device)
        if group_rank == 0:
            seed_generator = torch.Generator().manual_seed(int(seed))
            centers = _initial_centers(lloyd, x, n_clusters, init, sample_size, seed_generator, acc)
        distributed.broadcast_(centers, process_group, src=0)

    fit_rows = x
    if sample_size is not None and sample_size < x.shape[0]:
        fit_rows = _seed_sample(x, sample_size, generator)

    previous = math.inf
    iterations = 0
    labels = final = None
    for iterations in range(1, n_iter + 1):
        old_centers = centers
        centers, inertia, empty, min_dist, labels, changed = lloyd.step(fit_rows, centers, labels)
        centers = lloyd.reseed_empty(fit_rows, centers, empty, min_dist)
        stable = changed == 0 and not bool(empty.any())
        converged = previous < math.inf and abs(previous - inertia) <= tol * previous
        previous = inertia
        if stable:
            # No label moved on any rank, so the sums and hence the centers are the old ones
            # (bitwise): every further iteration would repeat this one. The labels and
            # distances just computed are then already those of the returned centers.
            if fit_rows is x and torch.equal(old_centers, centers):
                final = labels, min_dist
            break
        if converged and not bool(empty.any()):
            break

    labels, min_dist = final if final is not None else lloyd.assign(x, centers)
    inertia = min_dist.sum(dtype=torch.float64).reshape(1)
    distributed.all_reduce_(inertia, process_group)
    return KMeansResult(centers=centers.to(x.dtype), labels=labels, inertia=float(inertia), n_iter=iterations)
