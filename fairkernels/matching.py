"""Matching the clusters of one group to those of another by their relative geometry.

A protected attribute can change how every point looks (an intensity-reversed image, another
sequencing batch) while leaving the cluster structure inside each group intact. Clustering each
group on its own then finds the same clusters in every group, but the centers of group t are
not near their counterparts in the reference group, so "nearest center" pairs them wrongly.
What survives the change is the geometry of the clusters relative to each other: if cluster k
of the reference group is the counterpart of cluster pi(k) of group t, the inner-product
matrices A = U_r U_r^T and B = U_t U_t^T of the centred unit centers agree up to that
permutation (and one sign, which the objective below does not see).

match_clusters finds pi as (docs/math.md §8)

    pi_g = argmax over permutation matrices P of <A, P B P^T>      (= argmin ||A - P B P^T||_F)

a quadratic assignment problem, solved by Frank-Wolfe on the doubly stochastic relaxation (the
FAQ method of Vogelstein et al., 2015) from the barycenter and random starts, each rounded to a
permutation and polished by pairwise swaps. The nearest pairing pi_c (a linear assignment on
U_r U_t^T) is kept instead when its geometry is as good, within a tolerance: that settles the
pairings geometry cannot tell apart (K = 2, symmetric layouts) and untransformed groups.
"""
from __future__ import annotations

import numpy as np

__all__ = ["geometry_mismatch", "match_clusters"]

_SWAP_POLISH_MAX_K = 64       # pairwise-swap polish is O(K^4) per pass: beyond this, FW alone


def _as_centers(centers, name: str) -> np.ndarray:
    array = np.asarray(centers, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] < 1:
        raise ValueError(f"{name} must be a (K, D) matrix of cluster centers, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must be finite")
    return array


def _unit(array: np.ndarray) -> np.ndarray:
    return array / np.maximum(np.linalg.norm(array, axis=1, keepdims=True), 1e-12)


def _centred(centers: np.ndarray) -> np.ndarray:
    """Unit directions of the centers from their own mean: a shift of the whole group, a
    rotation, or a reflection through its mean (x -> c - x, e.g. intensity reversal) changes
    their inner products at most by one common sign, and a rescaling not at all."""
    if centers.shape[0] < 2:
        return _unit(centers)
    return _unit(centers - centers.mean(0, keepdims=True))


def _fit(A, B, perm) -> float:
    return float((A * B[np.ix_(perm, perm)]).sum())


def _mismatch(A, B, perm) -> float:
    return float(np.linalg.norm(A - B[np.ix_(perm, perm)]) / max(np.linalg.norm(A), 1e-12))


def geometry_mismatch(reference, centers, perm) -> float:
    """||A - P B P^T||_F / ||A||_F of the pairing perm (cluster k of reference <-> cluster
    perm[k] of centers), for the centred unit centers; 0: the pairing keeps the geometry."""
    Uc, Vc = _centred(_as_centers(reference, "reference")), _centred(_as_centers(centers, "centers"))
    return _mismatch(Uc @ Uc.T, Vc @ Vc.T, np.asarray(perm))


def _frank_wolfe(A, B, P, iterations):
    from scipy.optimize import linear_sum_assignment
    for _ in range(iterations):
        grad = 2 * (A @ P @ B)                         # A, B symmetric
        rows, cols = linear_sum_assignment(grad, maximize=True)
        Q = np.zeros_like(P)
        Q[rows, cols] = 1.0
        D = Q - P
        # f(P + s D) = f(P) + s b + s^2 a along the segment: exact line search.
        a = (A * (D @ B @ D.T)).sum()
        b = (grad * D).sum()
        if b <= 1e-12:
            break
        step = 1.0 if a >= 0 else min(1.0, -b / (2 * a))
        P = Q if step == 1.0 else P + step * D
    rows, cols = linear_sum_assignment(P, maximize=True)
    return cols[np.argsort(rows)]


def _polish(A, B, perm):
    """Pairwise swaps while any swap raises <A, P B P^T> (a 2-opt local optimum)."""
    K = perm.shape[0]
    best = _fit(A, B, perm)
    improved = True
    while improved:
        improved = False
        for i in range(K - 1):
            for j in range(i + 1, K):
                trial = perm.copy()
                trial[i], trial[j] = trial[j], trial[i]
                value = _fit(A, B, trial)
                if value > best + 1e-12:
                    perm, best, improved = trial, value, True
    return perm, best


def match_clusters(reference, centers, tolerance: float = 0.02, restarts: int = 32, seed: int = 0,
                   iterations: int = 100) -> np.ndarray:
    """The permutation pi (cluster k of `reference` <-> cluster pi[k] of `centers`), int64 [K],
    pairing two sets of K cluster centers [K, D] (module docstring).

    Two candidates: pi_g, the pairing that best keeps the clusters' relative geometry, and
    pi_c, the most similar pairing once each set is centred on its own mean (right when the
    groups differ by a shift or not at all). pi_c is kept when its geometry mismatch is within
    `tolerance` of pi_g's: the geometry cannot tell them apart (K = 2, symmetric layouts) and
    the plain similarity decides. Otherwise, e.g. when one group is intensity-reversed, pi_g.
    Deterministic for a given seed; restarts: random starts besides the barycenter."""
    from scipy.optimize import linear_sum_assignment
    U, V = _as_centers(reference, "reference"), _as_centers(centers, "centers")
    if U.shape != V.shape:
        raise ValueError(f"reference and centers must have the same shape, got {U.shape} and {V.shape}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
    K = U.shape[0]
    if K == 1:
        return np.zeros(1, dtype=np.int64)
    Uc, Vc = _centred(U), _centred(V)
    A, B = Uc @ Uc.T, Vc @ Vc.T
    rng = np.random.default_rng(seed)
    starts = [np.full((K, K), 1.0 / K)]
    for _ in range(max(int(restarts), 0)):
        P = rng.random((K, K)) + 1e-3             # a random doubly stochastic start (Sinkhorn)
        for _ in range(20):
            P /= P.sum(1, keepdims=True)
            P /= P.sum(0, keepdims=True)
        starts.append(P)
    geometric, best = None, -np.inf
    for P in starts:
        perm = _frank_wolfe(A, B, P, iterations)
        if K <= _SWAP_POLISH_MAX_K:
            perm, value = _polish(A, B, perm)
        else:
            value = _fit(A, B, perm)
        if value > best + 1e-12:
            geometric, best = perm, value
    rows, cols = linear_sum_assignment(Uc @ Vc.T, maximize=True)
    nearest = cols[np.argsort(rows)]
    if _mismatch(A, B, nearest) <= _mismatch(A, B, geometric) + tolerance:
        return nearest.astype(np.int64)
    return geometric.astype(np.int64)
