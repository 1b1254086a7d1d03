"""Group-matched cluster centers for FCMI: K centers per protected group, with center k of
every group the counterpart of center k of the reference group (docs/math.md §8).

Why: FCMI's loss L_rec + alpha L_clu + beta L_fair is the same for every pairing of one group's
clusters with another's, so with one shared set of centers the fairness term merges the groups'
clusters in whichever pairing is nearest in the embedding (on digits-reverse: original "1"s
with reversed "0"s, ACC 0.40 for the authors' code and ours). Here the pairing is decided once,
when clustering starts, by the clusters' relative geometry inside each group
(fairkernels.matching), and each row is then scored against its own group's centers:

    logits_ik = cos(h_i, u_{g_i, k}) / tau,

so L_fair asks every matched cluster k to hold the same share of every group and L_clu
sharpens each group's own clusters. The pairing is found on the input features: an encoder
trained to reconstruct distorts the groups' geometries differently, while a change of
appearance such as reversal (x -> 1 - x) is an isometry of the input (measured on
digits-reverse: 100% of clusters paired correctly from the inputs, 0-20% from the warm-up
embedding; benchmarks/results/fidelity_matched.csv).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fairkernels import _backend
from fairkernels.ops import torch_kernels
from fairkernels.ops.dfc_embeddings import own_group_products, own_group_student_t_logits
from fairkernels.distributed import all_reduce_
from fairkernels.kmeans import kmeans
from fairkernels.matching import match_clusters

__all__ = ["groups_separated_mnce", "input_matching", "centers_from_labels", "means_from_labels", "own_group_scores",
           "assign_matched", "refresh_matched", "matched_logits", "matched_student_t_logits", "group_offsets",
           "argmax_scores"]


def _best_kmeans(x: torch.Tensor, n_clusters: int, restarts: int, seed: int, max_rows: int | None):
    """Euclidean k-means of x, best inertia of `restarts` seeded runs (stable enough that two
    groups related by an isometry get the same partition). max_rows caps the Lloyd rows."""
    best = None
    sample = max_rows if max_rows is not None and max_rows < x.shape[0] else None
    for restart in range(restarts):
        result = kmeans(x, n_clusters, seed=seed + restart, sample_size=sample)
        if best is None or result.inertia < best.inertia:
            best = result
    return best


def groups_separated_mnce(X: torch.Tensor, groups: torch.Tensor, num_groups: int, n_clusters: int, *,
                          seed: int, max_rows: int | None) -> float:
    """MNCE (docs/math.md §5) of one joint Euclidean k-means of the inputs (of max_rows seeded
    rows): near 0 when the groups occupy separate regions of the input space, as when one group
    is an intensity-reversed copy of the other (digits-reverse: 0.0; UCI Adult by sex: 0.85)."""
    from fairkernels.metrics import mnce
    rows = torch.arange(X.shape[0])
    if max_rows is not None and max_rows < X.shape[0]:
        generator = torch.Generator().manual_seed(seed)
        rows = torch.randperm(X.shape[0], generator=generator)[:max_rows]
    result = _best_kmeans(X[rows.to(X.device)], n_clusters, 3, seed, None)
    return float(mnce(result.labels.cpu().numpy(), groups[rows.to(groups.device)].cpu().numpy(), num_groups))


def input_matching(X: torch.Tensor, groups: torch.Tensor, num_groups: int, n_clusters: int, *,
                   restarts: int, seed: int, max_rows: int | None) -> torch.Tensor:
    """Matched cluster labels of every row (int64, N): each group is clustered on its own input
    features, and its clusters are renumbered so that cluster k pairs with cluster k of the
    reference group (the largest) by relative geometry. Needs >= n_clusters rows per group."""
    sizes = torch.bincount(groups, minlength=num_groups)
    reference = int(sizes.argmax())
    results = {t: _best_kmeans(X[groups == t], n_clusters, restarts, seed + 7919 * t, max_rows)
               for t in range(num_groups) if sizes[t] > 0}
    labels = torch.empty(X.shape[0], dtype=torch.int64, device=X.device)
    ref_centers = results[reference].centers.double().cpu().numpy()
    for t, result in results.items():
        if t == reference:
            renumber = torch.arange(n_clusters)
        else:
            perm = match_clusters(ref_centers, result.centers.double().cpu().numpy(), seed=seed)
            renumber = torch.as_tensor(np.argsort(perm))          # group-t cluster perm[k] -> k
        labels[groups == t] = renumber.to(X.device)[result.labels]
    return labels


def _grouped_sums(h_unit, groups, labels, num_groups, n_clusters, process_group):
    index = groups * n_clusters + labels
    sums = torch.zeros(num_groups * n_clusters, h_unit.shape[1], dtype=torch.float64, device=h_unit.device)
    sums.index_add_(0, index, h_unit.double())
    return all_reduce_(sums, process_group).view(num_groups, n_clusters, -1)


def centers_from_labels(h_unit, groups, labels, num_groups: int, n_clusters: int, process_group=None,
                        fallback=None):
    """Unit centers [T, K, d]: the normalised mean of each (group, cluster)'s unit embeddings.
    A (group, cluster) with no rows keeps `fallback`'s center, or else the group's mean."""
    sums = _grouped_sums(h_unit, groups, labels, num_groups, n_clusters, process_group)
    empty = sums.norm(dim=2) == 0
    if empty.any():
        if fallback is not None:
            sums[empty] = fallback.double()[empty]
        else:
            group_mean = sums.sum(1, keepdim=True).expand_as(sums)
            sums[empty] = group_mean[empty]
    return F.normalize(sums, dim=2).to(h_unit.dtype)


def means_from_labels(z, groups, labels, num_groups: int, n_clusters: int, process_group=None):
    """Euclidean centers [T, K, d] for DEC / DFC: the mean embedding of each (group, cluster).
    A (group, cluster) with no rows gets its group's mean."""
    sums = _grouped_sums(z, groups, labels, num_groups, n_clusters, process_group)
    counts = all_reduce_(torch.bincount(groups * n_clusters + labels, minlength=num_groups * n_clusters).double(),
                         process_group).view(num_groups, n_clusters, 1)
    group_mean = sums.sum(1, keepdim=True) / counts.sum(1, keepdim=True).clamp_min(1)
    means = torch.where(counts > 0, sums / counts.clamp_min(1), group_mean)
    return means.to(z.dtype)


def own_group_scores(h_unit, centers, groups) -> torch.Tensor:
    """cos(h_i, u_{g_i, k}) (B x K) for unit rows (differentiable in h_unit)."""
    return own_group_products(h_unit, F.normalize(centers, dim=2), groups)


def assign_matched(h_unit, centers, groups, chunk_size: int) -> torch.Tensor:
    """argmax_k cos(h_i, u_{g_i, k}) for unit rows h_unit, chunked so no N x T x K tensor."""
    return argmax_scores(lambda rows, rows_groups: own_group_scores(rows, centers, rows_groups), h_unit, groups,
                         chunk_size)


def refresh_matched(h_unit, groups, centers, n_iter: int, chunk_size: int, process_group=None):
    """n_iter spherical Lloyd iterations of every group's centers from `centers` (warm start,
    so cluster k stays cluster k in every group): one assignment and one grouped sum per
    iteration, all-reduced under DDP."""
    T, K, _ = centers.shape
    for _ in range(n_iter):
        labels = assign_matched(h_unit, centers, groups, chunk_size)
        centers = centers_from_labels(h_unit, groups, labels, T, K, process_group, fallback=centers)
    return centers


def matched_logits(h, centers, groups, tau: float) -> torch.Tensor:
    """logits_ik = cos(h_i, u_{g_i, k}) / tau (B x K), differentiable in h."""
    return own_group_scores(F.normalize(h, dim=1), centers, groups) / tau


def matched_student_t_logits(z, centers, groups, alpha: float) -> torch.Tensor:
    """log of DEC's Student-t kernel between each row and its own group's K centers (B x K)
    (docs/math.md §1.1 and §8); its row softmax is the soft assignment q. Differentiable in z
    and centers; the one implementation is the ops layer's (ops/dfc_embeddings.py)."""
    return own_group_student_t_logits(z, centers, groups, alpha)


def group_offsets(logits, groups, num_groups: int, process_group=None, max_iter: int = 200,
                  tol: float = 1e-6) -> torch.Tensor:
    """Per-(group, cluster) logit offsets b [T, K] such that every group's mean soft assignment
    softmax(logits_i + b_{g_i}) equals the whole set's mean softmax(logits_i) (docs/math.md
    §8): the fixed point of b_t <- b_t + log p - log q_t, a Sinkhorn balancing of each group's
    rows against the shared cluster shares p, solved by safeguarded Newton steps (4-10 passes
    over the rows where the Sinkhorn step alone took 40 to over 200). With matched centers
    cluster k is the same cluster in every group, so equal shares are what the fairness term asks for; the argmax
    with these offsets turns them into hard assignments without retraining. Rows from all
    ranks count (sums all-reduced). Groups with no rows get offset 0."""
    T = num_groups
    if process_group is None and _backend.choose("auto", logits.device, logits.dtype, "group_offsets") == "cpu":
        # One process on CPU: the same iterations in one C++ call (csrc/cpu/group_offsets.cpp).
        return torch.ops.fairkernels.group_offsets(logits.detach(), groups, T, max_iter, tol)
    # Tensor ops (any device; under DDP the sums are all-reduced every iteration).
    return torch_kernels.group_offsets(logits, groups, T, max_iter, tol, process_group)


def argmax_scores(score, z, groups, chunk_size: int, offsets=None) -> torch.Tensor:
    """argmax_k (score(z_c, groups_c)[i, k] + offsets[g_i, k]) over chunks of rows."""
    out = []
    for start in range(0, z.shape[0], chunk_size):
        rows_groups = groups[start:start + chunk_size]
        scores = score(z[start:start + chunk_size], rows_groups)
        if offsets is not None:
            scores = scores + offsets[rows_groups]
        out.append(scores.argmax(1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64, device=z.device)
