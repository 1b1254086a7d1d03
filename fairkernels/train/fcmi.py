"""FCMI trainer (Zeng et al., CVPR 2023): L = L_rec + alpha L_clu + beta L_fair.

c = softmax(cos(h, u) / tau) with u the spherical k-means centroids of the L2-normalised
embeddings of the whole training set, recomputed before every epoch (here: at the end of the
previous one, which is the same model, so the centers double as that epoch's predictions).
L_clu and L_fair come from the fused fairkernels op (no N x K logits). The first
warmup_epochs minimise the reconstruction only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fairkernels as fk
from fairkernels.models import ConvAutoencoder, FCAutoencoder
from fairkernels.train.base import Trainer, argmax_cosine, encode_all
from fairkernels.train.config import FCMIConfig


class FCMITrainer(Trainer):
    def __init__(self, config: FCMIConfig | None = None, **overrides):
        super().__init__(config if config is not None else FCMIConfig(**overrides))

    def build_model(self, input_dim: int, num_groups: int):
        cfg = self.config
        if cfg.model == "conv":
            side = int(round((input_dim / cfg.image_channels) ** 0.5))
            if cfg.image_channels * side * side != input_dim:
                raise ValueError(f"model='conv' needs square images: {input_dim} features is not "
                                 f"{cfg.image_channels} x side^2")
            return ConvAutoencoder(cfg.embedding_dim, num_groups, in_channels=cfg.image_channels, image_size=side,
                                   width=cfg.width, multi_branch=cfg.multi_branch)
        return FCAutoencoder(input_dim, cfg.embedding_dim, num_groups, width=cfg.width,
                             multi_branch=cfg.multi_branch)

    def phase(self, epoch: int) -> str:
        return "warmup" if epoch < self.config.warmup_epochs else "fcmi"

    def compute_centers(self, X: torch.Tensor, epoch: int) -> torch.Tensor:
        """Spherical k-means centroids of the normalised embeddings of the whole set."""
        from fairkernels.kmeans import kmeans
        cfg = self.config
        h = F.normalize(encode_all(self.model, X, cfg.eval_chunk_size), dim=1)
        result = kmeans(h, cfg.n_clusters, init="k-means++", n_iter=cfg.kmeans_iter, spherical=True,
                        seed=cfg.seed + epoch, deterministic=cfg.deterministic)
        return result.centers.to(h.dtype)

    def begin_epoch(self, epoch, phase, X, groups):
        if phase == "fcmi" and "centers" not in self.state:
            self.state["centers"] = self.compute_centers(X, epoch)

    def batch_losses(self, phase, index, x, groups):
        h, x_hat = self.model(x, groups)
        l_rec = F.mse_loss(x_hat, x)
        if phase == "warmup":
            return l_rec, {"rec": l_rec}
        cfg = self.config
        l_clu, l_fair = fk.fcmi_terms_from_embeddings(h, self.state["centers"], groups, self.num_groups, cfg.tau,
                                                      backend=cfg.backend, deterministic=cfg.deterministic,
                                                      check_inputs=False)
        loss = l_rec + cfg.alpha * l_clu + cfg.beta * l_fair
        return loss, {"rec": l_rec, "clu": l_clu, "fair": l_fair, "loss": loss}

    def end_epoch(self, epoch, phase, X, groups):
        # The centers of epoch + 1 (the model no longer changes before it starts).
        self.state["centers"] = self.compute_centers(X, epoch + 1)
        return self.predict_embeddings(encode_all(self.model, X, self.config.eval_chunk_size))

    def finalize(self, X, groups):
        if "centers" not in self.state:       # epochs == 0: cluster the untrained embeddings
            self.state["centers"] = self.compute_centers(X, 0)
        return self.predict_embeddings(encode_all(self.model, X, self.config.eval_chunk_size))

    def predict_embeddings(self, z):
        return argmax_cosine(z, self.state["centers"], self.config.eval_chunk_size)

    @property
    def cluster_centers_(self):
        return self.state["centers"].cpu().numpy()
