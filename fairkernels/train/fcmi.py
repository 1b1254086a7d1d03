"""FCMI trainer (Zeng et al., CVPR 2023): L = L_rec + alpha L_clu + beta L_fair.

c = softmax(cos(h, u) / tau) with u the spherical k-means centroids of the L2-normalised
embeddings of the training set (every row, or config.kmeans_sample_size of them), refreshed
before every epoch (here: at the end of the previous one, which is the same model, so the
centers double as that epoch's predictions), warm-started from the last centers by default.
L_clu and L_fair come from the fused fairkernels op (no N x K logits). With centers="matched"
(the default wherever every group is large enough) each group has its own K centers, paired
across groups when clustering starts (fairkernels.train.matched_centers), and the logits of a
row are its cosines to its own group's centers; predictions then need the rows' groups. The first
warmup_epochs minimise the reconstruction only (shortened, with a warning, when it would
cover every epoch). With lr_schedule="cosine" (default) the learning rate of the FCMI epochs
decays from lr to 0 (FCMIConfig.learning_rate).

Under DDP the op gets the process group, so L_clu and L_fair are those of the global batch
(docs/math.md §6) and its backward gives each rank the exact gradient of the global terms for its own
rows; see batch_losses for how that meets DDP's gradient averaging.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fairkernels as fk
from fairkernels.models import ConvAutoencoder, FCAutoencoder
from fairkernels.train import matched_centers as matched
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
                             multi_branch=cfg.multi_branch, normalize_latent=cfg.normalize_latent,
                             decoder_branch_layers=cfg.decoder_branch_layers)

    def phase(self, epoch: int) -> str:
        return "warmup" if epoch < self.config.effective_warmup_epochs else "fcmi"

    def learning_rate(self, epoch: int, phase: str) -> float:
        return self.config.learning_rate(epoch)      # config.lr_schedule

    def compute_centers(self, X: torch.Tensor, epoch: int, shard_embeddings=None) -> torch.Tensor:
        """Spherical k-means centroids of the normalised embeddings of the whole set (or of
        config.kmeans_sample_size rows of it). With center_refresh="warm" every refresh after
        the first starts from the last centers and runs refresh_iter Lloyd iterations: the
        clusters keep their identity from epoch to epoch (so the fairness term pushes the same
        clusters every epoch) and the refresh costs a few passes instead of a full k-means++
        restart ("restart", the paper's choice)."""
        cfg = self.config
        previous = self.state.get("centers")
        if cfg.center_refresh == "warm" and previous is not None:
            return self.refresh_kmeans(X, epoch, spherical=True, shard_embeddings=shard_embeddings,
                                       init_centers=previous, n_iter=cfg.refresh_iter)
        return self.refresh_kmeans(X, epoch, spherical=True, shard_embeddings=shard_embeddings)

    def before_training(self, X, groups):
        self.alpha = self.config.alpha_for(self.choose_centers(X, groups))

    def compute_matched_centers(self, X, groups, epoch, shard_embeddings=None):
        """Per-group unit centers [T, K, d]. The first call pairs the groups' clusters on the
        input features (every rank computes the same pairing; rank 0's is broadcast) and takes
        each matched cluster's mean embedding; later calls run refresh_iter warm Lloyd
        iterations on the whole set's (or a kmeans_sample_size sample's) embeddings."""
        cfg, par = self.config, self.parallel
        previous = self.state.get("centers")
        if previous is None:
            labels, h = self.paired_input_clusters(X, groups, shard_embeddings)
            return matched.centers_from_labels(F.normalize(h, dim=1), self.local(groups), labels,
                                               self.num_groups, cfg.n_clusters, par.process_group)
        _, _, local_rows, h = self.refresh_embeddings(X, epoch, shard_embeddings)
        rows_groups = self.local(groups) if local_rows is None else groups[local_rows]
        with self.timed("kmeans"):
            return matched.refresh_matched(F.normalize(h, dim=1), rows_groups, previous.to(h.dtype),
                                           cfg.refresh_iter, cfg.eval_chunk_size, par.process_group)

    def refresh_centers(self, X, groups, epoch, shard_embeddings=None):
        """The centers of `epoch`: per-group ones with matched centers, else shared ones."""
        if self.matched:
            return self.compute_matched_centers(X, groups, epoch, shard_embeddings)
        return self.compute_centers(X, epoch, shard_embeddings)

    def begin_epoch(self, epoch, phase, X, groups):
        if phase == "fcmi" and "centers" not in self.state:
            self.state["centers"] = self.refresh_centers(X, groups, epoch)

    def batch_losses(self, phase, index, x, groups):
        h, x_hat = self.train_forward(x, groups)
        l_rec = F.mse_loss(x_hat, x)
        if phase == "warmup":
            return l_rec, {"rec": l_rec}
        cfg = self.config
        if self.matched:
            logits = matched.matched_logits(h, self.state["centers"], groups, cfg.tau)
            l_clu, l_fair = fk.fcmi_terms(logits, groups, self.num_groups, backend=cfg.backend,
                                          deterministic=cfg.deterministic,
                                          process_group=self.parallel.process_group, check_inputs=False)
        else:
            l_clu, l_fair = fk.fcmi_terms_from_embeddings(h, self.state["centers"], groups, self.num_groups,
                                                          cfg.tau, backend=cfg.backend,
                                                          deterministic=cfg.deterministic,
                                                          process_group=self.parallel.process_group,
                                                          check_inputs=False)
        fcmi_term = self.alpha * l_clu + cfg.beta * l_fair
        loss = l_rec + fcmi_term
        # DDP averages the ranks' gradients. l_rec is this rank's mean over its equal share of
        # the global batch, so the average of its gradients is the gradient of the global mean.
        # The fused op's backward already gives this rank's rows their exact share of the
        # gradient of the global fcmi_term (the shares sum to the whole), so it is scaled by the
        # world size to survive the averaging. With W = 1 this is the plain loss.
        objective = l_rec + self.world_size * fcmi_term if self.world_size > 1 else loss
        return objective, {"rec": l_rec, "clu": l_clu, "fair": l_fair, "loss": loss}

    def end_epoch(self, epoch, phase, X, groups):
        # Warm-up epochs before the last one need no centers (nothing uses them), so they
        # skip the whole-set encoding and the k-means.
        if phase == "warmup" and epoch + 1 < self.config.effective_warmup_epochs:
            return None
        # The centers of epoch + 1 (the model no longer changes before it starts).
        cfg = self.config
        whole_set_refresh = cfg.kmeans_sample_size is None or cfg.kmeans_sample_size >= X.shape[0]
        if not (whole_set_refresh or self._eval_labels is not None or epoch + 1 == self.total_epochs):
            # A large set without labels: the refresh encodes its sample only, and the epoch
            # reports no whole-set metrics (they would cost a forward pass over every row).
            self.state["centers"] = self.refresh_centers(X, groups, epoch + 1)
            return None
        with self.timed("encode"):
            h = encode_all(self.model, self.local(X), cfg.eval_chunk_size)
        self.state["centers"] = self.refresh_centers(X, groups, epoch + 1,
                                                     shard_embeddings=h if whole_set_refresh else None)
        with self.timed("metrics"):
            self.fit_group_offsets(h, self.local(groups), X.shape[0])
            return self.predict_embeddings(h, self.local(groups))

    def finalize(self, X, groups):
        if "centers" not in self.state:       # epochs == 0: cluster the untrained embeddings
            self.state["centers"] = self.refresh_centers(X, groups, 0)
        h = encode_all(self.model, self.local(X), self.config.eval_chunk_size)
        self.fit_group_offsets(h, self.local(groups), X.shape[0])
        return self.predict_embeddings(h, self.local(groups))

    def matched_scores(self, h, groups):
        return matched.matched_logits(h, self.state["centers"], groups, self.config.tau)

    def predict_embeddings(self, z, groups=None):
        if self.matched:
            return self.predict_matched(z, groups)
        return argmax_cosine(z, self.state["centers"], self.config.eval_chunk_size)

    @property
    def cluster_centers_(self):
        """[K, d] shared centers, or [T, K, d] per-group ones (centers="matched")."""
        return self.state["centers"].cpu().numpy()
