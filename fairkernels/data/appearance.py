"""A synthetic analogue of digits-reverse: the protected group changes how a point looks, never
which class it belongs to.

Model (per row i):
    y_i ~ uniform{0..K-1},  g_i ~ uniform{0..T-1} (independent of y_i)
    z_i = c_{y_i} + noise,  noise ~ N(0, sigma^2 I_q)          (a q-dim "content" code)
    a_i = sigmoid(W z_i + b)                                   (D "pixels" in (0, 1))
    x_ij = 1 - a_ij where feature j is reversed for group g_i (mask m_{g_i, j} = 1), else a_ij
Group 0 is never reversed; group t >= 1 reverses a fixed random subset of round(D * t / (T - 1))
features, so with T = 2 group 1 is the full intensity reversal 1 - a, as in digits-reverse.
Plain clustering of x finds the groups (reversal moves a point far more than its class does);
a fair clustering has to see through the appearance to the content code.
"""
from __future__ import annotations

import numpy as np

from fairkernels.data._dataset import Dataset
from fairkernels.data.synthetic import _check_int


def make_appearance(n: int = 4000, dim: int = 64, n_clusters: int = 10, n_groups: int = 2,
                    latent_dim: int = 8, noise: float = 0.35, seed: int = 0) -> Dataset:
    """The data of the module docstring: X float32 (n, dim) in (0, 1), y the class, groups the
    appearance group. Deterministic in `seed`."""
    n = _check_int(n, "n", 1)
    dim = _check_int(dim, "dim", 1)
    n_clusters = _check_int(n_clusters, "n_clusters", 1)
    n_groups = _check_int(n_groups, "n_groups", 1)
    latent_dim = _check_int(latent_dim, "latent_dim", 1)
    seed = _check_int(seed, "seed", 0)
    noise = float(noise)
    if not np.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a finite number >= 0, got {noise}")
    rng = np.random.default_rng([seed, 7])
    # Class codes on a sphere of radius 1.5 in q dims: well apart relative to the noise.
    codes = rng.normal(size=(n_clusters, latent_dim))
    codes *= 1.5 / np.maximum(np.linalg.norm(codes, axis=1, keepdims=True), 1e-12)
    weights = rng.normal(size=(latent_dim, dim)) * (2.0 / np.sqrt(latent_dim))
    offsets = rng.normal(scale=0.5, size=dim)
    masks = np.zeros((n_groups, dim), dtype=bool)
    for t in range(1, n_groups):
        count = int(round(dim * t / (n_groups - 1)))
        masks[t, rng.permutation(dim)[:count]] = True
    y = rng.integers(0, n_clusters, size=n)
    groups = rng.integers(0, n_groups, size=n)
    z = codes[y] + noise * rng.normal(size=(n, latent_dim))
    pixels = 1.0 / (1.0 + np.exp(-(z @ weights + offsets)))
    X = np.where(masks[groups], 1.0 - pixels, pixels).astype(np.float32)
    return Dataset(X=X, y=y.astype(np.int64), groups=groups.astype(np.int64),
                   group_names=tuple(["original"] + [f"reversed {t}" for t in range(1, n_groups)]),
                   description=f"appearance: n={n}, dim={dim}, {n_clusters} classes, {n_groups} groups "
                               f"(group t reverses {dim}*t/(T-1) features), latent_dim={latent_dim}, "
                               f"noise={noise}, seed={seed}")
