"""Clustering quality and fairness metrics (docs/math.md §5).

Every metric takes integer label vectors (numpy arrays, lists or torch tensors on any device; a
tensor is copied to CPU once) and returns a Python float that is never NaN.

What T (the number of groups) means. With ``num_groups=None`` (the default) the groups are the
distinct values that occur in ``groups``; a group id that never occurs is ignored, so it cannot
drive every cluster's Balance to 1e-5 / max. Passing ``num_groups`` explicitly makes T = num_groups
and every id in [0, T) counts, observed or not (Balance then uses 1e-5 for an absent group, the
uniform target of FWD spreads over all T groups, and the ordinal ground metric of FWD orders the
groups by id 0..T-1). Without ``num_groups`` the ordinal order is the sorted observed ids.

Clusters: only non-empty clusters (pred values that occur) enter the min / mean / max over k.

For evaluation of very large N on an accelerator, :func:`contingency` counts (pred, groups) pairs
on the tensors' own device; the ``*_from_counts`` functions then work on that small K x T table.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch

# _lazy_imports_note: scikit-learn and scipy are imported inside the functions that need them.
# Importing scikit-learn maps its own bundled OpenMP runtime (and scipy its OpenBLAS) next to
# torch's, so a module-level import would give every `import fairkernels` a second runtime.

__all__ = ["accuracy", "nmi", "balance", "mnce", "f_beta", "fwd", "evaluate", "contingency",
           "count_table", "balance_from_counts", "mnce_from_counts", "fwd_from_counts",
           "accuracy_from_counts"]

# Chierichetti / FCMI Balance replaces empty cells n_kt = 0 by this count (docs/math.md §5).
_BALANCE_ZERO_COUNT = 1e-5
_GROUNDS = ("discrete", "ordinal")


# ----------------------------------------------------------------------------- input handling

def _as_labels(values, name: str) -> np.ndarray:
    """A 1-D int64 numpy vector of non-negative labels, or a ValueError / TypeError naming `name`."""
    if isinstance(values, torch.Tensor):
        if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got a tensor of dtype {values.dtype}")
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got dtype {array.dtype}")
    array = array.astype(np.int64, copy=False)
    low = int(array.min())
    if low < 0:
        raise ValueError(f"{name} must be >= 0, found {low}")
    return array


def _check_lengths(**vectors: np.ndarray) -> None:
    lengths = {name: len(v) for name, v in vectors.items()}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{name} has length {n}" for name, n in lengths.items())
        raise ValueError(f"length mismatch: {shown}")


def _check_count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _compact(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Relabel to 0..M-1 over the values that occur (sorted); returns (codes, M). O(N) when the
    label range is small compared with N (a bincount), a sort otherwise."""
    top = int(labels.max())
    if top < 4 * labels.size + 1024:
        used = np.flatnonzero(np.bincount(labels, minlength=top + 1))
        lookup = np.empty(top + 1, dtype=np.int64)
        lookup[used] = np.arange(used.size, dtype=np.int64)
        return lookup[labels], int(used.size)
    uniques, codes = np.unique(labels, return_inverse=True)
    return codes.astype(np.int64, copy=False), int(uniques.size)


def _pair_counts(rows: np.ndarray, num_rows: int, cols: np.ndarray, num_cols: int) -> np.ndarray:
    """n[r, c] = #{i : rows_i = r, cols_i = c} with one bincount over the flat index r * C + c."""
    flat = rows * num_cols + cols
    return np.bincount(flat, minlength=num_rows * num_cols).reshape(num_rows, num_cols)


def count_table(pred, groups, num_groups=None) -> np.ndarray:
    """The K' x T table n_kt of cluster/group counts over the non-empty clusters k (rows, in
    increasing cluster id) and the T groups (columns; T as in the module docstring)."""
    pred = _as_labels(pred, "pred")
    groups = _as_labels(groups, "groups")
    _check_lengths(pred=pred, groups=groups)
    if num_groups is None:
        group_codes, num_groups = _compact(groups)
    else:
        num_groups = _check_count(num_groups, "num_groups")
        top = int(groups.max())
        if top >= num_groups:
            raise ValueError(f"groups must be < num_groups={num_groups}, found {top}")
        group_codes = groups
    cluster_codes, num_clusters = _compact(pred)
    return _pair_counts(cluster_codes, num_clusters, group_codes, num_groups)


def _nonempty_rows(counts) -> np.ndarray:
    counts = np.asarray(counts.detach().cpu().numpy() if isinstance(counts, torch.Tensor) else counts)
    if counts.ndim != 2 or counts.shape[0] == 0 or counts.shape[1] == 0:
        raise ValueError(f"counts must be a non-empty 2-D table, got shape {counts.shape}")
    if np.issubdtype(counts.dtype, np.floating) and not np.isfinite(counts).all():
        raise ValueError("counts contains NaN or inf")
    if (counts < 0).any():
        raise ValueError("counts must be >= 0")
    counts = counts.astype(np.float64)
    counts = counts[counts.sum(axis=1) > 0]
    if counts.shape[0] == 0:
        raise ValueError("counts is all zeros")
    return counts


# ----------------------------------------------------------------------------- fairness from counts

def balance_from_counts(counts) -> float:
    """docs/math.md §5 Balance of a K x T count table: min over non-empty rows of min_t n_kt / max_t n_kt,
    with zero cells replaced by 1e-5 (raw counts, not normalised by group size)."""
    counts = _nonempty_rows(counts)
    counts = np.where(counts == 0, _BALANCE_ZERO_COUNT, counts)
    return float((counts.min(axis=1) / counts.max(axis=1)).min())


def _entropy_rows(probs: np.ndarray) -> np.ndarray:
    """-sum_t p log p per row with 0 log 0 = 0."""
    safe = np.where(probs > 0, probs, 1.0)
    return -(probs * np.log(safe)).sum(axis=1)


def mnce_from_counts(counts) -> float:
    """docs/math.md §5 MNCE: min_k H(G | C = k) / H(G) over non-empty rows; 1 when T = 1 or H(G) = 0."""
    counts = _nonempty_rows(counts)
    if counts.shape[1] == 1:
        return 1.0
    group_totals = counts.sum(axis=0, keepdims=True)
    entropy_groups = float(_entropy_rows(group_totals / group_totals.sum())[0])
    if entropy_groups <= 0.0:
        return 1.0
    conditional = _entropy_rows(counts / counts.sum(axis=1, keepdims=True))
    # + 0.0 turns the -0.0 of an all-zero entropy row into 0.0 (tables print '-0.0' otherwise)
    return float(max(conditional.min(), 0.0) / entropy_groups) + 0.0


def fwd_from_counts(counts, ground: str = "discrete") -> tuple[float, float]:
    """docs/math.md §5 FWD: W1 between each non-empty row's group distribution h_k and the uniform u over
    the T columns; returns (mean over rows, max over rows)."""
    if ground not in _GROUNDS:
        raise ValueError(f"ground must be one of {_GROUNDS}, got {ground!r}")
    counts = _nonempty_rows(counts)
    num_groups = counts.shape[1]
    hist = counts / counts.sum(axis=1, keepdims=True)
    uniform = 1.0 / num_groups
    if ground == "discrete":
        # Distance 1 between different groups: W1 = total variation = 1/2 sum_t |h_kt - 1/T|.
        distances = 0.5 * np.abs(hist - uniform).sum(axis=1)
    else:
        # Groups as ordered unit-spaced bins: W1 = sum_{t < T-1} |CDF_h(t) - CDF_u(t)|.
        cdf_gap = np.cumsum(hist, axis=1) - uniform * np.arange(1, num_groups + 1)
        distances = np.abs(cdf_gap[:, :-1]).sum(axis=1)
    return float(distances.mean()), float(distances.max())


def accuracy_from_counts(counts) -> float:
    """ACC from a K x L cluster/label contingency table (Hungarian, rectangular allowed)."""
    counts = np.asarray(counts.detach().cpu().numpy() if isinstance(counts, torch.Tensor) else counts)
    if counts.ndim != 2 or counts.size == 0:
        raise ValueError(f"counts must be a non-empty 2-D table, got shape {counts.shape}")
    total = counts.sum()
    if total <= 0:
        raise ValueError("counts is all zeros")
    from scipy.optimize import linear_sum_assignment  # lazy: see _lazy_imports_note below
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / total)


# ----------------------------------------------------------------------------- public metrics

def accuracy(y, pred) -> float:
    """Fraction of points whose cluster, mapped one-to-one to a label by the Hungarian algorithm
    on the K x L contingency table, equals y. With K > L the extra clusters map to nothing."""
    y = _as_labels(y, "y")
    pred = _as_labels(pred, "pred")
    _check_lengths(y=y, pred=pred)
    label_codes, num_labels = _compact(y)
    cluster_codes, num_clusters = _compact(pred)
    return accuracy_from_counts(_pair_counts(cluster_codes, num_clusters, label_codes, num_labels))


def nmi(y, pred) -> float:
    """sklearn normalized_mutual_info_score(y, pred) with the arithmetic average."""
    y = _as_labels(y, "y")
    pred = _as_labels(pred, "pred")
    _check_lengths(y=y, pred=pred)
    from sklearn.metrics import normalized_mutual_info_score  # lazy: see _lazy_imports_note below
    score = float(normalized_mutual_info_score(y, pred, average_method="arithmetic"))
    # Keep float rounding of the ratio (e.g. 1 + 1e-16 for identical partitions) inside [0, 1].
    return min(max(score, 0.0), 1.0) if math.isfinite(score) else 0.0


def balance(pred, groups, num_groups=None) -> float:
    """FCMI's Bal (Chierichetti's balance for T = 2), docs/math.md §5. T as in the module docstring."""
    return balance_from_counts(count_table(pred, groups, num_groups))


def mnce(pred, groups, num_groups=None) -> float:
    """Minimal normalised conditional entropy min_k H(G|C=k) / H(G), docs/math.md §5."""
    return mnce_from_counts(count_table(pred, groups, num_groups))


def f_beta(nmi_value, mnce_value, beta: float = 1.0) -> float:
    """(1 + b^2) NMI MNCE / (b^2 NMI + MNCE); 0 when both are 0 (docs/math.md §5)."""
    values = {}
    for name, value in (("nmi_value", nmi_value), ("mnce_value", mnce_value), ("beta", beta)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        values[name] = value
    if values["beta"] == 0:
        raise ValueError("beta must be > 0, got 0.0")
    beta_sq = values["beta"] ** 2
    denominator = beta_sq * values["nmi_value"] + values["mnce_value"]
    if denominator == 0:
        return 0.0
    return (1 + beta_sq) * values["nmi_value"] * values["mnce_value"] / denominator


def fwd(pred, groups, ground: str = "discrete", num_groups=None) -> tuple[float, float]:
    """Wang & Davidson's Wasserstein fairness (docs/math.md §5): (mean, max) over non-empty clusters of
    W1(h_k, uniform). ground="discrete" or "ordinal"; T as in the module docstring."""
    if ground not in _GROUNDS:
        raise ValueError(f"ground must be one of {_GROUNDS}, got {ground!r}")
    return fwd_from_counts(count_table(pred, groups, num_groups), ground)


def evaluate(y, pred, groups, num_groups=None, beta: float = 1.0, ground: str = "discrete") -> dict:
    """All docs/math.md §5 metrics in one dict: acc, nmi, bal, mnce, f_beta, fwd_mean, fwd_max.

    With y=None (no ground truth) the keys acc, nmi and f_beta are omitted rather than filled
    with placeholders, so a caller can never average a fake value."""
    pred = _as_labels(pred, "pred")
    groups = _as_labels(groups, "groups")
    _check_lengths(pred=pred, groups=groups)
    counts = count_table(pred, groups, num_groups)
    results = {}
    if y is not None:
        y = _as_labels(y, "y")
        _check_lengths(y=y, pred=pred)
        results["acc"] = accuracy(y, pred)
        results["nmi"] = nmi(y, pred)
    results["bal"] = balance_from_counts(counts)
    results["mnce"] = mnce_from_counts(counts)
    if y is not None:
        results["f_beta"] = f_beta(results["nmi"], results["mnce"], beta)
    results["fwd_mean"], results["fwd_max"] = fwd_from_counts(counts, ground)
    return results


# ----------------------------------------------------------------------------- device-side counting

def contingency(pred: torch.Tensor, groups: torch.Tensor, num_clusters: int, num_groups: int,
                check_inputs: bool = True) -> torch.Tensor:
    """K x T int64 counts n_kt = #{i : pred_i = k, groups_i = t}, computed on the tensors' device
    with one bincount (no copy of the N-vectors). Feed the result to the ``*_from_counts``
    functions; with labels in place of groups it is the K x L table of accuracy_from_counts.

    check_inputs=True validates the value range (one device sync); out-of-range values would
    otherwise be counted in the wrong cell. The result is deterministic (integer counts)."""
    num_clusters = _check_count(num_clusters, "num_clusters")
    num_groups = _check_count(num_groups, "num_groups")
    for name, tensor in (("pred", pred), ("groups", groups)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(tensor.shape)}")
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got dtype {tensor.dtype}")
    if pred.shape[0] != groups.shape[0]:
        raise ValueError(f"length mismatch: pred has length {pred.shape[0]}, "
                         f"groups has length {groups.shape[0]}")
    if pred.device != groups.device:
        raise ValueError(f"groups is on {groups.device} but pred is on {pred.device}")
    if pred.shape[0] == 0:
        raise ValueError("pred is empty")
    if check_inputs:
        for name, tensor, bound in (("pred", pred, num_clusters), ("groups", groups, num_groups)):
            low, high = (int(v) for v in torch.aminmax(tensor))
            if low < 0 or high >= bound:
                limit = "num_clusters" if name == "pred" else "num_groups"
                raise ValueError(f"{name} must be in [0, {limit}={bound}), found [{low}, {high}]")
    flat = pred.to(torch.int64) * num_groups + groups.to(torch.int64)
    return torch.bincount(flat, minlength=num_clusters * num_groups).view(num_clusters, num_groups)
