"""Speed of the main job: points/s and seconds per epoch of the FCMI and DFC trainers, with a
breakdown of where an epoch goes.

    python benchmarks/bench_train.py                          # N = 1e4, 1e5, 1e6; widths 1.0 and 0.25
    python benchmarks/bench_train.py --n 10000 --widths 0.5 --methods fcmi
    python benchmarks/bench_train.py --quick                  # smoke test (used by the tests)

Data: fairkernels.data.make_synthetic (64 features, 10 planted clusters, 2 groups, bias 0.5).
--repeats (default 3) timed epochs per configuration, between one untimed epoch of the same
phase before (lazy initialisation and the first k-means are not counted) and one after (its
whole-set encoding for the final labels is not either); a row is the median epoch, and each
isolated part below is the median of as many repeats. (A shared 2-core VM varies by 10-25%
from one run to the next; one timed epoch against one 20-batch model timing could put the
share outside the model anywhere within +-15 points.)
  FCMI  warmup_epochs=0: an epoch of L_rec + alpha L_clu + beta L_fair, then the whole-set
        encoding, the k-means refresh (warm-started from the last centres) and the metrics.
  DFC   pretrain/finetune epochs 0: an epoch of KL(P||Q) + gamma KL(Psi||Phi), with shared
        centroids ("dfc": what centers="auto" picks here, the groups mix) and with per-group
        ones ("dfc-matched": each batch's lagged DEC target is also balanced per group).
Breakdown columns (seconds of the timed epoch):
  train      the mini-batch loop as the trainer runs it (data, model, loss, optimiser; less hook_setup)
  model      the model's own forward + backward of the same number of batches, timed alone
             right after that epoch, on the trainer's model (reconstruction loss only, same batch
             size; up to 200 batches, scaled), so that the epoch and its model timing see the
             machine at the same speed
  loss       the method's fused loss (forward + backward) on the same number of batches, alone
  optimizer  Adam/SGD steps of the same number of batches, alone
  encode     whole-set encoding under no_grad;  kmeans  the centre refresh;  metrics
  overhead   train - (model + loss + optimizer): data loading and Python around the step
  outside_model  (epoch - model) / epoch: the share of the epoch that is not the model's work
  model_in_loop  the model's forward + backward as timed inside that epoch's training loop
             (forward hooks on the module the step calls; the step's backward less the loss
             node's own backward: for DFC, whose fused loss is one autograd node, as that node
             runs inside the step's backward (hooks on it); for FCMI timed alone); free of the
             drift between two timings, and
             counting the model's own ops at the speed they run there (after the loss and
             optimiser ops, not repeated on one warm batch)
  outside_in_loop  (epoch - model_in_loop) / epoch
  hook_setup  the bench's registering of the loss-node hooks in the timed epoch (DFC), timed
             where it runs and left out of epoch and train: a user's epoch does not do it
An epoch longer than --max-epoch-seconds (estimated from timed batches) is not run; its row says
"estimated" and extrapolates the measured per-batch cost.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from benchmarks.harness import cpu_model, git_commit  # noqa: E402
import fairkernels as fk  # noqa: E402
from fairkernels import data  # noqa: E402
from fairkernels.train import FCMIConfig, make_trainer  # noqa: E402
from fairkernels.train.matched_centers import matched_logits  # noqa: E402

PAIRED_MODEL_BATCHES = 200   # batches of each model timing paired with a timed epoch
COLUMNS = ["date", "commit", "device", "threads", "method", "n", "width", "batch_size", "params", "status",
           "epoch_s", "points_per_s", "train", "model", "loss", "optimizer", "overhead", "encode", "kmeans",
           "metrics", "outside_model", "model_in_loop", "outside_in_loop", "hook_setup"]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _span_hooks(device, total: list, when=lambda: True):
    """(enter, leave): hook functions that add to total[0] the seconds from each enter (when
    when() holds) to the next leave, synchronising the device at both ends."""
    started = []

    def enter(*_):
        if when():
            _sync(device)
            started.append(time.perf_counter())

    def leave(*_):
        if started:
            _sync(device)
            total[0] += time.perf_counter() - started.pop()
    return enter, leave


def _timed(fn, device) -> float:
    _sync(device)
    started = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - started


def trainer_for(method: str, width: float, batch_size: int, device: str, epochs: int):
    """method: "fcmi", "dfc" (centers="auto": shared centroids on this synthetic data, whose
    groups mix) or "dfc-matched" (per-group centroids, what DFC uses on data whose groups
    differ in appearance, e.g. digits-reverse)."""
    common = dict(n_clusters=10, width=width, batch_size=batch_size, device=device, progress=False, verbose=False,
                  epochs=epochs, seed=0)
    if method == "fcmi":
        return make_trainer("fcmi", warmup_epochs=0, **common)
    centers = "matched" if method == "dfc-matched" else "auto"
    return make_trainer("dfc", centers=centers, pretrain_epochs=0, finetune_epochs=0, **common)


def _loss_step(trainer, h, g, batches: int, backward: bool = True):
    """The method's fused loss, forward + backward (or forward only), on fixed embeddings h
    (no model work)."""
    cfg = trainer.config
    if isinstance(cfg, FCMIConfig):
        centers = trainer.state["centers"]

        def step():
            for _ in range(batches):
                if trainer.matched:     # per-group centers: the row's own group's cosines, then the fused op
                    logits = matched_logits(h, centers, g, cfg.tau)
                    l_clu, l_fair = fk.fcmi_terms(logits, g, trainer.num_groups, backend=cfg.backend,
                                                  check_inputs=False)
                else:
                    l_clu, l_fair = fk.fcmi_terms_from_embeddings(h, centers, g, trainer.num_groups, cfg.tau,
                                                                  backend=cfg.backend, check_inputs=False)
                loss = trainer.alpha * l_clu + cfg.beta * l_fair
                if backward:
                    loss.backward()
        return step
    target = trainer.state["target"][:h.shape[0]]

    def step():
        for _ in range(batches):
            # The trainer's call: Q to the shared or per-group (matched) centroids, KL and fairness term.
            loss = fk.dfc_loss_from_embeddings(h, trainer.mu, g, trainer.num_groups, trainer.gamma, cfg.alpha,
                                               cfg.beta, target, trainer.state.get("fairoids"),
                                               centroids_from=cfg.centroids_from, backend=cfg.backend,
                                               check_inputs=False)[0]
            if backward:
                loss.backward()
    return step


def model_timer(trainer, X, groups, batch_size: int, batches: int):
    """A function that times the model's own forward + backward of `batches` batches (seconds)."""
    model = trainer.model
    x = X[:batch_size].to(trainer.device)
    g = groups[:batch_size].to(trainer.device)
    fcmi = isinstance(trainer.config, FCMIConfig)

    def model_step():
        for _ in range(batches):
            if fcmi:                       # FCMI trains the whole autoencoder
                h, x_hat = model(x, g)
                F.mse_loss(x_hat, x).backward()
            else:                          # DFC's clustering phase trains the encoder only
                model.encode(x).square().mean().backward()

    def timed() -> float:
        was_training = model.training
        model.train()
        try:
            return _timed(model_step, trainer.device)
        finally:
            model.train(was_training)
    return timed


def isolated_parts(trainer, X, groups, batch_size: int, batches: int, repeats: int = 1) -> dict:
    """model / loss / optimizer seconds for `batches` batches, each timed on its own (the
    median of `repeats` timings, taken in turn)."""
    device = trainer.device
    model = trainer.model
    model.train()
    x = X[:batch_size].to(device)
    g = groups[:batch_size].to(device)
    fcmi = isinstance(trainer.config, FCMIConfig)
    optimizer = trainer.make_optimizer("fcmi" if fcmi else "cluster")
    time_model = model_timer(trainer, X, groups, batch_size, batches)
    with torch.no_grad():
        h = model.encode(x)
    loss_step = _loss_step(trainer, h.detach().requires_grad_(True), g, batches)

    def optimizer_step():
        for _ in range(batches):
            optimizer.step()

    loss_forward = _loss_step(trainer, h.detach().requires_grad_(True), g, batches, backward=False)
    time_model()                         # one untimed run of each part
    loss_step()
    loss_forward()
    optimizer_step()
    timings = {"model": [], "loss": [], "loss_forward": [], "optimizer": []}
    for _ in range(repeats):
        timings["model"].append(time_model())
        timings["loss"].append(_timed(loss_step, device))
        timings["loss_forward"].append(_timed(loss_forward, device))
        timings["optimizer"].append(_timed(optimizer_step, device))
    model.zero_grad(set_to_none=True)
    parts = {name: statistics.median(values) for name, values in timings.items()}
    parts["loss_backward"] = max(0.0, parts.pop("loss") - parts["loss_forward"])
    parts["loss"] = parts.pop("loss_forward") + parts["loss_backward"]
    return parts


def bench(method: str, n: int, width: float, batch_size: int, device: str, max_epoch_seconds: float,
          repeats: int = 3) -> dict:
    dataset = data.make_synthetic(n=n, dim=64, n_clusters=10, n_groups=2, bias=0.5, seed=0)
    X, groups = torch.from_numpy(dataset.X), torch.from_numpy(dataset.groups)
    batches = n // batch_size + (n % batch_size > 0)
    # A short fit on a slice builds the model and its state (centres, targets) untimed.
    probe = trainer_for(method, width, batch_size, device, epochs=1).fit(X[:max(batch_size * 4, 2000)],
                                                                          groups[:max(batch_size * 4, 2000)])
    probe_batches = min(batches, 20)
    parts = isolated_parts(probe, X, groups, batch_size, probe_batches, repeats)
    per_batch = (parts["model"] + parts["loss"] + parts["optimizer"]) / probe_batches
    params = sum(p.numel() for p in probe.model.parameters())
    row = {"method": method, "n": n, "width": width, "batch_size": batch_size, "params": params}
    scale = batches / probe_batches
    if per_batch * batches > max_epoch_seconds:
        row.update(status="estimated", epoch_s=per_batch * batches,
                   **{key: value * scale for key, value in parts.items()})
        row["points_per_s"] = n / row["epoch_s"]
        return row
    # repeats + 2 epochs, the middle ones timed: the first pays one-off set-up (the clustering
    # phase's k-means init and first target) and the last a whole-set encoding for the final
    # predictions; every other epoch of a real run looks like the middle ones.
    trainer = trainer_for(method, width, batch_size, device, epochs=repeats + 2)
    trainer.profile = True
    # The model's own time is measured right after each epoch, on the trainer's model, and
    # paired with that epoch: this VM's speed drifts by 10-25% within minutes, so a model
    # timing taken before the fit made the share outside the model swing by as much.
    paired, measuring = [], []
    end_epoch = trainer.end_epoch

    # Up to 200 batches a paired timing (0.2-0.5 s for a narrow encoder): with 20, one stall of
    # this VM moved the narrow rows' share outside the model by 10-20 points.
    paired_batches = min(batches, PAIRED_MODEL_BATCHES)

    # The model's forward as the training loop runs it (grad enabled: not the no-grad
    # whole-set encodings), timed by hooks on the module the step calls; its backward is in
    # the trainer's "backward" timing, less the loss node's own backward (below).
    forward_seconds, forward_marks, node_marks, registering_marks, hooks_on = [0.0], [], [], [], [True]
    before_training = trainer.before_training

    def hook_model_forward(*args):
        # FCMI's step calls the whole autoencoder; DFC's clustering step model.encode, its
        # encoder layers in turn (from the first one's start to the last one's end).
        model = trainer.model
        first, last = (model, model) if isinstance(trainer.config, FCMIConfig) else \
            (model.encoder_layers[0], model.encoder_layers[-1])
        # not the no-grad encodings, nor the model timings below
        enter, leave = _span_hooks(trainer.device, forward_seconds, lambda: torch.is_grad_enabled() and hooks_on[0])
        first.register_forward_pre_hook(enter)
        last.register_forward_hook(leave)
        return before_training(*args)
    trainer.before_training = hook_model_forward

    # DFC's loss is one autograd node (the fused dfc_loss): its backward is timed where it runs,
    # inside the step's backward, by hooks on that node. Timed alone instead (FCMI's loss is
    # several nodes), it also carries a whole backward call's fixed cost (the autograd engine's
    # start, 30-40 us on this VM), which the step's backward pays once, for the model.
    # Registering them is the bench's own work, not the trainer's: 40-75 us a step in the loop on
    # this VM (a narrow step is 2.5-4 ms), timed here and taken out of the epoch's seconds.
    loss_node_seconds, registering_seconds, batch_losses = [0.0], [0.0], trainer.batch_losses
    timed_node = not isinstance(trainer.config, FCMIConfig)

    def batch_losses_with_node_hooks(phase, *args):
        loss, terms = batch_losses(phase, *args)
        started = time.perf_counter()
        node = loss.grad_fn
        if timed_node and phase == "cluster" and node is not None:
            enter, leave = _span_hooks(trainer.device, loss_node_seconds)
            node.register_prehook(enter)
            node.register_hook(leave)
        registering_seconds[0] += time.perf_counter() - started
        return loss, terms
    trainer.batch_losses = batch_losses_with_node_hooks

    def end_epoch_then_time_model(*args):
        forward_marks.append(forward_seconds[0])
        node_marks.append(loss_node_seconds[0])
        registering_marks.append(registering_seconds[0])
        result = end_epoch(*args)
        started = time.perf_counter()
        hooks_on[0] = False
        time_model = model_timer(trainer, X, groups, batch_size, paired_batches)
        paired.append(statistics.median(time_model() for _ in range(repeats)) * batches / paired_batches)
        hooks_on[0] = True
        measuring.append(time.perf_counter() - started)
        return result
    trainer.end_epoch = end_epoch_then_time_model
    trainer.fit(X, groups)
    history = trainer.history[-(repeats + 2):]
    assert len(paired) == len(trainer.history), "one model timing per epoch"
    epochs = []
    for position, (before, timed) in enumerate(zip(history[:-2], history[1:-1]), start=1):
        # The timings of a timed epoch: its cumulative totals minus the previous epoch's; its
        # seconds without the model timing that followed it.
        seconds = {key: value - before["timings"].get(key, 0.0) for key, value in timed["timings"].items()}
        loss_backward = node_marks[position] - node_marks[position - 1] if timed_node else \
            parts["loss_backward"] * scale
        in_loop = forward_marks[position] - forward_marks[position - 1] + seconds.get("backward", 0.0) - loss_backward
        registering = registering_marks[position] - registering_marks[position - 1]
        epochs.append((timed["seconds"] - measuring[position] - registering, seconds, paired[position], in_loop,
                       registering))
    epochs.sort(key=lambda item: item[0])
    epoch_s, seconds, model_s, in_loop_s, registering = epochs[len(epochs) // 2]   # the median epoch, its breakdown
    row.update(status="measured", epoch_s=epoch_s, points_per_s=n / epoch_s, hook_setup=registering,
               train=seconds.get("train", 0.0) - registering,
               encode=seconds.get("encode", 0.0), kmeans=seconds.get("kmeans", 0.0),
               metrics=seconds.get("metrics", 0.0), model=model_s, loss=parts["loss"] * scale,
               optimizer=parts["optimizer"] * scale)
    row["overhead"] = max(0.0, row["train"] - row["model"] - row["loss"] - row["optimizer"])
    row["outside_model"] = (epoch_s - model_s) / epoch_s
    row["model_in_loop"] = in_loop_s
    row["outside_in_loop"] = (epoch_s - in_loop_s) / epoch_s
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["fcmi", "dfc", "dfc-matched"], choices=["fcmi", "dfc", "dfc-matched"])
    parser.add_argument("--n", nargs="+", type=int, default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--widths", nargs="+", type=float, default=[1.0, 0.25])
    parser.add_argument("--batch-size", type=int, default=None, help="default: each method's default")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-epoch-seconds", type=float, default=120.0)
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs (and part timings); the median is kept")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, no CSV unless --out is given")
    parser.add_argument("--out", default=None, help="CSV to append to (default results/train.csv)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.widths, args.repeats = [3000], [0.1], 1
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    out = args.out or (None if args.quick else os.path.join(REPO_ROOT, "benchmarks", "results", "train.csv"))
    device = torch.device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    rows = []
    header = (f"{'method':6s} {'n':>8s} {'width':>5s} {'status':9s} {'epoch_s':>8s} {'pts/s':>9s} {'model':>7s} "
              f"{'loss':>6s} {'optim':>6s} {'overh':>6s} {'encode':>6s} {'kmeans':>6s} {'metric':>6s} {'out%':>5s} "
              f"{'inloop':>7s} {'out%':>5s}")
    print(f"device: {device_name}, threads: {torch.get_num_threads()}")
    print(header)
    for method in args.methods:
        batch_size = args.batch_size or (512 if method == "fcmi" else 256)
        for width in args.widths:
            for n in args.n:
                row = bench(method, n, width, batch_size, args.device, args.max_epoch_seconds, args.repeats)
                row.update(date=datetime.date.today().isoformat(), commit=git_commit(), device=device_name,
                           threads=torch.get_num_threads())
                rows.append(row)
                cell = lambda key: f"{row[key]:.3f}" if isinstance(row.get(key), float) else "-"  # noqa: E731
                share = f"{100 * row['outside_model']:.0f}%" if "outside_model" in row else "-"
                share_in_loop = f"{100 * row['outside_in_loop']:.0f}%" if "outside_in_loop" in row else "-"
                print(f"{method:6s} {n:8d} {width:5.2f} {row['status']:9s} {row['epoch_s']:8.2f} "
                      f"{row['points_per_s']:9.0f} {cell('model'):>7s} {cell('loss'):>6s} {cell('optimizer'):>6s} "
                      f"{cell('overhead'):>6s} {cell('encode'):>6s} {cell('kmeans'):>6s} {cell('metrics'):>6s} "
                      f"{share:>5s} {cell('model_in_loop'):>7s} {share_in_loop:>5s}", flush=True)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        new_file = not os.path.exists(out)
        if not new_file:
            with open(out, newline="") as handle:
                reader = csv.DictReader(handle)
                if reader.fieldnames != COLUMNS:      # an older file: rewritten with today's columns
                    old_rows = list(reader)
                    with open(out, "w", newline="") as rewritten:
                        writer = csv.DictWriter(rewritten, fieldnames=COLUMNS, extrasaction="ignore")
                        writer.writeheader()
                        writer.writerows(old_rows)
        with open(out, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            for row in rows:
                writer.writerow({key: (f"{row[key]:.4g}" if isinstance(row.get(key), float) else row.get(key, ""))
                                 for key in COLUMNS})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
