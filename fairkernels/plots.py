"""Figures of a training run (matplotlib, Agg backend: no display needed).

    group_histograms   per-cluster counts of every protected group (stacked bars)
    training_curves    loss terms and fairness metrics per epoch from a trainer's history
    embedding_scatter  2-D PCA of the embeddings, coloured by cluster and by group
"""
from __future__ import annotations

import os

import numpy as np


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def group_histograms(pred, groups, path: str, title: str = "") -> str:
    """Stacked bars: for each cluster, how many of its points come from each group."""
    plt = _pyplot()
    pred, groups = np.asarray(pred), np.asarray(groups)
    num_clusters, num_groups = int(pred.max()) + 1, int(groups.max()) + 1
    counts = np.zeros((num_clusters, num_groups), dtype=np.int64)
    np.add.at(counts, (pred, groups), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * num_clusters + 2), 3.5))
    bottom = np.zeros(num_clusters)
    for group in range(num_groups):
        ax.bar(np.arange(num_clusters), counts[:, group], bottom=bottom, label=f"group {group}")
        bottom += counts[:, group]
    ax.set_xlabel("cluster")
    ax.set_ylabel("points")
    ax.set_title(title or "group composition of each cluster")
    if num_groups <= 10:
        ax.legend(fontsize="small")
    return _save(fig, path)


def training_curves(history: list, path: str, title: str = "") -> str:
    """Loss terms (left) and fairness / quality metrics (right) against the epoch."""
    plt = _pyplot()
    losses = ("rec", "clu", "fair", "kl", "loss")
    scores = ("acc", "nmi", "bal", "mnce", "f_beta")
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(10, 3.5))
    for axis, keys in ((ax_loss, losses), (ax_score, scores)):
        for key in keys:
            points = [(record["epoch"] + 1, record[key]) for record in history if key in record]
            if points:
                epochs, values = zip(*points)
                axis.plot(epochs, values, marker=".", label=key)
        axis.set_xlabel("epoch")
        if axis.lines:
            axis.legend(fontsize="small")
    ax_loss.set_title("loss terms")
    ax_score.set_title("metrics")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def pca_2d(embeddings) -> np.ndarray:
    centered = np.asarray(embeddings, dtype=np.float64)
    centered = centered - centered.mean(0)
    if centered.shape[1] <= 2:
        return np.pad(centered, ((0, 0), (0, 2 - centered.shape[1])))
    _, _, components = np.linalg.svd(centered, full_matrices=False)
    return centered @ components[:2].T


def category_colours(values, plt) -> np.ndarray:
    """One RGBA row per value, a distinct qualitative colour per category id (tab10 up to 10
    categories, tab20 up to 20, then a continuous map). Mapping the ids through a normalised
    colormap instead puts ids 0 and 1 of a 2-group set at two nearly identical blues."""
    values = np.asarray(values)
    num = int(values.max()) + 1 if values.size else 1
    if num <= 20:
        from matplotlib.colors import to_rgba_array
        palette = to_rgba_array(plt.get_cmap("tab10" if num <= 10 else "tab20").colors)
        return palette[values % len(palette)]
    return plt.get_cmap("viridis")(values / max(num - 1, 1))


def embedding_figure(embeddings, pred, groups, title: str = "", max_points: int = 20000, seed: int = 0,
                     group_names=None):
    """The figure of embedding_scatter (returned, not saved). The group panel has a legend
    (group_names, else 'group t') when there are at most 20 groups."""
    plt = _pyplot()
    embeddings, pred, groups = np.asarray(embeddings), np.asarray(pred), np.asarray(groups)
    if embeddings.shape[0] > max_points:  # a readable plot needs no more points than this
        keep = np.random.default_rng(seed).choice(embeddings.shape[0], max_points, replace=False)
        embeddings, pred, groups = embeddings[keep], pred[keep], groups[keep]
    coords = pca_2d(embeddings)
    fig, (ax_cluster, ax_group) = plt.subplots(1, 2, figsize=(10, 4.5))
    ax_cluster.scatter(coords[:, 0], coords[:, 1], c=category_colours(pred, plt), s=4, alpha=0.7, linewidths=0)
    num_groups = int(groups.max()) + 1
    colours = category_colours(np.arange(num_groups), plt)
    for group in range(num_groups):          # one artist per group, so the legend can name it
        rows = groups == group
        if rows.any():
            name = group_names[group] if group_names is not None and group < len(group_names) else f"group {group}"
            ax_group.scatter(coords[rows, 0], coords[rows, 1], color=colours[group], s=4, alpha=0.7,
                             linewidths=0, label=str(name))
    if num_groups <= 20:
        ax_group.legend(fontsize="small", markerscale=3, title="group")
    for axis, name in ((ax_cluster, "cluster"), (ax_group, "group")):
        axis.set_title(f"embeddings coloured by {name}")
        axis.set_xticks([])
        axis.set_yticks([])
    if title:
        fig.suptitle(title)
    return fig


def embedding_scatter(embeddings, pred, groups, path: str, title: str = "", max_points: int = 20000,
                      seed: int = 0, group_names=None) -> str:
    """Side-by-side 2-D PCA scatter of the embeddings, coloured by cluster and by group."""
    return _save(embedding_figure(embeddings, pred, groups, title, max_points, seed, group_names), path)


def _save(fig, path: str) -> str:
    import matplotlib.pyplot as plt
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
