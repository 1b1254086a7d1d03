"""Command line: `fairkernels train ...` and `fairkernels evaluate ...`.

    fairkernels train --method fcmi --dataset digits-reverse --epochs 30 --out runs/fcmi
    fairkernels evaluate --pred runs/fcmi/labels.npy --labels y.npy --groups g.npy

train writes OUT/metrics.json (every metric, wall time, points/s, peak memory, the config and
the per-epoch history), OUT/labels.npy, OUT/checkpoints/last.pt (atomic, every epoch; --resume
continues from it) and OUT/figures/*.png.

Under torchrun the same command trains with DistributedDataParallel (gloo on CPU, nccl on GPU,
one GPU per process); --batch-size is the global batch, split evenly across the processes, and
rank 0 alone writes the outputs:

    torchrun --nproc_per_node=2 -m fairkernels.cli train --method fcmi --dataset synthetic --out runs/ddp
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import numpy as np
import torch

METRIC_KEYS = ("acc", "nmi", "bal", "mnce", "f_beta", "fwd_mean", "fwd_max")


def _option_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _data_options(pairs) -> dict:
    options = {}
    for pair in pairs or ():
        if "=" not in pair:
            raise SystemExit(f"--data-option expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        options[key.replace("-", "_")] = _option_value(value)
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fairkernels", description="Deep fair clustering (FCMI, DFC).")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a fair clustering model on a data set")
    train.add_argument("--method", required=True, choices=("fcmi", "dfc", "dec", "ae-km"))
    train.add_argument("--dataset", required=True, help="a fairkernels.data name, or a .csv/.npz path")
    train.add_argument("--root", default=None, help="data directory (default: $FAIRKERNELS_DATA)")
    train.add_argument("--data-option", action="append", metavar="KEY=VALUE",
                       help="loader option, e.g. n=5000 for synthetic (repeatable)")
    train.add_argument("--n-clusters", type=int, default=None, help="default: the number of classes")
    train.add_argument("--epochs", type=int, default=None, help="clustering epochs (FCMI: including warm-up)")
    train.add_argument("--warmup", type=int, default=None, help="FCMI reconstruction-only epochs")
    train.add_argument("--pretrain-epochs", type=int, default=None, help="DFC/DEC/AE-KM epochs per SDAE layer")
    train.add_argument("--finetune-epochs", type=int, default=None, help="DFC/DEC/AE-KM end-to-end AE epochs")
    train.add_argument("--batch-size", type=int, default=None)
    train.add_argument("--lr", type=float, default=None)
    train.add_argument("--width", type=float, default=None, help="hidden-layer width multiplier")
    train.add_argument("--alpha", type=float, default=None, help="FCMI weight of L_clu")
    train.add_argument("--beta", type=float, default=None, help="FCMI weight of L_fair")
    train.add_argument("--gamma", type=float, default=None, help="DFC weight of the fairness loss")
    train.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    train.add_argument("--backend", default="auto")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", default="runs/train", help="output directory")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    train.add_argument("--dtype", choices=("float32", "float64"), default=None, help="data and model dtype")
    train.add_argument("--kmeans-iter", type=int, default=None, help="Lloyd iterations per center refresh")
    train.add_argument("--kmeans-sample-size", type=int, default=None,
                       help="rows each center refresh clusters (default: all)")
    train.add_argument("--distributed", action="store_true",
                       help="require a torchrun process group (default: used when WORLD_SIZE > 1)")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.add_argument("--no-figures", action="store_true", help="skip the matplotlib figures")

    evaluate = commands.add_parser("evaluate", help="print the metrics of saved predictions")
    evaluate.add_argument("--pred", required=True, help="predicted clusters (.npy or .txt)")
    evaluate.add_argument("--labels", default=None, help="ground-truth labels (.npy or .txt)")
    evaluate.add_argument("--groups", required=True, help="protected groups (.npy or .txt)")
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def load_vector(path: str) -> np.ndarray:
    if not os.path.exists(path):
        raise SystemExit(f"no such file: {path}")
    values = np.load(path) if path.endswith(".npy") else np.loadtxt(path, ndmin=1)
    return np.asarray(values).reshape(-1)


def format_table(rows: dict) -> str:
    """rows: name -> metric dict. A fixed-width table with one column per metric."""
    keys = [key for key in METRIC_KEYS if any(key in metrics for metrics in rows.values())]
    width = max([len("method")] + [len(name) for name in rows])
    lines = [f"{'method':<{width}}  " + "  ".join(f"{key:>8}" for key in keys)]
    for name, metrics in rows.items():
        lines.append(f"{name:<{width}}  " + "  ".join(
            f"{metrics[key]:>8.4f}" if key in metrics else f"{'-':>8}" for key in keys))
    return "\n".join(lines)


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024   # Linux reports KiB


def _config_overrides(args, dataset) -> dict:
    n_clusters = args.n_clusters or (int(dataset.y.max()) + 1 if dataset.y is not None else None)
    if n_clusters is None:
        raise SystemExit("--n-clusters is required for a data set without labels")
    overrides = {"n_clusters": n_clusters, "device": args.device, "backend": args.backend, "seed": args.seed,
                 "progress": not args.no_progress, "checkpoint_dir": os.path.join(args.out, "checkpoints"),
                 "resume": args.resume}
    names = {"epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "width": "width", "dtype": "dtype",
             "kmeans_iter": "kmeans_iter", "kmeans_sample_size": "kmeans_sample_size"}
    if args.distributed:
        overrides["distributed"] = True
    if args.method == "fcmi":
        names.update(warmup="warmup_epochs", alpha="alpha", beta="beta")
    else:
        names.update(pretrain_epochs="pretrain_epochs", finetune_epochs="finetune_epochs", gamma="gamma")
    for arg_name, field_name in names.items():
        value = getattr(args, arg_name)
        if value is not None:
            overrides[field_name] = value
    for arg_name in ("warmup", "alpha", "beta", "gamma", "pretrain_epochs", "finetune_epochs"):
        if getattr(args, arg_name) is not None and arg_name not in names:
            raise SystemExit(f"--{arg_name.replace('_', '-')} does not apply to --method {args.method}")
    return overrides


def cmd_train(args) -> int:
    from fairkernels import data, distributed
    from fairkernels.train import make_trainer
    from fairkernels.train.parallel import local_device

    initialised_here = not distributed.is_distributed()
    dataset = data.load(args.dataset, root=args.root, **_data_options(args.data_option))
    trainer = make_trainer(args.method, **_config_overrides(args, dataset))
    if local_device(args.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(local_device(args.device))
    started = time.perf_counter()
    trainer.fit(dataset.X, dataset.groups, dataset.y)
    wall = time.perf_counter() - started
    try:
        if trainer.parallel.is_rank_zero:      # every rank holds the same labels and history
            _write_train_outputs(args, dataset, trainer, wall)
    finally:
        if initialised_here and distributed.is_distributed():
            import torch.distributed as dist
            dist.destroy_process_group()
    return 0


def _write_train_outputs(args, dataset, trainer, wall: float) -> None:
    from fairkernels import metrics
    labels = trainer.labels_
    scores = metrics.evaluate(dataset.y, labels, dataset.groups, num_groups=int(dataset.groups.max()) + 1)
    num_rows = dataset.X.shape[0]
    report = {
        "method": args.method, "dataset": args.dataset, "n": num_rows, "dim": int(dataset.X.shape[1]),
        "num_groups": int(dataset.groups.max()) + 1, **scores,
        "wall_seconds": wall, "epochs_run": trainer.epochs_run, "total_epochs": trainer.total_epochs,
        "points_per_second": num_rows * trainer.epochs_run / wall if wall > 0 and trainer.epochs_run else None,
        "peak_memory_bytes": _peak_memory_bytes(trainer.device), "device": str(trainer.device),
        "world_size": trainer.world_size,
        "config": vars(trainer.config).copy(), "history": trainer.history,
    }
    os.makedirs(args.out, exist_ok=True)
    np.save(os.path.join(args.out, "labels.npy"), labels)
    with open(os.path.join(args.out, "metrics.json"), "w") as handle:
        json.dump(report, handle, indent=2, default=str)
    if not args.no_figures:
        write_figures(trainer, dataset, labels, os.path.join(args.out, "figures"), args.method)
    print(format_table({args.method: scores}))
    print(f"wall {wall:.1f}s; wrote {os.path.join(args.out, 'metrics.json')}")


def write_figures(trainer, dataset, labels, directory: str, name: str) -> list:
    from fairkernels import plots
    embeddings = trainer.transform(dataset.X)
    return [
        plots.group_histograms(labels, dataset.groups, os.path.join(directory, f"{name}_groups.png"),
                               title=f"{name}: groups per cluster"),
        plots.training_curves(trainer.history, os.path.join(directory, f"{name}_curves.png"), title=name),
        plots.embedding_scatter(embeddings, labels, dataset.groups, os.path.join(directory, f"{name}_embedding.png"),
                                title=name),
    ]


def cmd_evaluate(args) -> int:
    from fairkernels import metrics
    pred = load_vector(args.pred).astype(np.int64)
    groups = load_vector(args.groups).astype(np.int64)
    labels = load_vector(args.labels).astype(np.int64) if args.labels else None
    try:
        scores = metrics.evaluate(labels, pred, groups)
    except (ValueError, TypeError) as err:
        print(f"fairkernels evaluate: {err}", file=sys.stderr)
        return 2
    print(json.dumps(scores, indent=2) if args.json else format_table({os.path.basename(args.pred): scores}))
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return {"train": cmd_train, "evaluate": cmd_evaluate}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
