"""FCMI on a million synthetic points: throughput, epoch time split and peak memory.

    python python/million_points.py                       # N = 10^6, 1 epoch, cuda if present
    python python/million_points.py --n 20000 --out runs/mp-small

Trains fairkernels.train.FCMITrainer on the `synthetic` planted-cluster data (groups biased
into the clusters) with the fused FCMI loss from embeddings, no warm-up epochs by default, so
every epoch runs: the spherical k-means refresh of the centers over all N embeddings, the
training pass, and the evaluation (encoding all N, assigning, metrics). Prints points/s and
the split, and writes metrics.json to --out with the same numbers plus ACC / NMI / balance /
MNCE of the last epoch and the peak memory (ru_maxrss; torch.cuda.max_memory_allocated on GPU).

The k-means refresh clusters a fresh sample of --kmeans-sample-size rows (default
max(100 K, 2^16), as the FCMI code caps the points per centroid) instead of all N. Under torchrun
every process trains on its slice of each global batch (--batch-size is global) and rank 0
reports: torchrun --nproc_per_node=8 python/million_points.py
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import sys
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # runnable from a checkout without pip install
    sys.path.insert(0, REPO_ROOT)

import fairkernels  # noqa: E402
from fairkernels.data import make_synthetic  # noqa: E402
from fairkernels.train import FCMITrainer  # noqa: E402
from fairkernels.train.config import FCMIConfig  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # --points: torchrun reads a bare --n as an ambiguous abbreviation of its own options.
    p.add_argument("--n", "--points", dest="n", type=int, default=1_000_000, help="number of points")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--out", default="runs/million_points", help="directory for metrics.json")
    p.add_argument("--dim", type=int, default=32, help="input features")
    p.add_argument("--clusters", type=int, default=10)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--bias", type=float, default=0.5, help="how strongly groups align with clusters")
    p.add_argument("--warmup-epochs", type=int, default=0, help="reconstruction-only epochs first")
    p.add_argument("--kmeans-iter", type=int, default=20, help="Lloyd iterations per center refresh")
    p.add_argument("--kmeans-sample-size", type=int, default=None,
                   help="rows per center refresh (default max(100 * clusters, 65536); 0: all rows)")
    p.add_argument("--width", type=float, default=1.0, help="autoencoder width multiplier (1.0: paper size)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


class EpochStopwatch:
    """Wall seconds of wrapped callables, summed per epoch (CUDA-synchronised). The epoch is
    the one whose begin_epoch hook ran last, so work done at the end of an epoch (the next
    centers) counts in the epoch whose time fit() records it in."""

    def __init__(self, device: torch.device):
        self.device, self.epoch, self.seconds = device, 0, {}

    def mark_epoch(self, begin_epoch):
        @functools.wraps(begin_epoch)
        def marked(epoch, *args, **kwargs):
            self.epoch = epoch
            return begin_epoch(epoch, *args, **kwargs)
        return marked

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self._sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._sync()
                key = (self.epoch, name)
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start
        return timed

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def split(self, record: dict, num_points: int) -> dict:
        """The epoch's seconds split into k-means refresh, training and evaluation (the rest:
        encoding every point, assigning it, metrics)."""
        epoch, total = record["epoch"], record["seconds"]
        kmeans_s = self.seconds.get((epoch, "kmeans"), 0.0)
        train_s = self.seconds.get((epoch, "train"), 0.0)
        return {"epoch": epoch, "phase": record["phase"], "seconds": total, "kmeans_seconds": kmeans_s,
                "train_seconds": train_s, "eval_seconds": max(total - kmeans_s - train_s, 0.0),
                "train_points_per_second": num_points / train_s if train_s > 0 else None}


def peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if platform.system() == "Darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def main(argv=None):
    args = parse_args(argv)
    from fairkernels.train.parallel import local_device
    device = local_device(args.device)
    if args.kmeans_sample_size is None:
        args.kmeans_sample_size = max(100 * args.clusters, 1 << 16)
    sample_size = args.kmeans_sample_size if 0 < args.kmeans_sample_size < args.n else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    started = time.perf_counter()
    data = make_synthetic(n=args.n, dim=args.dim, n_clusters=args.clusters, n_groups=args.groups, bias=args.bias,
                          seed=args.seed)
    data_seconds = time.perf_counter() - started
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"data: {data.description} ({data_seconds:.1f} s)", flush=True)

    config = FCMIConfig(n_clusters=args.clusters, epochs=args.epochs, batch_size=args.batch_size,
                        device=str(device), backend=args.backend, seed=args.seed,
                        warmup_epochs=args.warmup_epochs, kmeans_iter=args.kmeans_iter, width=args.width,
                        kmeans_sample_size=sample_size,
                        eval_chunk_size=1 << 16, progress=False, verbose=False)
    trainer = FCMITrainer(config)
    # Time the parts of each epoch by wrapping this instance's hooks: the k-means refresh
    # (compute_centers) and the training pass (_run_epoch); the rest is the evaluation.
    watch = EpochStopwatch(device)
    trainer.begin_epoch = watch.mark_epoch(trainer.begin_epoch)
    trainer.compute_centers = watch.wrap("kmeans", trainer.compute_centers)
    trainer._run_epoch = watch.wrap("train", trainer._run_epoch)

    fit_started = time.perf_counter()
    trainer.fit(data.X, data.groups, data.y)
    fit_seconds = time.perf_counter() - fit_started
    epochs = [watch.split(record, args.n) for record in trainer.history]
    if trainer.parallel.active:
        torch.distributed.destroy_process_group()
    if not trainer.parallel.is_rank_zero:
        return None

    for split in epochs:
        print(f"epoch {split['epoch']}: {split['seconds']:.2f} s = k-means {split['kmeans_seconds']:.2f} "
              f"+ train {split['train_seconds']:.2f} + eval {split['eval_seconds']:.2f}; "
              f"{split['train_points_per_second']:,.0f} points/s training", flush=True)
    last = trainer.history[-1] if trainer.history else {}
    train_seconds = sum(e["train_seconds"] for e in epochs)
    result = {
        "n": args.n, "dim": args.dim, "clusters": args.clusters, "groups": args.groups, "bias": args.bias,
        "epochs": args.epochs, "batch_size": args.batch_size, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "fairkernels": fairkernels.__version__,
        "backend": args.backend, "kmeans_iter": args.kmeans_iter, "width": args.width,
        "kmeans_sample_size": sample_size, "world_size": trainer.world_size,
        "data_seconds": data_seconds, "fit_seconds": fit_seconds,
        "train_points_per_second": args.n * len(epochs) / train_seconds if train_seconds > 0 else None,
        "epoch_split": epochs,
        "peak_rss_mb": peak_rss_mb(),
        "peak_cuda_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "final_metrics": {key: value for key, value in last.items() if key not in ("epoch", "phase", "seconds")},
    }
    print(f"training throughput {result['train_points_per_second'] or 0:,.0f} points/s; "
          f"peak RSS {result['peak_rss_mb']:.0f} MB"
          + (f"; peak CUDA {result['peak_cuda_allocated_mb']:.0f} MB" if device.type == "cuda" else ""))
    print("final: " + " ".join(f"{k}={v:.4g}" for k, v in result["final_metrics"].items()
                               if isinstance(v, (int, float))))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "metrics.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
