"""Per-epoch metrics from contingency counts, so that a rank evaluates only its shard.

Every docs/math.md §5 metric is a function of two small tables: n_kt (cluster x group) and n_kl
(cluster x label). A rank counts its shard's predictions on the device, the tables are summed
across ranks (integers: exact), and the metrics follow from the sums; no rank gathers N labels.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fairkernels import metrics


def label_codes(y) -> tuple[np.ndarray, int]:
    """y as codes 0..L-1 of its distinct values (ACC and NMI only depend on the partition)."""
    values, codes = np.unique(np.asarray(y), return_inverse=True)
    return codes.reshape(-1).astype(np.int64), len(values)


def count_pairs(pred: torch.Tensor, other: torch.Tensor, num_clusters: int, num_other: int) -> torch.Tensor:
    """K x M int64 table #{i : pred_i = k, other_i = m}, one bincount on the tensors' device."""
    flat = pred.to(torch.int64) * num_other + other.to(torch.int64)
    return torch.bincount(flat, minlength=num_clusters * num_other).view(num_clusters, num_other)


def _entropy(counts: np.ndarray) -> float:
    # sklearn.metrics.cluster.entropy on the marginal counts of a labelling.
    counts = counts[counts > 0].astype(np.float64)
    total = counts.sum()
    return float(-np.sum((counts / total) * (np.log(counts) - math.log(total))))


def nmi_from_counts(label_counts: np.ndarray) -> float:
    """sklearn normalized_mutual_info_score (arithmetic mean) from a K x L cluster/label table."""
    table = np.asarray(label_counts, dtype=np.int64)
    num_clusters = int((table.sum(1) > 0).sum())
    num_labels = int((table.sum(0) > 0).sum())
    if num_clusters == num_labels == 1:
        return 1.0
    from sklearn.metrics import mutual_info_score  # lazy, as in fairkernels.metrics
    mi = float(mutual_info_score(None, None, contingency=table.T))
    if mi == 0:
        return 0.0
    normalizer = 0.5 * (_entropy(table.sum(0)) + _entropy(table.sum(1)))
    score = mi / normalizer
    return min(max(score, 0.0), 1.0) if math.isfinite(score) else 0.0


def metrics_from_counts(group_counts: np.ndarray, label_counts: np.ndarray | None, beta: float = 1.0) -> dict:
    """The dict of fairkernels.metrics.evaluate (same keys and order) from the two tables."""
    results = {}
    if label_counts is not None:
        results["acc"] = metrics.accuracy_from_counts(label_counts)
        results["nmi"] = nmi_from_counts(label_counts)
    results["bal"] = metrics.balance_from_counts(group_counts)
    results["mnce"] = metrics.mnce_from_counts(group_counts)
    if label_counts is not None:
        results["f_beta"] = metrics.f_beta(results["nmi"], results["mnce"], beta)
    results["fwd_mean"], results["fwd_max"] = metrics.fwd_from_counts(group_counts)
    return results
