"""Trainer configurations (plain dataclasses; every field is a hyper-parameter or a run option)."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from fairkernels._device import check_device

METHODS = ("fcmi", "dfc", "dec", "ae-km")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
LR_SCHEDULES = ("cosine", "constant")


@dataclass
class TrainConfig:
    """Options shared by every trainer.

    checkpoint_dir: where `last.pt` is written atomically after every epoch (None: no
    checkpoints). resume: continue from `checkpoint_dir/last.pt` when it exists. device: "cpu" or
    "cuda" (or a torch.device string such as "cuda:1"). backend: the fairkernels op backend.
    eval_chunk_size: rows per chunk when the whole set is encoded / assigned under no_grad.
    dtype: "float32" or "float64" for the data and the model (float64 makes runs comparable
    across process counts to ~1e-12). kmeans_iter: Lloyd iterations per center refresh;
    kmeans_sample_size: rows the refresh encodes and clusters (a fresh uniform sample of the
    set each time; None: every row). The default 32,768 is every row of a small set and keeps
    the refresh of a large one a small part of an epoch (for K = 100, 327 rows per centre;
    measured at N = 10^5, full width: 65,536 rows made the refresh's encoding 18% of the epoch). distributed: True runs under torchrun's process group
    (DistributedDataParallel; batch_size is then the global batch, split evenly across the
    ranks), False never does, None (default) does when WORLD_SIZE > 1."""
    n_clusters: int = 10
    latent_dim: Optional[int] = None          # None: the number of clusters (both papers)
    epochs: int = 300
    batch_size: int = 512
    lr: float = 1e-3
    width: float = 1.0
    seed: int = 0
    device: str = "cpu"
    backend: str = "auto"
    deterministic: bool = False
    progress: bool = True
    verbose: bool = True
    checkpoint_dir: Optional[str] = None
    resume: bool = False
    eval_chunk_size: int = 4096
    kmeans_iter: int = 100
    kmeans_sample_size: Optional[int] = 32_768
    dtype: str = "float32"
    distributed: Optional[bool] = None

    def validate(self) -> None:
        for name in ("n_clusters", "epochs", "batch_size", "eval_chunk_size", "kmeans_iter"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "epochs" else 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.latent_dim is not None and (not isinstance(self.latent_dim, int) or self.latent_dim < 1):
            raise ValueError(f"latent_dim must be a positive int or None, got {self.latent_dim!r}")
        for name in ("lr", "width"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.kmeans_sample_size is not None and (not isinstance(self.kmeans_sample_size, int)
                                                    or isinstance(self.kmeans_sample_size, bool)
                                                    or self.kmeans_sample_size < self.n_clusters):
            raise ValueError(f"kmeans_sample_size must be None or an int >= n_clusters={self.n_clusters}, "
                             f"got {self.kmeans_sample_size!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.distributed not in (None, True, False):
            raise ValueError(f"distributed must be None, True or False, got {self.distributed!r}")
        if str(self.device).split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        check_device(self.device)        # one clear error when CUDA is asked for but absent

    @property
    def embedding_dim(self) -> int:
        return self.latent_dim or self.n_clusters

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


MATCHED_MIN_ROWS_PER_CLUSTER = 5     # centers="auto": fewer rows per group and cluster -> shared
MATCHED_MAX_JOINT_MNCE = 0.5         # centers="auto": joint input k-means at least this fair -> shared


def validate_center_options(config) -> None:
    """The options both trainers share for group-matched centers (docs/math.md §8)."""
    if config.centers not in ("auto", "matched", "shared"):
        raise ValueError(f"centers must be 'auto', 'matched' or 'shared', got {config.centers!r}")
    if not isinstance(config.balanced_assignment, bool):
        raise ValueError(f"balanced_assignment must be True or False, got {config.balanced_assignment!r}")
    if not isinstance(config.match_restarts, int) or isinstance(config.match_restarts, bool) \
            or config.match_restarts < 1:
        raise ValueError(f"match_restarts must be a positive int, got {config.match_restarts!r}")


def resolve_centers_mode(centers: str, n_clusters: int, group_sizes, joint_mnce, allowed: bool = True) -> str:
    """"matched" or "shared" for centers="auto" (other values are returned as they are): matched
    when `allowed` (the method's own conditions), there are >= 2 groups of at least
    MATCHED_MIN_ROWS_PER_CLUSTER rows per cluster, and a joint k-means of the inputs has MNCE
    below MATCHED_MAX_JOINT_MNCE (joint_mnce: a callable, evaluated only when the rest holds)."""
    if centers != "auto":
        return centers
    enough = min(int(size) for size in group_sizes) >= MATCHED_MIN_ROWS_PER_CLUSTER * n_clusters
    if not allowed or not enough or len(group_sizes) < 2:
        return "shared"
    return "matched" if joint_mnce is not None and joint_mnce() < MATCHED_MAX_JOINT_MNCE else "shared"


@dataclass
class FCMIConfig(TrainConfig):
    """FCMI (Zeng et al., CVPR 2023): L = L_rec + alpha L_clu + beta L_fair (docs/math.md §3).

    The first `warmup_epochs` epochs minimise L_rec only. model: "mlp" (FC autoencoder, the
    authors' vector-data network) or "conv" (square images). Defaults are the authors' (Adam
    1e-3, batch 512, alpha 0.04, beta 0.2, tau 0.1, 20 warm-up epochs) except alpha = 0.1 with
    matched centers (see alpha_for and centers), the decay of the rate (lr_schedule) and epochs: 100
    instead of 300, because on sets of up to ~10^5 points the clustering has stopped changing
    well before (the authors' own code on digits-reverse: no label changes after epoch ~60).
    center_refresh: "warm" (Lloyd from the last centres, refresh_iter iterations; default) or
    "restart" (k-means++ and kmeans_iter iterations every epoch, as the authors do).
    normalize_latent / decoder_branch_layers: see fairkernels.models.FCAutoencoder.
    centers: "matched" (K centers per group, paired across groups once by the clusters'
    relative geometry in the inputs; each row is scored against its own group's centers:
    fairkernels.train.matched_centers, docs/math.md §8), "shared" (one set of centers for
    every row, the paper's choice) or "auto" (default: matched when the groups occupy separate
    regions of the input space, i.e. a joint k-means of the inputs has MNCE <
    MATCHED_MAX_JOINT_MNCE, every group has >= 5 rows per cluster and center_refresh="warm";
    else shared). On digits-reverse matched lifts ACC from 0.40 to 0.81 at Balance 0.8; on
    UCI Adult the groups are not separated and auto keeps shared (README, Fidelity).
    match_restarts: seeded k-means runs per group for the pairing (best inertia kept).
    balanced_assignment: with matched centers, predictions add per-(group, cluster) logit
    offsets, fitted after every epoch, that give each group the whole set's cluster shares
    (matched_centers.group_offsets; digits-reverse Balance 0.79 -> 0.91 at equal ACC).
    lr_schedule: "cosine" (default) decays the learning rate of the FCMI epochs from lr to 0
    over a half cosine (the warm-up keeps lr), "constant" keeps lr (the authors' choice). At a
    constant rate the clustering kept moving until the last epoch and the run ended wherever
    that epoch left it: at full width on digits-reverse, Balance 0.92 / 0.44 / 0.96 over seeds
    0-2; with the decay 0.89 / 0.91 / 0.96, and ACC 0.796 -> 0.823 (README, Fidelity)."""
    epochs: int = 100
    batch_size: int = 512
    alpha: Optional[float] = None            # None: 0.04 (shared centers) or 0.1 (matched), see alpha_for
    beta: float = 0.2
    tau: float = 0.1
    warmup_epochs: int = 20
    model: str = "mlp"
    multi_branch: bool = True
    image_channels: int = 1
    center_refresh: str = "warm"
    refresh_iter: int = 10
    normalize_latent: bool = True
    decoder_branch_layers: int = 3
    centers: str = "auto"
    match_restarts: int = 10
    balanced_assignment: bool = True
    lr_schedule: str = "cosine"

    def validate(self) -> None:
        super().validate()
        validate_center_options(self)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.centers == "matched" and self.center_refresh != "warm":
            raise ValueError("centers='matched' keeps each group's clusters paired by warm-started refreshes: "
                             f"it needs center_refresh='warm', got {self.center_refresh!r}")
        if not isinstance(self.warmup_epochs, int) or self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be an int >= 0, got {self.warmup_epochs!r}")
        if not float(self.tau) > 0:
            raise ValueError(f"tau must be > 0, got {self.tau!r}")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)):
            raise ValueError(f"alpha must be a finite number or None, got {self.alpha!r}")
        if self.model not in ("mlp", "conv"):
            raise ValueError(f"model must be 'mlp' or 'conv', got {self.model!r}")
        if self.epochs > 0 and self.warmup_epochs >= self.epochs:
            warnings.warn(f"warmup_epochs={self.warmup_epochs} >= epochs={self.epochs} would train no fairness "
                          f"term; the warm-up is shortened to {self.effective_warmup_epochs} epoch(s). Pass "
                          f"epochs > warmup_epochs to choose it yourself.", UserWarning, stacklevel=3)
        if self.center_refresh not in ("warm", "restart"):
            raise ValueError(f"center_refresh must be 'warm' or 'restart', got {self.center_refresh!r}")
        if not isinstance(self.refresh_iter, int) or isinstance(self.refresh_iter, bool) or self.refresh_iter < 1:
            raise ValueError(f"refresh_iter must be a positive int, got {self.refresh_iter!r}")


    def alpha_for(self, mode: str) -> float:
        """The weight of L_clu: alpha, or when None the authors' 0.04 with shared centers and
        0.1 with matched ones (digits-reverse, 12 seeds: ACC 0.798 -> 0.814 at equal Balance;
        with per-group centers L_clu only sharpens each group's own clusters)."""
        if self.alpha is not None:
            return float(self.alpha)
        return 0.1 if mode == "matched" else 0.04

    def centers_mode(self, group_sizes, joint_mnce=None) -> str:
        """"matched" or "shared" for a data set with these (non-empty) group sizes, where a
        joint k-means of the inputs has MNCE joint_mnce (a callable, evaluated only when the
        other conditions hold; see centers)."""
        return resolve_centers_mode(self.centers, self.n_clusters, group_sizes, joint_mnce,
                                    allowed=self.center_refresh == "warm")

    def learning_rate(self, epoch: int) -> float:
        """The learning rate of `epoch`: lr during the warm-up; then lr, or with
        lr_schedule="cosine" lr * (1 + cos(pi t / T)) / 2 at FCMI epoch t of T (lr at the first,
        near 0 at the last)."""
        warmup = self.effective_warmup_epochs
        if self.lr_schedule == "constant" or epoch < warmup:
            return float(self.lr)
        span = max(self.epochs - warmup, 1)
        return float(self.lr) * 0.5 * (1.0 + math.cos(math.pi * min(epoch - warmup, span) / span))

    @property
    def effective_warmup_epochs(self) -> int:
        """warmup_epochs, or epochs // 5 when the warm-up would leave no FCMI epoch at all."""
        if self.epochs > 0 and self.warmup_epochs >= self.epochs:
            return self.epochs // 5
        return self.warmup_epochs


@dataclass
class DFCConfig(TrainConfig):
    """DFC (Wang & Davidson 2019) and, from the same code, DEC (gamma = 0) and AE + k-means.

    method: "dfc", "dec" or "ae-km". Pretraining: `pretrain_epochs` greedy layer-wise denoising
    epochs per SDAE layer, then `finetune_epochs` end to end (input dropout `dropout`). Then
    `epochs` of KL(P||Q) + gamma KL(Psi||Phi) (+ rec_weight * reconstruction MSE, which also
    trains the decoder; 0 = the encoder and centroids only) (none for ae-km, which runs k-means
    on the embeddings instead) with SGD (lr, momentum) and the DEC target P refreshed every
    `update_interval` iterations. target_refresh: "interval" is DEC's (P of every row from a
    whole-set encoding every update_interval iterations); "lagged" encodes the whole set once
    when clustering starts, then gives each row the P its own Q had at its previous visit (one
    epoch old; the step computes that Q anyway), so it costs no encoding after the first;
    "batch" takes each batch's P from its current Q (no encoding at all; on digits-reverse it
    traded 6-15 points of ACC for fairness); both use cluster frequencies f_k from a running
    mean over batches (momentum target_momentum). "auto" (default) picks "interval" when its
    encodings cost at most a fifth of an epoch's work (N <= 0.6 * batch_size * update_interval,
    about 21k rows at the defaults: a whole-set encoding is about a third of an epoch's forward
    + backward) and "lagged" above, where DEC's refresh dominates (91% of the epoch at 10^6
    rows). centroids_from: the assignments the eq. 12 batch centroids
    M = (W^T W)^-1 W^T Z are fitted to: "target" (W = P, the paper's eq. 12; M is close to the
    hard cluster means) or "q" (W = the soft Q, which blurs M towards the batch mean so Phi looks
    fair while the clusters are not: on digits-reverse it had no effect up to gamma 3 and
    collapsed to one cluster at 10).

    gamma trades clustering quality for fairness: 0 is DEC. The fairoid term asks every centroid
    to be equally far from every group mean; its gradient moves whole clusters (and whole
    groups), so it mixes groups only where the groups are shifted copies of each other. Measured
    with python/dfc_tradeoff.py (3 seeds, digits-reverse, where the group is linearly separable
    in the SDAE embedding; benchmarks/results/dfc_tradeoff.csv): at width 0.25 gamma <= 3
    changes nothing, 10 lowers FWD 0.50 -> 0.40 at 2 points of ACC, 20-100 gain Balance / MNCE
    at 4-16 points of ACC; at width 1 gamma 10 lowers FWD to 0.48 at 1.8 points. The default 10
    is the largest gamma within 3 points of DEC's ACC at both widths; tune it per data set as
    the paper does. That is with the paper's shared centroids; see centers for what DFC does
    where the groups occupy separate regions of the input.

    centers: "matched" (per-group centroids mu [T, K, d], paired across groups once by the
    clusters' relative geometry in the inputs, each row assigned among its own group's K
    centroids: docs/math.md §8), "shared" (the paper's K centroids) or "auto" (default:
    matched for method "dfc" with gamma > 0 (or None) when the groups occupy separate regions
    of the input, as for FCMI; DEC and AE + k-means stay the unconstrained baselines).
    balanced_assignment: with matched centers, the DEC target P is rescaled per (group,
    cluster) so that every group has the whole set's cluster shares (DFCTrainer.balanced_target),
    and predictions add the same kind of offsets. On digits-reverse (3 seeds, width 0.25)
    matched DFC reaches ACC 0.76, Bal 0.90, MNCE 0.997 where shared DFC had 0.36 and Bal 0;
    without the balanced target one group's clusters drift and Bal falls to 0 by the end.
    match_restarts: seeded k-means runs per group for the pairing (best inertia kept)."""
    method: str = "dfc"
    gamma: Optional[float] = None            # None: 10 (shared centers) or 1 (matched), see gamma_for
    beta: float = 1000.0
    alpha: float = 1.0
    batch_size: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    pretrain_epochs: int = 10
    finetune_epochs: int = 20
    pretrain_lr: float = 1e-3
    dropout: float = 0.2
    update_interval: int = 140
    target_refresh: str = "auto"
    target_momentum: float = 0.9
    epochs: int = 100
    centroids_from: str = "target"
    rec_weight: float = 0.0
    centers: str = "auto"
    match_restarts: int = 10
    balanced_assignment: bool = True

    def validate(self) -> None:
        super().validate()
        if self.method not in ("dfc", "dec", "ae-km"):
            raise ValueError(f"method must be 'dfc', 'dec' or 'ae-km', got {self.method!r}")
        for name in ("pretrain_epochs", "finetune_epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not isinstance(self.update_interval, int) or self.update_interval < 1:
            raise ValueError(f"update_interval must be a positive int, got {self.update_interval!r}")
        if self.centroids_from not in ("target", "q"):
            raise ValueError(f"centroids_from must be 'target' or 'q', got {self.centroids_from!r}")
        if self.target_refresh not in ("auto", "interval", "lagged", "batch"):
            raise ValueError("target_refresh must be 'auto', 'interval', 'lagged' or 'batch', "
                             f"got {self.target_refresh!r}")
        if not 0.0 <= float(self.target_momentum) < 1.0:
            raise ValueError(f"target_momentum must be in [0, 1), got {self.target_momentum!r}")
        if not float(self.rec_weight) >= 0:
            raise ValueError(f"rec_weight must be >= 0, got {self.rec_weight!r}")
        if self.gamma is not None and not (isinstance(self.gamma, (int, float)) and not isinstance(self.gamma, bool)
                                           and math.isfinite(self.gamma) and self.gamma >= 0):
            raise ValueError(f"gamma must be a finite number >= 0 or None, got {self.gamma!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        validate_center_options(self)
        if self.centers == "matched" and self.method == "ae-km":
            raise ValueError("centers='matched' applies to the clustering phase of method 'dfc' or 'dec'; "
                             "method 'ae-km' has none")

    def centers_mode(self, group_sizes, joint_mnce=None) -> str:
        """"matched" or "shared" (see centers). "auto" chooses matched only for DFC with
        gamma > 0: pairing the groups' clusters is itself a fairness intervention, so DEC
        (gamma 0) and AE + k-means stay the unconstrained baselines they are."""
        return resolve_centers_mode(self.centers, self.n_clusters, group_sizes, joint_mnce,
                                    allowed=self.method == "dfc" and (self.gamma is None or self.gamma > 0))

    def target_mode(self, num_rows: int) -> str:
        """target_refresh with "auto" resolved for a set of num_rows."""
        if self.target_refresh != "auto":
            return self.target_refresh
        return "interval" if num_rows <= 0.6 * self.batch_size * self.update_interval else "lagged"

    def gamma_for(self, mode: str) -> float:
        """The weight of the fairoid term: 0 for DEC, gamma when set, else 10 with shared
        centroids (the largest within 3 points of DEC's ACC, see above) and 1 with matched ones,
        where the pairing and the balanced target make the clusters fair and a fairoid term
        of 3 or more pulls the groups' embeddings to one mean and breaks the pairing
        (digits-reverse, 3 seeds: gamma 0.1 / 1 / 3 -> Bal 0.94 / 0.90 / 0.43, ACC 0.77 /
        0.76 / 0.69; appearance Bal 0.83 / 0.85 / 0.79)."""
        if self.method == "dec":
            return 0.0
        if self.gamma is not None:
            return float(self.gamma)
        return 1.0 if mode == "matched" else 10.0


def config_for(method: str, **overrides) -> TrainConfig:
    """The config of a method ("fcmi", "dfc", "dec", "ae-km") with overrides applied."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "fcmi":
        return FCMIConfig(**overrides)
    return DFCConfig(method=method, **overrides)


__all__ = ["METHODS", "TrainConfig", "FCMIConfig", "DFCConfig", "config_for"]
