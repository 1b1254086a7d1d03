"""scikit-learn style estimators: FCMI and DFC (DFC(method="dec") is DEC, method="ae-km" is an
autoencoder followed by k-means).

    >>> from fairkernels.cluster import FCMI
    >>> labels = FCMI(n_clusters=10, epochs=50, device="cuda").fit_predict(X, groups)

Hyper-parameters are set in __init__ only; fit(X, groups) learns; the fitted state has trailing
underscores (labels_, cluster_centers_, history_, trainer_). Works with sklearn.base.clone.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from sklearn.base import BaseEstimator, ClusterMixin

from fairkernels.train import DFCConfig, DFCTrainer, FCMIConfig, FCMITrainer


class _DeepFairClusterer(ClusterMixin, BaseEstimator):
    """Shared fit/predict/transform; a subclass names its trainer and config classes."""

    _trainer_class = FCMITrainer
    _config_class = FCMIConfig

    def _trainer(self):
        params = self.get_params()
        params["seed"] = params.pop("random_state")
        return self._trainer_class(self._config_class(**params))

    def fit(self, X, groups, y=None):
        """Learn the clustering of X (N x D) fair with respect to groups (N integers in 0..T-1).
        y (optional ground-truth labels) is only used for the per-epoch metrics in history_."""
        if groups is None:
            raise ValueError("groups is required: fair clustering needs the protected group of every row")
        trainer = self._trainer()
        trainer.fit(X, groups, y)
        self.trainer_ = trainer
        self.labels_ = trainer.labels_
        self.cluster_centers_ = trainer.cluster_centers_
        self.history_ = trainer.history
        self.n_features_in_ = trainer.model.input_dim
        return self

    def fit_predict(self, X, groups, y=None):
        return self.fit(X, groups, y).labels_

    def _fitted(self):
        if not hasattr(self, "trainer_"):
            raise RuntimeError(f"this {type(self).__name__} is not fitted yet; call fit(X, groups) first")
        return self.trainer_

    def _check_n_features(self, X) -> None:
        """scikit-learn's check and wording, before the model's matrix product fails obscurely."""
        shape = tuple(X.shape) if hasattr(X, "shape") else np.shape(X)
        if len(shape) == 2 and shape[1] != self.n_features_in_:
            raise ValueError(f"X has {shape[1]} features, but {type(self).__name__} is expecting "
                             f"{self.n_features_in_} features as input.")

    def predict(self, X, groups=None):
        """Cluster of each row of X under the fitted model. groups (the rows' protected groups)
        is required by models with per-group centers (centers="matched", chosen by "auto"
        when the groups occupy separate regions of the input) and ignored otherwise."""
        trainer = self._fitted()
        self._check_n_features(X)
        return trainer.predict(X, groups)

    def transform(self, X):
        """Embeddings [N, latent_dim] of the rows of X."""
        trainer = self._fitted()
        self._check_n_features(X)
        return trainer.transform(X)


class FCMI(_DeepFairClusterer):
    """Deep fair clustering via maximising and minimising mutual information (Zeng et al. 2023).

    See fairkernels.train.FCMIConfig for every parameter; random_state seeds the run."""

    def __init__(self, n_clusters: int = 10, *, latent_dim: Optional[int] = None, alpha: Optional[float] = None,
                 beta: float = 0.2, tau: float = 0.1, epochs: int = 100, warmup_epochs: int = 20,
                 batch_size: int = 512, lr: float = 1e-3, width: float = 1.0, model: str = "mlp",
                 multi_branch: bool = True, centers: str = "auto", lr_schedule: str = "cosine",
                 kmeans_iter: int = 100, device: str = "cpu", backend: str = "auto", random_state: int = 0,
                 checkpoint_dir: Optional[str] = None, resume: bool = False, progress: bool = False,
                 verbose: bool = False):
        self.n_clusters = n_clusters
        self.latent_dim = latent_dim
        self.lr_schedule = lr_schedule
        self.alpha = alpha
        self.beta = beta
        self.tau = tau
        self.epochs = epochs
        self.warmup_epochs = warmup_epochs
        self.batch_size = batch_size
        self.lr = lr
        self.width = width
        self.model = model
        self.multi_branch = multi_branch
        self.centers = centers
        self.kmeans_iter = kmeans_iter
        self.device = device
        self.backend = backend
        self.random_state = random_state
        self.checkpoint_dir = checkpoint_dir
        self.resume = resume
        self.progress = progress
        self.verbose = verbose

    _trainer_class = FCMITrainer
    _config_class = FCMIConfig


class DFC(_DeepFairClusterer):
    """Deep fair clustering with fairoids (Wang & Davidson 2019); method="dec" gives DEC
    (gamma = 0) and method="ae-km" an SDAE followed by k-means. gamma trades ACC for fairness;
    centers="auto" gives DFC per-group matched centroids where the groups separate in the input
    (then predict needs the groups).

    See fairkernels.train.DFCConfig for every parameter; random_state seeds the run."""

    def __init__(self, n_clusters: int = 10, *, method: str = "dfc", latent_dim: Optional[int] = None,
                 gamma: Optional[float] = None, beta: float = 1000.0, alpha: float = 1.0, epochs: int = 100,
                 pretrain_epochs: int = 10, finetune_epochs: int = 20, batch_size: int = 256, lr: float = 0.01,
                 momentum: float = 0.9, pretrain_lr: float = 1e-3, dropout: float = 0.2, update_interval: int = 140,
                 target_refresh: str = "auto", target_momentum: float = 0.9,
                 centroids_from: str = "target", rec_weight: float = 0.0, centers: str = "auto",
                 width: float = 1.0, kmeans_iter: int = 100, device: str = "cpu", backend: str = "auto",
                 random_state: int = 0, checkpoint_dir: Optional[str] = None, resume: bool = False,
                 progress: bool = False, verbose: bool = False):
        self.n_clusters = n_clusters
        self.method = method
        self.centroids_from = centroids_from
        self.rec_weight = rec_weight
        self.centers = centers
        self.latent_dim = latent_dim
        self.gamma = gamma
        self.beta = beta
        self.alpha = alpha
        self.epochs = epochs
        self.pretrain_epochs = pretrain_epochs
        self.finetune_epochs = finetune_epochs
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.pretrain_lr = pretrain_lr
        self.dropout = dropout
        self.update_interval = update_interval
        self.target_refresh = target_refresh
        self.target_momentum = target_momentum
        self.width = width
        self.kmeans_iter = kmeans_iter
        self.device = device
        self.backend = backend
        self.random_state = random_state
        self.checkpoint_dir = checkpoint_dir
        self.resume = resume
        self.progress = progress
        self.verbose = verbose

    _trainer_class = DFCTrainer
    _config_class = DFCConfig


__all__ = ["DFC", "FCMI"]
