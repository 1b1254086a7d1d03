"""DFC trainer (Wang & Davidson 2019) and, from the same code, DEC and AE + k-means.

Schedule (one global epoch counter, so checkpoints and resume cover every stage):
  pretrain-<i>  greedy layer-wise denoising pretraining of SDAE layer i (pretrain_epochs each)
  finetune      end-to-end reconstruction of the whole SDAE (finetune_epochs)
  cluster       KL(P||Q) + gamma KL(Psi||Phi) (+ rec_weight * MSE, then the decoder trains
                too) on the encoder and the centroids mu (epochs; skipped by ae-km). mu starts
                from k-means++ on the embeddings; the DEC target P is refreshed from the whole
                set every update_interval iterations (on large sets each row's P is instead
                the one its Q gave at its previous visit: config.target_refresh); the eq. 12
                batch centroids are fitted to the batch's rows of P (the paper's eq. 12;
                config.centroids_from="q" fits them to Q); the fairoids are kept as state so a
                group absent from a batch keeps its last value.
DEC is gamma = 0 (the fairoid term is then not computed). AE + k-means clusters the fine-tuned
embeddings with k-means.

Under DDP: the fine-tuning forward goes through DistributedDataParallel; the layer-wise
pretraining (which calls single layers) and the clustering phase (whose centroids mu live
outside the model) average their gradients with one explicit all-reduce instead. The DEC target
uses the global f_k (all-reduced) and is gathered to every rank; with the lagged target of
large sets each rank then overwrites the rows it visits, so a row that another rank visits
next keeps the target this rank last wrote for it (or that of the first whole-set refresh).
The batch statistics of the fairness loss (the batch centroid estimate M and the fairoids) are per rank: each rank's L_fr
uses its own share of the global batch, so DFC under DDP matches the single-process run only
in expectation, not step for step (KL(P||Q), a batch mean, is exact with equal shares), and the
denoising dropout masks are drawn per rank.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

import fairkernels as fk
from fairkernels import _backend
from fairkernels.models import StackedAutoencoder
from fairkernels.ops.dfc_embeddings import RIDGE, dfc_loss_kernel, dfc_loss_unchecked
from fairkernels.reference import LOG_EPS
from fairkernels.train import matched_centers as matched
from fairkernels.train.base import Trainer, encode_all, nearest_center
from fairkernels.train.config import DFCConfig
from fairkernels.train.optim import adam, sgd
from fairkernels.train.target_window import TargetWindow


class StepPlan(NamedTuple):
    """DFCTrainer.step_plan: what each clustering step of an epoch does."""
    target_mode: str        # DFCConfig.target_mode: "interval", "lagged" or "batch"
    cpu_target: bool        # the batch DEC target by the C++ kernel (not under DDP)
    balance: bool           # matched centers with balanced_assignment: the target is balanced per group
    weights_from_q: bool    # centroids_from == "q"
    loss_kernel: object     # ops.dfc_embeddings.dfc_loss_kernel: the C++ op of the step's loss, or None


class DFCTrainer(Trainer):
    def __init__(self, config: DFCConfig | None = None, **overrides):
        super().__init__(config if config is not None else DFCConfig(**overrides))
        self.mu = None
        self._step_plan = None
        self._target_window = None     # the epoch's TargetWindow (clustering phase, _run_epoch)

    # ------------------------------------------------------------------ schedule
    @property
    def depth(self) -> int:
        return len(self.model.encoder_layers) if self.model is not None else 4

    @property
    def pretrain_total(self) -> int:
        return self.depth * self.config.pretrain_epochs + self.config.finetune_epochs

    @property
    def total_epochs(self) -> int:
        cluster_epochs = 0 if self.config.method == "ae-km" else self.config.epochs
        return self.pretrain_total + cluster_epochs

    def phase(self, epoch: int) -> str:
        layerwise = self.depth * self.config.pretrain_epochs
        if epoch < layerwise:
            return f"pretrain-{epoch // self.config.pretrain_epochs}"
        return "finetune" if epoch < self.pretrain_total else "cluster"

    def build_model(self, input_dim: int, num_groups: int):
        cfg = self.config
        return StackedAutoencoder(input_dim, cfg.embedding_dim, width=cfg.width, dropout=cfg.dropout)

    def parameters(self, phase: str):
        if phase.startswith("pretrain-"):
            layer = int(phase.split("-")[1])
            return list(self.model.encoder_layers[layer].parameters()) + \
                list(self.model.decoder_layers[layer].parameters())
        if phase == "finetune":
            return list(self.model.parameters())
        # The paper optimises the encoder W, the decoder theta and the centroids; the decoder
        # only gets a gradient when the reconstruction term is kept (rec_weight > 0).
        trained = self.model if self.config.rec_weight > 0 else self.model.encoder_layers
        return list(trained.parameters()) + [self.mu]

    def make_optimizer(self, phase: str):
        cfg = self.config
        if phase == "cluster":
            # flat: one fused update over one buffer (train/optim.py); every trained parameter
            # gets a gradient every step here. Not under DDP, whose buckets hold the gradients.
            return sgd(self.parameters(phase), cfg.lr, cfg.momentum, flat=not self.parallel.active)
        return adam(self.parameters(phase), cfg.pretrain_lr)

    # ------------------------------------------------------------------ epochs
    def before_training(self, X, groups):
        self.gamma = self.config.gamma_for(self.choose_centers(X, groups))

    def begin_epoch(self, epoch, phase, X, groups):
        self._full_X, self._full_groups = X, groups     # refresh_target needs the whole set mid-epoch
        self._step_plan = None                           # resolved at the epoch's first clustering step
        if phase == "cluster" and self.mu is None:
            self.state["mu"] = self.matched_init(X, groups) if self.matched else self.kmeans_centers(X, epoch)
            self.state["iteration"] = 0
            self.state.pop("frequency", None)
            self.state.pop("batch_offsets", None)
            self.state.pop("target", None)
            self.after_restore()

    def after_restore(self):
        if "mu" in self.state:
            self.mu = torch.nn.Parameter(self.state["mu"].detach().clone())

    def kmeans_centers(self, X, epoch, shard_embeddings=None) -> torch.Tensor:
        return self.refresh_kmeans(X, epoch, spherical=False, shard_embeddings=shard_embeddings)

    @torch.no_grad()
    def matched_init(self, X, groups) -> torch.Tensor:
        """Per-group centroids mu [T, K, d] (centers="matched", docs/math.md §8): each group is
        clustered on its input features, its clusters are paired with the largest group's by
        relative geometry, and mu_{t,k} is the mean embedding of group t's cluster k (every
        rank computes the same pairing; rank 0's is broadcast). SGD then moves them as DEC
        moves its shared centroids."""
        labels, z = self.paired_input_clusters(X, groups)
        return matched.means_from_labels(z, self.local(groups), labels, self.num_groups, self.config.n_clusters,
                                         self.parallel.process_group)

    def assign(self, z, groups, check_inputs=True):
        """Soft assignments Q (B x K): Student-t to the shared centroids, or with matched
        centers to each row's own group's centroids."""
        cfg = self.config
        if self.matched:
            return torch.softmax(self.matched_scores(z, groups), dim=1)
        return fk.student_t_assign(z, self.mu, cfg.alpha, backend=cfg.backend, check_inputs=check_inputs)

    def matched_scores(self, z, groups):
        return matched.matched_student_t_logits(z, self.mu, groups, self.config.alpha)

    @torch.no_grad()
    def refresh_target(self, X, groups):
        """DEC target P over the whole set from the current Q (docs/math.md §4); f_k needs every row."""
        cfg = self.config
        z = encode_all(self.model, self.local(X), cfg.eval_chunk_size)
        q = self.assign(z, self.local(groups))
        if not self.parallel.active:
            self.state["target"] = self.balanced_target(fk.dec_target(q, backend=cfg.backend), self.local(groups))
            return
        # docs/math.md §4 with f_k summed over every rank's shard; the batches draw rows from the whole
        # permutation, so every rank gets every row's target.
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        q_acc = q.to(acc)
        frequency = self.parallel.all_reduce_(q_acc.sum(0)).clamp_min(LOG_EPS)
        weight = q_acc * q_acc / frequency
        local = (weight / weight.sum(1, keepdim=True).clamp_min(LOG_EPS)).to(q.dtype)
        local = self.balanced_target(local, self.local(groups))
        self.state["target"] = self.parallel.gather_rows(local, X.shape[0])

    @torch.no_grad()
    def balanced_target(self, target, groups):
        """With matched centers and balanced_assignment: the DEC target rescaled per (group,
        cluster) so that every group's mean target equals the whole set's (docs/math.md §8,
        the Sinkhorn balancing of matched_centers.group_offsets applied to log P). Cluster k
        is the same cluster in every group, so this is the target a fair clustering has; DEC's
        own P lets one group's clusters drift apart from the other's."""
        if not (self.matched and self.config.balanced_assignment):
            return target
        log_p = torch.log(target.clamp_min(LOG_EPS))
        offsets = matched.group_offsets(log_p, groups, self.num_groups, self.parallel.process_group)
        return torch.softmax(log_p + offsets[groups], dim=1).to(target.dtype)

    def step_plan(self, like: torch.Tensor) -> StepPlan:
        """What every clustering step of this epoch does, resolved once (like: a tensor of the
        embeddings' device and dtype, e.g. mu); the per-step lookups it replaces (the target mode, the
        backend choice, the balancing flags) cost a narrow encoder's step tens of microseconds."""
        cfg = self.config
        if self._step_plan is None:
            cpu_target = not self.parallel.active and \
                _backend.choose(cfg.backend, like.device, like.dtype, "dec_batch_target") == "cpu"
            self._step_plan = StepPlan(cfg.target_mode(self._full_X.shape[0]), cpu_target,
                                       self.matched and cfg.balanced_assignment, cfg.centroids_from == "q",
                                       dfc_loss_kernel(cfg.backend, like.device, like.dtype))
        return self._step_plan

    @torch.no_grad()
    def batch_target(self, q, groups=None):
        """DEC target of this batch from its own Q (target_refresh "batch", and the stored P of
        "lagged"): docs/math.md §4 with the cluster frequencies f_k replaced by a running mean of the batches' normalised
        column sums (all-reduced under DDP), so a batch that misses a cluster does not blow up
        its share. A constant of the step, as the interval target is."""
        cfg = self.config
        if not self.parallel.active and \
                _backend.choose(cfg.backend, q.device, q.dtype, "dec_batch_target") == "cpu":
            return self._cpu_batch_target(q, groups, groups is not None and self.matched and cfg.balanced_assignment)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        q_acc = q.detach().to(acc)
        column_sums = q_acc.sum(0)
        if self.parallel.active:
            column_sums = self.parallel.all_reduce_(column_sums)
        batch_frequency = column_sums / column_sums.sum().clamp_min(LOG_EPS)
        running = self.state.get("frequency")
        frequency = batch_frequency if running is None else \
            cfg.target_momentum * running.to(acc) + (1.0 - cfg.target_momentum) * batch_frequency
        self.state["frequency"] = frequency
        weight = q_acc * q_acc / frequency.clamp_min(LOG_EPS)
        target = (weight / weight.sum(1, keepdim=True).clamp_min(LOG_EPS)).to(q.dtype)
        return target if groups is None else self.balanced_target(target, groups)

    def _cpu_batch_target(self, q, groups, balance: bool):
        """batch_target in one C++ call, the balancing included (csrc/cpu/group_offsets.cpp): on
        large sets this runs every step, and as tensor ops it cost more than a narrow encoder's
        step. The balancing starts from the previous batch's offsets (about 10x fewer iterations)."""
        groups = groups if groups is not None else torch.zeros(q.shape[0], dtype=torch.long)
        return self._cpu_batch_targets([(q.detach(), groups)], balance)

    def _cpu_batch_targets(self, batches, balance: bool):
        """_cpu_batch_target of each (q, groups) of batches in turn, in one C++ call (the same
        values): also the lagged targets of a TargetWindow segment, made when it is written back.
        One call a step ran 2-5x slower between the model's ops than back to back (25-60 us
        against 10 us on a 2-core CPU, DFC width 0.25), a segment's call about 5 us a batch."""
        state = self.state
        targets, state["frequency"], offsets = torch.ops.fairkernels.dec_batch_targets(
            [q for q, _ in batches], [groups for _, groups in batches], state.get("frequency"),
            state.get("batch_offsets"), self.config.target_momentum, balance, self.num_groups, 200, 1e-6)
        if balance:
            state["batch_offsets"] = offsets
        return targets

    def _segment_targets(self, batches):
        return self._cpu_batch_targets(batches, self.step_plan(self.mu).balance)

    def batch_losses(self, phase, index, x, groups):
        cfg = self.config
        if phase.startswith("pretrain-"):
            layer = int(phase.split("-")[1])
            with torch.no_grad():
                inputs = self.model.encode(x, upto=layer)
            corrupted = F.dropout(inputs, cfg.dropout, training=True)
            rebuilt = self.model.decode_layer(layer, self.model.encode_layer(layer, corrupted))
            l_rec = F.mse_loss(rebuilt, inputs)
            return l_rec, {"rec": l_rec}
        if phase == "finetune":
            _, x_hat = self.train_forward(x)
            l_rec = F.mse_loss(x_hat, x)
            return l_rec, {"rec": l_rec}
        state = self.state
        plan = self.step_plan(self.mu)
        mode = plan.target_mode
        if (mode == "interval" and state["iteration"] % cfg.update_interval == 0) or \
                (mode == "lagged" and "target" not in state):
            self.refresh_target(self._full_X, self._full_groups)
        state["iteration"] += 1
        if cfg.rec_weight > 0:
            z, x_hat = self.train_forward(x)
        else:
            z = self.model.encode(x)
        if mode == "batch":
            with torch.no_grad():
                target = self.batch_target(self.assign(z, groups, check_inputs=False), groups)
        else:
            window = self._target_window
            target = window.read(state["target"], index) if window is not None else None
            if target is None:
                window = None
                # index_select / index_copy_: half the cost of [index] on a narrow step (index is host-side).
                index = index.to(state["target"].device)
                target = state["target"].index_select(0, index)
        gamma = self.gamma         # DEC (gamma 0) skips the fairness term: it would only cost time
        # Q, KL(P||Q) and gamma KL(Psi||Phi) in one call (one C++ kernel on CPU, ops/dfc_embeddings.py);
        # the eq. 12 centroids are fitted to config.centroids_from ("target": the paper's P, "q": Q).
        # (The arguments were validated once, by the config and fit(); the checks would cost a
        # narrow encoder's step about 0.1 ms.)
        if plan.loss_kernel is not None:
            loss, l_cl, l_fr, q, fairoids = plan.loss_kernel(
                z, self.mu, groups, target, state.get("fairoids"), self.num_groups, cfg.alpha, cfg.beta, gamma, RIDGE,
                plan.weights_from_q)
        else:
            loss, l_cl, l_fr, fairoids, q = dfc_loss_unchecked(
                z, self.mu, groups, self.num_groups, gamma, cfg.alpha, cfg.beta, target, state.get("fairoids"),
                plan.weights_from_q, RIDGE, cfg.backend)
        if mode == "lagged":      # the P these rows get at their next visit, one epoch from now
            # Nothing reads it before then, so with the window it is made when the segment is
            # written back, for all of the segment's batches in one call (_cpu_batch_targets).
            if window is not None and plan.cpu_target:
                window.write_later((q, groups), self._segment_targets)
            else:
                new_target = self._cpu_batch_target(q, groups, plan.balance) if plan.cpu_target else \
                    self.batch_target(q, groups)
                if window is not None:
                    window.write(new_target)
                else:
                    state["target"].index_copy_(0, index, new_target)
        terms = {"kl": l_cl}
        if gamma > 0.0:
            self.state["fairoids"] = fairoids
            terms["fair"] = l_fr
        if cfg.rec_weight > 0:
            l_rec = F.mse_loss(x_hat, x)
            loss = loss + cfg.rec_weight * l_rec
            terms["rec"] = l_rec
        terms["loss"] = loss
        return loss, terms

    def _run_epoch(self, epoch, phase, stream, optimizer):
        # The epoch's batch order is known once its epoch is set (the base loop sets it again).
        if phase == "cluster" and hasattr(stream, "epoch_batches") and \
                self.config.target_mode(self._full_X.shape[0]) != "batch":   # "batch" reads no table
            stream.set_epoch(epoch)
            self._target_window = TargetWindow(stream.epoch_batches())
        try:
            terms = super()._run_epoch(epoch, phase, stream, optimizer)
        finally:
            if self._target_window is not None:
                self._target_window.close()      # the lagged rows written since the last segment
                self._target_window = None
        if self.mu is not None:
            self.state["mu"] = self.mu.detach()
        return terms

    def fit(self, X, groups, y=None):
        self.mu = None
        return super().fit(X, groups, y)

    def end_epoch(self, epoch, phase, X, groups):
        if phase.startswith("pretrain-"):
            return None           # the embedding is incomplete until every layer is trained
        if phase == "cluster" and self._eval_labels is None and epoch + 1 < self.total_epochs:
            # Without labels, no whole-set encoding between clustering epochs: nothing in the
            # method needs it (DEC's refresh encodes on its own schedule, finalize() for the
            # labels), and as a forward pass over every row it cost a quarter of the model's
            # epoch. Such an epoch reports its loss terms only; fit(..., y=...) reports metrics.
            return None
        with self.timed("encode"):
            z = encode_all(self.model, self.local(X), self.config.eval_chunk_size)
        if phase == "finetune":
            self.state["kmeans_centers"] = self.kmeans_centers(X, epoch, shard_embeddings=z)
            return nearest_center(z, self.state["kmeans_centers"], self.config.eval_chunk_size)
        with self.timed("metrics"):
            self.fit_group_offsets(z, self.local(groups), X.shape[0])
            return self.predict_embeddings(z, self.local(groups))

    def finalize(self, X, groups):
        if self.config.method == "ae-km" or self.mu is None:
            self.state["kmeans_centers"] = self.kmeans_centers(X, self.total_epochs)
        z = encode_all(self.model, self.local(X), self.config.eval_chunk_size)
        if self.mu is not None:
            self.fit_group_offsets(z, self.local(groups), X.shape[0])
        return self.predict_embeddings(z, self.local(groups))

    @torch.no_grad()
    def predict_embeddings(self, z, groups=None):
        if self.matched and self.mu is not None:
            return self.predict_matched(z, groups)
        centers = self.mu.detach() if self.mu is not None and self.config.method != "ae-km" \
            else self.state["kmeans_centers"]
        return nearest_center(z, centers, self.config.eval_chunk_size)

    @property
    def cluster_centers_(self):
        """[K, d] shared centroids, or [T, K, d] per-group ones (centers="matched")."""
        centers = self.mu.detach() if self.mu is not None and self.config.method != "ae-km" \
            else self.state["kmeans_centers"]
        return centers.cpu().numpy()
