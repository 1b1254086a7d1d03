"""The training loop every method shares: seeding, per-epoch phases, batches from BatchStream,
loss terms accumulated on the device (one host sync per epoch), non-finite detection, per-epoch
metrics and history, atomic checkpoints after every epoch and resume.

A method subclasses Trainer and supplies: build_model, phase(epoch), parameters(phase),
begin_epoch, batch_losses, end_epoch (predictions for the rows of `self.local(X)`, or None) and
predict_embeddings.

Under torchrun (config.distributed, or WORLD_SIZE > 1; see fairkernels.train.parallel) the model
is wrapped in DistributedDataParallel with its BatchNorm layers normalising by the global batch,
each rank trains on its slice of every global batch of `batch_size` rows, the k-means refresh
clusters per-rank shards with all-reduced sums (kmeans(process_group=...)), the metrics come
from all-reduced contingency counts, and rank 0 alone logs and writes checkpoints. With the same
seed and global batch the run follows the single-process one up to float rounding.
"""
from __future__ import annotations

import abc
import contextlib
import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fairkernels.train import checkpoint as ckpt
from fairkernels.train.config import TrainConfig
from fairkernels.train.evaluation import count_pairs, label_codes, metrics_from_counts
from fairkernels.train.optim import adam, loop_steps
from fairkernels.train.parallel import Parallel, local_device, wants_distributed
from fairkernels.train.sync_batchnorm import convert_batch_norm


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or inf; the message names the epoch, the term and the checkpoint."""


def as_float_tensor(X, name: str = "X", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if isinstance(X, torch.Tensor):
        tensor = X.detach().to("cpu", dtype)
    else:
        try:
            tensor = torch.as_tensor(np.asarray(X, dtype=np.float64 if dtype == torch.float64 else np.float32))
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} must be a numeric array, got {type(X).__name__}") from err
    if tensor.dim() != 2 or tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array [N, D], got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or inf")
    return tensor


def as_group_tensor(groups, num_rows: int, name: str = "groups") -> tuple[torch.Tensor, int]:
    values = groups.detach().cpu().numpy() if isinstance(groups, torch.Tensor) else np.asarray(groups)
    if values.ndim != 1 or values.shape[0] != num_rows:
        raise ValueError(f"{name} must be a vector of length {num_rows}, got shape {values.shape}")
    if values.dtype.kind not in "iub":
        if values.dtype.kind == "f" and np.all(np.isfinite(values)) and np.all(values == np.round(values)):
            values = values.astype(np.int64)
        else:
            raise TypeError(f"{name} must hold integers, got dtype {values.dtype}")
    if values.min() < 0:
        raise ValueError(f"{name} must be >= 0, found {values.min()}")
    return torch.as_tensor(values.astype(np.int64)), int(values.max()) + 1


@torch.no_grad()
def encode_all(model, X: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Embeddings of every row in eval mode, chunk by chunk (BatchNorm uses running stats)."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model.encode(X[start:start + chunk_size]) for start in range(0, X.shape[0], chunk_size)])
    finally:
        model.train(was_training)


@torch.no_grad()
def argmax_cosine(h: torch.Tensor, centers: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """argmax_k cos(h_i, u_k) = argmax_k <h_i, u_k / ||u_k||> (the ||h_i|| factor does not
    change the argmax), chunk by chunk: never an N x K matrix."""
    unit = F.normalize(centers, dim=1)
    return torch.cat([(h[s:s + chunk_size] @ unit.t()).argmax(1) for s in range(0, h.shape[0], chunk_size)])


@torch.no_grad()
def nearest_center(z: torch.Tensor, centers: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """argmin_k ||z_i - mu_k||^2 (= argmax of the Student-t q), chunked."""
    half_sq = 0.5 * centers.square().sum(1)
    return torch.cat([(z[s:s + chunk_size] @ centers.t() - half_sq).argmax(1)
                      for s in range(0, z.shape[0], chunk_size)])


class Trainer(abc.ABC):
    """Base trainer; see the module docstring for what a method supplies."""

    def __init__(self, config: TrainConfig):
        config.validate()
        self.config = config
        self.device = torch.device(config.device)
        self.model = None
        self.ddp = None                      # the DistributedDataParallel wrapper of self.model
        self.parallel = Parallel(False, self.device)
        self.eval_shard = slice(None)
        self._ddp_forward_ran = False
        self.history: list[dict] = []
        self.state: dict = {}
        self.labels_ = None
        self.num_groups = None
        self.epochs_run = 0
        # Seconds spent per part of fit() ("train", "encode", "kmeans", "metrics", "checkpoint"),
        # filled only when profile is True (each section then synchronises the device).
        self.profile = False
        self.timings: dict = defaultdict(float)

    @contextlib.contextmanager
    def timed(self, name: str):
        """Adds the wall time of the block to self.timings[name] when self.profile is on."""
        if not self.profile:
            yield
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.timings[name] += time.perf_counter() - started

    # ------------------------------------------------------------------ method hooks
    @property
    def total_epochs(self) -> int:
        return self.config.epochs

    @abc.abstractmethod
    def build_model(self, input_dim: int, num_groups: int):
        """The method's autoencoder for rows of input_dim features and num_groups groups."""

    def phase(self, epoch: int) -> str:
        return "train"

    def parameters(self, phase: str):
        return self.model.parameters()

    def make_optimizer(self, phase: str):
        return adam(self.parameters(phase), self.config.lr)

    def learning_rate(self, epoch: int, phase: str):
        """The learning rate the optimiser uses in `epoch` (set before its first batch, so a
        resumed run follows the same schedule), or None to leave the optimiser's own."""
        return None

    def begin_epoch(self, epoch: int, phase: str, X: torch.Tensor, groups: torch.Tensor) -> None:
        """Epoch-level state (centers, targets) computed before the first batch."""

    @abc.abstractmethod
    def batch_losses(self, phase: str, index, x, groups):
        """-> (loss to minimise, dict of named 0-dim loss terms for the history)."""

    def end_epoch(self, epoch: int, phase: str, X: torch.Tensor, groups: torch.Tensor):
        """Predicted labels (tensor on the device) for the whole set, or None."""
        return None

    @abc.abstractmethod
    def finalize(self, X: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Final labels of the training set."""

    @abc.abstractmethod
    def predict_embeddings(self, z: torch.Tensor, groups=None) -> torch.Tensor:
        """Cluster labels of embeddings z with the fitted centers (groups: the rows' groups,
        for models whose centers depend on the group)."""

    def before_training(self, X: torch.Tensor, groups: torch.Tensor) -> None:
        """Choices that depend on the data set (called once per fit, before the first epoch)."""

    # ------------------------------------------------------------------ group-matched centers
    _centers_mode = "shared"

    @property
    def matched(self) -> bool:
        """Per-group centers (config.centers="matched", or "auto" resolved so at fit time)."""
        return self._centers_mode == "matched"

    def choose_centers(self, X: torch.Tensor, groups: torch.Tensor) -> str:
        """Resolve config.centers for this data set (docs/math.md §8) into self._centers_mode and
        record the choice and its evidence in self.centers_info (also in the CLI's
        metrics.json). Under DDP every rank takes rank 0's joint k-means."""
        from fairkernels.train import matched_centers as matched
        cfg = self.config
        sizes = torch.bincount(groups.cpu(), minlength=self.num_groups)
        present = sizes[sizes > 0]
        self.centers_info = {}

        def joint_mnce():
            with self.timed("kmeans"):
                value = torch.tensor([matched.groups_separated_mnce(X, groups, self.num_groups, cfg.n_clusters,
                                                                    seed=cfg.seed, max_rows=cfg.kmeans_sample_size)],
                                     dtype=torch.float64, device=X.device)
                self.parallel.broadcast_(value)
            self.centers_info["joint_input_mnce"] = float(value)
            return float(value)
        mode = cfg.centers_mode(present, joint_mnce)
        if mode == "matched" and int(present.min()) < cfg.n_clusters:
            raise ValueError(f"centers='matched' clusters every group on its own, but a group has only "
                             f"{int(present.min())} rows for n_clusters={cfg.n_clusters}; "
                             f"use centers='shared' (or 'auto')")
        self.centers_info["mode"] = self._centers_mode = mode
        return mode

    @torch.no_grad()
    def paired_input_clusters(self, X: torch.Tensor, groups: torch.Tensor, shard_embeddings=None):
        """(labels, embeddings) of this rank's shard when matched clustering starts: every
        group clustered on its input features, its clusters renumbered to pair with the
        largest group's by relative geometry (matched_centers.input_matching; every rank
        computes the same pairing, rank 0's is broadcast), and the rows' current embeddings."""
        from fairkernels.train import matched_centers as matched
        cfg = self.config
        with self.timed("kmeans"):
            labels = matched.input_matching(X, groups, self.num_groups, cfg.n_clusters,
                                            restarts=cfg.match_restarts, seed=cfg.seed,
                                            max_rows=cfg.kmeans_sample_size)
            self.parallel.broadcast_(labels)
        with self.timed("encode"):
            z = shard_embeddings if shard_embeddings is not None else \
                encode_all(self.model, self.local(X), cfg.eval_chunk_size)
        return self.local(labels), z

    @abc.abstractmethod
    def matched_scores(self, z: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """With matched centers: the B x K logits of rows z against their own group's centers."""

    @torch.no_grad()
    def fit_group_offsets(self, z: torch.Tensor, groups: torch.Tensor, num_rows: int) -> None:
        """With matched centers and config.balanced_assignment, the per-(group, cluster) logit
        offsets of the current model (matched_centers.group_offsets), stored for predict. z:
        the embeddings of this rank's shard of the num_rows rows; above kmeans_sample_size
        rows they are fitted on a seeded sample of the whole set (each rank takes the sampled
        rows of its shard), so W processes fit the same offsets as one."""
        from fairkernels.train import matched_centers as matched
        cfg = self.config
        if not (self.matched and cfg.balanced_assignment):
            return
        if cfg.kmeans_sample_size is not None and num_rows > cfg.kmeans_sample_size:
            generator = torch.Generator().manual_seed(cfg.seed * 7_368_787 + 17)
            rows = torch.randperm(num_rows, generator=generator)[:cfg.kmeans_sample_size].sort().values
            shard = self.eval_shard
            mine = rows[(rows >= shard.start) & (rows < shard.stop)] - shard.start
            z, groups = z[mine.to(z.device)], groups[mine.to(groups.device)]
        # kmeans_sample_size rows at most (the whole set when it is None): small N x K logits.
        self.state["group_offsets"] = matched.group_offsets(self.matched_scores(z, groups), groups,
                                                            self.num_groups, self.parallel.process_group)

    def predict_matched(self, z: torch.Tensor, groups) -> torch.Tensor:
        """argmax_k of matched_scores plus the balancing offsets, chunked."""
        from fairkernels.train import matched_centers as matched
        if groups is None:
            name = type(self).__name__.removesuffix("Trainer")
            raise ValueError(f"groups is required: this {name} model has per-group centers "
                             f"(centers='matched'), so a row's cluster depends on its group; pass predict(X, groups)")
        return matched.argmax_scores(self.matched_scores, z, groups, self.config.eval_chunk_size,
                                     self.state.get("group_offsets"))

    # ------------------------------------------------------------------ public API
    def fit(self, X, groups, y=None):
        cfg = self.config
        self.device = local_device(cfg.device)
        self.parallel = Parallel(wants_distributed(cfg.distributed), self.device)
        dtype = cfg.torch_dtype
        X_cpu = as_float_tensor(X, dtype=dtype)
        num_rows = X_cpu.shape[0]
        groups_cpu, num_groups = as_group_tensor(groups, num_rows)
        if y is not None:
            y = np.asarray(y)
            if y.shape != (num_rows,):
                raise ValueError(f"y must be a vector of length {num_rows}, got shape {y.shape}")
        X_dev, groups_dev = X_cpu.to(self.device), groups_cpu.to(self.device)
        self.eval_shard = self.parallel.shard(num_rows)
        self._eval_labels = None
        if y is not None:
            codes, num_labels = label_codes(y)
            self._eval_labels = (torch.as_tensor(codes)[self.eval_shard].to(self.device), num_labels)
        self.num_groups = num_groups
        ckpt.seed_everything(cfg.seed)
        self.model = self.build_model(X_cpu.shape[1], num_groups).to(self.device, dtype)
        self.history, self.state = [], {}
        self.before_training(X_dev, groups_dev)
        start_epoch, saved_optimizer, saved_phase = 0, None, None
        path = ckpt.checkpoint_path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
        if cfg.resume and path and os.path.exists(path):
            start_epoch, saved_optimizer, saved_phase = self._restore(ckpt.load(path, self.device), X_cpu, num_groups)
        self._wrap_model()

        stream = self.parallel.batch_stream(X_cpu, groups_cpu, cfg.batch_size, seed=cfg.seed, device=self.device)
        optimizer, optimizer_phase = None, None
        talk = self.parallel.is_rank_zero
        epoch_bar = tqdm(range(start_epoch, self.total_epochs), desc=type(self).__name__,
                         disable=not (cfg.progress and talk), initial=start_epoch, total=self.total_epochs,
                         file=sys.stderr)
        for epoch in epoch_bar:
            started = time.perf_counter()
            phase = self.phase(epoch)
            self.begin_epoch(epoch, phase, X_dev, groups_dev)
            if phase != optimizer_phase:
                optimizer, optimizer_phase = self.make_optimizer(phase), phase
                if saved_optimizer is not None and saved_phase == phase:
                    optimizer.load_state_dict(saved_optimizer)
                saved_optimizer = None
            lr = self.learning_rate(epoch, phase)
            if lr is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr
            with self.timed("train"):
                terms = self._run_epoch(epoch, phase, stream, optimizer)
            self._check_finite(epoch, terms, path)
            pred = self.end_epoch(epoch, phase, X_dev, groups_dev)
            record = {"epoch": epoch, "phase": phase, **terms}
            if lr is not None:
                record["lr"] = lr
            if pred is not None:
                with self.timed("metrics"):
                    record.update(self._evaluate(pred, self.local(groups_dev)))
            record["seconds"] = time.perf_counter() - started
            if self.profile:
                record["timings"] = dict(self.timings)      # cumulative, see Trainer.timed
            self.history.append(record)
            if cfg.verbose and talk:
                tqdm.write(_format_record(record, self.total_epochs), file=sys.stderr)
            if path:
                with self.timed("checkpoint"):
                    if talk:
                        self._save(path, epoch, optimizer, phase)
                    self.parallel.barrier()      # no rank reads or resumes from a half-written epoch
            self.epochs_run += 1
        epoch_bar.close()
        self.labels_ = self.parallel.gather_rows(self.finalize(X_dev, groups_dev), num_rows).cpu().numpy()
        return self

    def transform(self, X) -> np.ndarray:
        self._check_fitted()
        X_dev = as_float_tensor(X, dtype=self.config.torch_dtype).to(self.device)
        return encode_all(self.model, X_dev, self.config.eval_chunk_size).cpu().numpy()

    def predict(self, X, groups=None) -> np.ndarray:
        """Clusters of the rows of X; groups (their protected groups) is needed by models with
        per-group centers (centers="matched") and ignored by the others."""
        self._check_fitted()
        X_dev = as_float_tensor(X, dtype=self.config.torch_dtype).to(self.device)
        if groups is not None:
            groups, _ = as_group_tensor(groups, X_dev.shape[0])
            if int(groups.max()) >= self.num_groups:
                raise ValueError(f"groups has id {int(groups.max())} but the model was fitted on "
                                 f"{self.num_groups} groups (ids 0..{self.num_groups - 1})")
            groups = groups.to(self.device)
        z = encode_all(self.model, X_dev, self.config.eval_chunk_size)
        return self.predict_embeddings(z, groups).cpu().numpy()

    def _check_fitted(self) -> None:
        if self.model is None or self.labels_ is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted yet; call fit(X, groups) first")

    # ------------------------------------------------------------------ distributed pieces
    @property
    def world_size(self) -> int:
        return self.parallel.world_size

    def local(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's evaluation shard of a whole-set tensor (all of it in one process)."""
        return rows[self.eval_shard]

    def train_forward(self, *inputs):
        """The model's forward for a training batch: through DDP when distributed, so its
        gradient all-reduce runs in the backward."""
        if self.ddp is not None and torch.is_grad_enabled():
            self._ddp_forward_ran = True
            return self.ddp(*inputs)
        return self.model(*inputs)

    def _wrap_model(self) -> None:
        self.ddp = None
        if not self.parallel.active:
            return
        from torch.nn.parallel import DistributedDataParallel
        convert_batch_norm(self.model, self.parallel.process_group)
        self.ddp = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                                           else None, process_group=self.parallel.ddp_group)
        self._ddp_param_ids = {id(p) for p in self.model.parameters()}

    def _sync_gradients(self, optimizer) -> None:
        """Average across ranks the gradients DDP did not: every parameter when the batch did
        not go through DDP's forward, else those outside the wrapped model."""
        if not self.parallel.active:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self._ddp_forward_ran:
            params = [p for p in params if id(p) not in self._ddp_param_ids]
        self.parallel.average_gradients(params)

    @torch.no_grad()
    def refresh_embeddings(self, X: torch.Tensor, epoch: int, shard_embeddings=None):
        """(generator, rows, local_rows, embeddings) of a center refresh: rows are the whole
        set's, or a fresh seeded sample of config.kmeans_sample_size of them (the same on every
        rank); local_rows this rank's share of them (None: self.local(X)), and embeddings
        theirs (shard_embeddings, the embeddings of self.local(X), when the caller has them).
        The generator continues the sample's stream (e.g. for k-means++ seeding rows)."""
        cfg, par = self.config, self.parallel
        num_rows = X.shape[0]
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        sample_size = cfg.kmeans_sample_size
        with self.timed("encode"):
            if sample_size is None or sample_size >= num_rows:
                local = shard_embeddings if shard_embeddings is not None else \
                    encode_all(self.model, self.local(X), cfg.eval_chunk_size)
                return generator, torch.arange(num_rows), None, local
            rows = torch.randperm(num_rows, generator=generator)[:max(sample_size, par.world_size)].sort().values
            local_rows = rows[par.shard(rows.shape[0])].to(X.device)
            return generator, rows, local_rows, encode_all(self.model, X[local_rows], cfg.eval_chunk_size)

    @torch.no_grad()
    def refresh_kmeans(self, X: torch.Tensor, epoch: int, *, spherical: bool, shard_embeddings=None,
                       init_centers=None, n_iter=None):
        """k-means centers of the embeddings of the set (or of a fresh sample of
        config.kmeans_sample_size rows), each rank clustering its shard with all-reduced sums.

        k-means++ runs on the same seeding rows on every rank (max(50 K, 10^4) of them, the
        kmeans module's rule), rank 0's result is broadcast, then Lloyd refines it over all the
        rows: the same centers as one process, which would see the same rows.
        shard_embeddings: the embeddings of self.local(X), when the caller already has them.
        init_centers: warm start from these centers (e.g. the last refresh's) instead of
        k-means++; n_iter: Lloyd iterations (default config.kmeans_iter)."""
        from fairkernels.kmeans import SEED_POINTS_PER_CLUSTER, SEED_SAMPLE_MIN, kmeans
        cfg, par = self.config, self.parallel
        generator, rows, _, local = self.refresh_embeddings(X, epoch, shard_embeddings)
        if spherical:
            local = F.normalize(local, dim=1)
        with self.timed("kmeans"):
            if init_centers is None:
                seed_count = min(rows.shape[0], max(SEED_POINTS_PER_CLUSTER * cfg.n_clusters, SEED_SAMPLE_MIN))
                seed_rows = rows[torch.randperm(rows.shape[0], generator=generator)[:seed_count]].sort().values
                seeds = encode_all(self.model, X[seed_rows.to(X.device)], cfg.eval_chunk_size)
                if spherical:
                    seeds = F.normalize(seeds, dim=1)
                init = kmeans(seeds, cfg.n_clusters, init="k-means++", n_iter=0, spherical=spherical,
                              seed=cfg.seed + epoch, deterministic=cfg.deterministic).centers
                par.broadcast_(init)
            else:
                init = init_centers.to(local.device, local.dtype)   # identical on every rank already
            result = kmeans(local, cfg.n_clusters, init_centers=init,
                            n_iter=cfg.kmeans_iter if n_iter is None else n_iter, spherical=spherical,
                            seed=cfg.seed + epoch, deterministic=cfg.deterministic,
                            process_group=par.process_group)
        return result.centers.to(local.dtype)

    def _evaluate(self, pred: torch.Tensor, groups: torch.Tensor) -> dict:
        """docs/math.md §5 metrics of the whole set from this rank's predictions (its shard) and the
        all-reduced K x T and K x L count tables."""
        num_clusters, num_groups = self.config.n_clusters, self.num_groups
        tables = [count_pairs(pred, groups, num_clusters, num_groups).reshape(-1)]
        if self._eval_labels is not None:
            labels, num_labels = self._eval_labels
            tables.append(count_pairs(pred, labels, num_clusters, num_labels).reshape(-1))
        packed = self.parallel.all_reduce_(torch.cat(tables)).cpu().numpy()
        group_counts = packed[:num_clusters * num_groups].reshape(num_clusters, num_groups)
        label_counts = packed[num_clusters * num_groups:].reshape(num_clusters, -1) \
            if self._eval_labels is not None else None
        return metrics_from_counts(group_counts, label_counts)

    # ------------------------------------------------------------------ internals
    def _run_epoch(self, epoch: int, phase: str, stream, optimizer) -> dict:
        self.model.train()
        stream.set_epoch(epoch)
        collected, names = [], None
        progress = self.config.progress and self.parallel.is_rank_zero
        # This loop owns the model and the optimizer for the epoch: LeanSGD's flat update then
        # checks its views once, not every step (optim.loop_steps).
        zero_grad, step = loop_steps(optimizer)
        for index, x, g in tqdm(stream, desc=f"epoch {epoch}", leave=False, disable=not progress,
                                file=sys.stderr):
            self._ddp_forward_ran = False
            loss, terms = self.batch_losses(phase, index, x, g)
            zero_grad()                # LeanSGD / LeanAdam: without torch's profiler range (optim.py)
            if self.profile:           # the model's in-loop share (benchmarks/bench_train.py)
                with self.timed("backward"):
                    loss.backward()
            else:
                loss.backward()
            self._sync_gradients(optimizer)
            step()
            # Kept on the device and summed once at the end of the epoch (one stack instead of a
            # few small ops per step, and the host reads the means once).
            collected.extend(value.detach() for value in terms.values())
            names = list(terms)
        if not collected:
            return {}
        num_batches = len(collected) // len(names)
        sums = torch.stack(collected).double().view(num_batches, len(names)).sum(0)
        # Every rank ran the same number of batches; the mean over ranks of each rank's batch
        # means is the global batch mean (equal shares), and the FCMI terms are global already.
        means = self.parallel.all_reduce_(sums / num_batches) / self.world_size
        return dict(zip(names, means.tolist()))

    def _check_finite(self, epoch: int, terms: dict, path) -> None:
        for name, value in terms.items():
            if not math.isfinite(value):
                last = f"the last good checkpoint is {path} (epoch {epoch - 1})" if path and epoch > 0 and \
                    os.path.exists(path) else "no checkpoint was written before it"
                raise NonFiniteLossError(
                    f"epoch {epoch}: loss term '{name}' became non-finite (epoch mean {value}); training stopped "
                    f"and {last}. Lower the learning rate or check the input data.")

    def _save(self, path: str, epoch: int, optimizer, phase: str) -> None:
        ckpt.save_atomic({
            "format": 1, "trainer": type(self).__name__, "epoch": epoch, "phase": phase,
            "model": self.model.state_dict(), "optimizer": optimizer.state_dict() if optimizer else None,
            "state": {key: value for key, value in self.state.items()}, "history": self.history,
            "rng": ckpt.rng_state(), "config": asdict(self.config), "num_groups": self.num_groups,
        }, path)

    def _restore(self, saved: dict, X_cpu: torch.Tensor, num_groups: int):
        if saved.get("trainer") != type(self).__name__:
            raise ValueError(f"checkpoint was written by {saved.get('trainer')}, not {type(self).__name__}")
        if saved.get("num_groups") != num_groups:
            raise ValueError(f"checkpoint has {saved.get('num_groups')} groups but the data has {num_groups}")
        self.model.load_state_dict(saved["model"])
        self.state = {key: value.to(self.device) if isinstance(value, torch.Tensor) else value
                      for key, value in saved["state"].items()}
        self.after_restore()
        self.history = list(saved["history"])
        ckpt.set_rng_state(saved["rng"])
        return saved["epoch"] + 1, saved["optimizer"], saved["phase"]

    def after_restore(self) -> None:
        """Rebuild objects derived from self.state (e.g. trainable centers)."""


def _format_record(record: dict, total: int) -> str:
    skip = {"epoch", "phase", "seconds", "timings"}
    parts = [f"{key}={value:.4g}" for key, value in record.items() if key not in skip]
    return f"epoch {record['epoch'] + 1}/{total} [{record['phase']}] " + " ".join(parts) + \
        f" ({record['seconds']:.1f}s)"
