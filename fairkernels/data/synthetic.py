"""Planted clusters with protected groups, at any N (10^7 rows fit: generated in chunks).

Model (per row i, independent):
    g_i ~ uniform{0..T-1}
    y_i ~ uniform{0..K-1}, except with probability `bias` it is drawn uniformly from the group's
          own clusters {k : k mod T = g_i} (or k = g_i mod K when K < T)
    x_i = mu_{y_i} + bias * o_{g_i} + noise,  noise ~ N(0, I_d)
Centers mu_k ~ N(0, separation^2 I_d / 2) (so two centers are about `separation` apart), group
offsets o_t have norm `separation`. With bias = 0 cluster and group are independent; as bias
grows the clusters become group-specific and every point moves by its group's offset, so an
unconstrained clusterer finds group-aligned (unfair) clusters.

Reproducibility: every row consumes exactly 3 + 2 ceil(d / 2) uniform doubles of one PCG64
stream (normals by Box-Muller, never a rejection sampler), and a chunk starting at row r
advances the stream by r times that count. The data therefore depend on `seed` only, not on
`chunk_rows`.
"""
from __future__ import annotations

import math

import numpy as np

from fairkernels.data._dataset import Dataset

DEFAULT_CHUNK_ROWS = 1 << 20


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _group_offsets_and_centers(seed: int, n_clusters: int, n_groups: int, dim: int, separation: float):
    # A stream separate from the per-row one, so the parameters do not depend on n.
    rng = np.random.Generator(np.random.PCG64([seed, 1]))
    centers = rng.normal(0.0, separation / math.sqrt(2.0), size=(n_clusters, dim))
    directions = rng.normal(size=(n_groups, dim))
    directions /= np.maximum(np.linalg.norm(directions, axis=1, keepdims=True), 1e-12)
    return centers, separation * directions


def _fill_chunk(out_X, out_y, out_g, start: int, seed: int, centers, offsets, bias: float) -> None:
    num_rows, dim = out_X.shape
    n_clusters, n_groups = centers.shape[0], offsets.shape[0]
    normal_pairs = (dim + 1) // 2
    per_row = 3 + 2 * normal_pairs
    bit_generator = np.random.PCG64(seed)
    bit_generator.advance(start * per_row)
    uniforms = np.random.Generator(bit_generator).random((num_rows, per_row))

    groups = np.minimum((uniforms[:, 0] * n_groups).astype(np.int64), n_groups - 1)
    uniform_cluster = np.minimum((uniforms[:, 2] * n_clusters).astype(np.int64), n_clusters - 1)
    if n_clusters >= n_groups:
        own_count = (n_clusters - 1 - groups) // n_groups + 1  # |{k < K : k mod T = g}|
        own_cluster = groups + n_groups * np.minimum((uniforms[:, 2] * own_count).astype(np.int64),
                                                     own_count - 1)
    else:
        own_cluster = groups % n_clusters
    labels = np.where(uniforms[:, 1] < bias, own_cluster, uniform_cluster)

    # Box-Muller on (1 - u) in (0, 1] so the log is finite.
    radius = np.sqrt(-2.0 * np.log1p(-uniforms[:, 3:3 + normal_pairs]))
    angle = 2.0 * np.pi * uniforms[:, 3 + normal_pairs:]
    noise = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)], axis=1)[:, :dim]
    out_X[:] = noise + centers[labels] + bias * offsets[groups]
    out_y[:] = labels
    out_g[:] = groups


def make_synthetic(n: int = 10000, dim: int = 10, n_clusters: int = 4, n_groups: int = 2,
                   bias: float = 0.0, seed: int = 0, separation: float = 6.0,
                   chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Dataset:
    """The planted-cluster data of the module docstring: X float32 (n, dim), y the planted
    cluster, groups the protected group. Peak extra memory is O(chunk_rows * dim) doubles."""
    n = _check_int(n, "n", 1)
    dim = _check_int(dim, "dim", 1)
    n_clusters = _check_int(n_clusters, "n_clusters", 1)
    n_groups = _check_int(n_groups, "n_groups", 1)
    seed = _check_int(seed, "seed", 0)
    chunk_rows = _check_int(chunk_rows, "chunk_rows", 1)
    bias = float(bias)
    if not 0.0 <= bias <= 1.0:
        raise ValueError(f"bias must be in [0, 1], got {bias}")
    separation = float(separation)
    if not math.isfinite(separation) or separation < 0:
        raise ValueError(f"separation must be a finite number >= 0, got {separation}")

    centers, offsets = _group_offsets_and_centers(seed, n_clusters, n_groups, dim, separation)
    X = np.empty((n, dim), dtype=np.float32)
    y = np.empty(n, dtype=np.int64)
    groups = np.empty(n, dtype=np.int64)
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        _fill_chunk(X[start:stop], y[start:stop], groups[start:stop], start, seed, centers, offsets, bias)
    return Dataset(X=X, y=y, groups=groups, group_names=tuple(f"group {t}" for t in range(n_groups)),
                   description=f"synthetic: n={n}, dim={dim}, {n_clusters} planted clusters, "
                               f"{n_groups} groups, bias={bias}, separation={separation}, seed={seed}")
