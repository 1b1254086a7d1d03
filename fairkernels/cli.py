"""Command line: `fairkernels train ...` and `fairkernels evaluate ...`.

    fairkernels train --method fcmi --dataset digits-reverse --epochs 30 --out runs/fcmi
    fairkernels evaluate --pred runs/fcmi/labels.npy --labels runs/fcmi/y.npy --groups runs/fcmi/groups.npy

train writes OUT/metrics.json (every metric, wall time, points/s, peak memory, the config and
the per-epoch history; wall_seconds and epochs_run count every run of a resumed training),
OUT/labels.npy (the predicted clusters), OUT/y.npy and OUT/groups.npy (the data set's labels and
groups, for `evaluate`), OUT/checkpoints/last.pt (atomic, every epoch; --resume continues from
it) and OUT/figures/*.png (when matplotlib is installed).

Every option is checked before any work. A user error (a bad option, a missing file, CUDA asked
for on a machine without it) is one line on stderr and exit code 2; Ctrl-C names the checkpoint
and the --resume command and exits with 130; anything else is a bug and keeps its traceback.

Under torchrun the same command trains with DistributedDataParallel (gloo on CPU, nccl on GPU,
one GPU per process); --batch-size is the global batch, split evenly across the processes, and
rank 0 alone writes the outputs:

    torchrun --nproc_per_node=2 -m fairkernels.cli train --method fcmi --dataset synthetic --out runs/ddp
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

METRIC_KEYS = ("acc", "nmi", "bal", "mnce", "f_beta", "fwd_mean", "fwd_max")
# The ops each method's trainer calls with config.backend (fairkernels/train/*.py); an explicit
# --backend must be able to run all of them.
METHOD_OPS = {"fcmi": ("fcmi_embeddings", "fcmi"), "dfc": ("student_t", "dec_target", "kl_div"),
              "dec": ("student_t", "dec_target", "kl_div"), "ae-km": ()}
# Config field -> the option that sets it, so a config error names what the user typed.
FIELD_OPTIONS = {"n_clusters": "--n-clusters", "epochs": "--epochs", "warmup_epochs": "--warmup",
                 "pretrain_epochs": "--pretrain-epochs", "finetune_epochs": "--finetune-epochs",
                 "batch_size": "--batch-size", "lr": "--lr", "width": "--width", "alpha": "--alpha",
                 "beta": "--beta", "gamma": "--gamma", "kmeans_iter": "--kmeans-iter",
                 "kmeans_sample_size": "--kmeans-sample-size", "dtype": "--dtype", "device": "--device",
                 "centers": "--centers", "lr_schedule": "--lr-schedule"}


class UsageError(Exception):
    """A mistake in the command line or its inputs: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _option_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _data_options(pairs) -> dict:
    """KEY=VALUE pairs -> loader keyword arguments; VALUE with commas is a list (e.g. intersectional
    group_column=sex,race), except for delimiter."""
    options = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--data-option expects KEY=VALUE, got {pair!r}")
        key = key.replace("-", "_")
        if "," in value and key != "delimiter":
            options[key] = [_option_value(part) for part in value.split(",")]
        else:
            options[key] = _option_value(value)
    return options


# (option, config field, type, help, the only method family it applies to); the help shows
# the config's default, which may differ per method.
METHOD_OPTIONS = (
    ("--epochs", "epochs", int, "clustering epochs (FCMI: including the warm-up)", None),
    ("--warmup", "warmup_epochs", int, "FCMI reconstruction-only epochs", "fcmi"),
    ("--pretrain-epochs", "pretrain_epochs", int, "DFC/DEC/AE-KM epochs per SDAE layer", "dfc"),
    ("--finetune-epochs", "finetune_epochs", int, "DFC/DEC/AE-KM end-to-end AE epochs", "dfc"),
    ("--batch-size", "batch_size", int, "rows per batch", None),
    ("--lr", "lr", float, "learning rate", None),
    ("--lr-schedule", "lr_schedule", str, "FCMI learning rate over its FCMI epochs: cosine (decays to 0) or "
     "constant", "fcmi"),
    ("--width", "width", float, "hidden-layer width multiplier", None),
    ("--alpha", "alpha", float, "FCMI weight of L_clu (None: 0.04 with shared centers, 0.1 with matched)",
     "fcmi"),
    ("--beta", "beta", float, "FCMI weight of L_fair", "fcmi"),
    ("--gamma", "gamma", float, "DFC weight of the fairoid loss (None: 10 with shared centers, 1 with matched)",
     "dfc"),
    ("--kmeans-iter", "kmeans_iter", int, "Lloyd iterations per center refresh", None),
    ("--centers", "centers", str, "centers: auto, matched (per group, paired across groups) or shared", None),
    ("--dtype", "dtype", str, "data and model dtype: float32 or float64", None),
)


def _method_default(field: str, only: str | None = None) -> str:
    """The config default of `field` for the help text: one value, or one per method family."""
    from fairkernels.train.config import DFCConfig, FCMIConfig
    fcmi, dfc = getattr(FCMIConfig, field, None), getattr(DFCConfig, field, None)
    if only is not None or fcmi == dfc:
        return str(dfc if only == "dfc" else fcmi)
    return f"fcmi {fcmi}, dfc/dec/ae-km {dfc}"


def build_parser() -> argparse.ArgumentParser:
    from fairkernels import data
    from fairkernels._backend import BACKENDS

    parser = _Parser(prog="fairkernels", description="Deep fair clustering (FCMI, DFC).")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a fair clustering model on a data set")
    train.add_argument("--method", required=True, choices=("fcmi", "dfc", "dec", "ae-km"))
    train.add_argument("--dataset", required=True,
                       help=f"one of {', '.join(data.available())}, or a path to a .csv / .npz file")
    train.add_argument("--root", default=None, help=f"data directory (default: ${data.DATA_ENV})")
    train.add_argument("--data-option", action="append", metavar="KEY=VALUE",
                       help="loader option, e.g. n=5000 for synthetic, group_column=sex for a .csv (repeatable)")
    train.add_argument("--n-clusters", type=int, default=None, help="(default: the number of classes)")

    for flag, field, kind, text, only in METHOD_OPTIONS:
        train.add_argument(flag, type=kind, default=None, help=f"{text} (default: {_method_default(field, only)})")
    train.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="cpu, cuda or cuda:<index> (default: %(default)s)")
    train.add_argument("--backend", default="auto", choices=BACKENDS, help="op backend (default: %(default)s)")
    train.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    train.add_argument("--out", default="runs/train", help="output directory (default: %(default)s)")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    train.add_argument("--kmeans-sample-size", type=int, default=None,
                       help="rows each center refresh clusters (default: all)")
    train.add_argument("--distributed", action="store_true",
                       help="require a torchrun process group (default: used when WORLD_SIZE > 1)")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.add_argument("--no-figures", action="store_true", help="skip the matplotlib figures")

    evaluate = commands.add_parser("evaluate", help="print the metrics of saved predictions")
    evaluate.add_argument("--pred", required=True, help="predicted clusters (.npy or .txt), e.g. OUT/labels.npy")
    evaluate.add_argument("--labels", default=None, help="ground-truth labels (.npy or .txt), e.g. OUT/y.npy")
    evaluate.add_argument("--groups", required=True, help="protected groups (.npy or .txt), e.g. OUT/groups.npy")
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


# ---------------------------------------------------------------------------------- evaluate
def load_vector(path: str, option: str = "--pred") -> np.ndarray:
    """Integer ids from a .npy or text file; fractional, non-finite or non-numeric values are
    refused (truncating 0.5 to 0 would silently change the metrics)."""
    if not os.path.isfile(path):
        raise UsageError(f"{option}: no such file: {path}")
    try:
        values = np.load(path, allow_pickle=False) if path.endswith(".npy") else np.loadtxt(path, ndmin=1)
    except (ValueError, OSError) as err:
        raise UsageError(f"{option}: cannot read {path} ({_one_line(err)}); give a .npy file or a text "
                         "file with one number per line") from None
    values = np.asarray(values)
    if values.ndim != 1 and not (values.ndim == 2 and 1 in values.shape):
        raise UsageError(f"{option}: {path} must hold a vector, got shape {values.shape}")
    values = values.reshape(-1)
    if values.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)))
        if bad.size:
            raise UsageError(f"{option}: {path} holds non-integer values ({values[bad[0]]:g} at position "
                             f"{bad[0]}, {bad.size} in all); ids must be whole numbers")
    elif values.dtype.kind not in "iub":
        raise UsageError(f"{option}: {path} must hold integer ids, got dtype {values.dtype}")
    return values.astype(np.int64)


def format_table(rows: dict) -> str:
    """rows: name -> metric dict. A fixed-width table with one column per metric."""
    keys = [key for key in METRIC_KEYS if any(key in metrics for metrics in rows.values())]
    width = max([len("method")] + [len(name) for name in rows])
    lines = [f"{'method':<{width}}  " + "  ".join(f"{key:>8}" for key in keys)]
    for name, metrics in rows.items():
        lines.append(f"{name:<{width}}  " + "  ".join(
            f"{metrics[key]:>8.4f}" if key in metrics else f"{'-':>8}" for key in keys))
    return "\n".join(lines)


def cmd_evaluate(args, argv=None) -> int:
    from fairkernels import metrics
    pred = load_vector(args.pred, "--pred")
    groups = load_vector(args.groups, "--groups")
    labels = load_vector(args.labels, "--labels") if args.labels else None
    try:
        scores = metrics.evaluate(labels, pred, groups)
    except (ValueError, TypeError) as err:
        raise UsageError(f"{_one_line(err)} (--pred, --labels and --groups need one entry per row of the "
                         "same data)") from None
    print(json.dumps(scores, indent=2) if args.json else format_table({os.path.basename(args.pred): scores}))
    return 0


# ---------------------------------------------------------------------------------- train: checks
def _dataset_loader(name: str, root):
    """(loader function, parameters the CLI fills itself) for --dataset, or a UsageError."""
    from fairkernels import data
    from fairkernels.data import arrays
    suffix = Path(name).suffix.lower()
    if suffix in (".csv", ".npz"):
        path = Path(name)
        if not path.exists() and not (root is not None and (Path(root) / path).exists()):
            raise UsageError(f"--dataset: no such file: {name}")
        return (data.load_csv if suffix == ".csv" else data.load_npz), ("path",)
    loaders = {"digits-reverse": data.load_digits_reverse, "synthetic": data.make_synthetic,
               "adult": data.load_adult, "har": data.load_har, "ds": data.load_ds}
    loaders.update({npz_name: arrays.load_named_npz for npz_name in arrays.NPZ_DATASETS})
    loader = loaders.get(name.lower())
    if loader is None:
        raise UsageError(f"--dataset: unknown data set {name!r}; use one of {', '.join(data.available())}, "
                         "or a path to a .csv / .npz file")
    return loader, ("name", "root")


def _check_data_options(name: str, loader, filled: tuple, options: dict) -> None:
    params = {key: spec for key, spec in inspect.signature(loader).parameters.items() if key not in filled}
    unknown = sorted(set(options) - set(params))
    if unknown:
        accepted = ", ".join(params) or "no options"
        raise UsageError(f"--data-option {unknown[0]} is not an option of --dataset {name} (it takes: {accepted})")
    missing = [key for key, spec in params.items() if spec.default is inspect.Parameter.empty and key not in options]
    if missing:
        raise UsageError(f"--dataset {name} needs --data-option {missing[0]}=VALUE"
                         + (" (the column of the protected group)" if missing[0] == "group_column" else ""))


def _check_backend(args, device: torch.device) -> None:
    from fairkernels import _backend
    if args.backend == "auto":
        return
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    for op in METHOD_OPS[args.method]:
        reason = _backend.unavailable_reason(args.backend, device, dtype, op)
        if reason is not None:
            raise UsageError(f"--backend {args.backend} cannot run --method {args.method} on {device} "
                             f"({op}: {reason}); use --backend auto")


def _config_overrides(args, n_clusters: int) -> dict:
    overrides = {"n_clusters": n_clusters, "device": args.device, "backend": args.backend, "seed": args.seed,
                 "progress": not args.no_progress, "checkpoint_dir": os.path.join(args.out, "checkpoints"),
                 "resume": args.resume}
    if args.distributed:
        overrides["distributed"] = True
    if args.kmeans_sample_size is not None:
        overrides["kmeans_sample_size"] = args.kmeans_sample_size
    family = "fcmi" if args.method == "fcmi" else "dfc"
    for flag, field, _, _, only in METHOD_OPTIONS:       # one table: parser, help and this check
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is None:
            continue
        if only is not None and only != family:
            raise UsageError(f"{flag} does not apply to --method {args.method}")
        overrides[field] = value
    return overrides


def _make_config(args, n_clusters: int):
    """The validated trainer config; its ValueErrors name the CLI option, its warnings become
    one stderr line each."""
    from fairkernels.train.config import config_for
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            config = config_for(args.method, **_config_overrides(args, n_clusters))
            config.validate()
        except (ValueError, TypeError) as err:
            message = _one_line(err)
            field = message.split(" ", 1)[0].split("=", 1)[0]
            if field in FIELD_OPTIONS:
                message = FIELD_OPTIONS[field] + message[len(field):]
            raise UsageError(message) from None
    return config, [_one_line(warning.message) for warning in caught]


def _warmup_warning(config) -> str | None:
    """FCMI's clustering and fairness terms only start after the warm-up: say so when they never do."""
    warmup = getattr(config, "warmup_epochs", None)
    if warmup is not None and config.epochs > 0 and warmup >= config.epochs:
        return (f"--warmup {warmup} >= --epochs {config.epochs}: every epoch is reconstruction-only warm-up, "
                f"so no clustering or fairness term is trained; use --warmup below {config.epochs}")
    return None


def _check_resume(args, config, num_groups: int, trainer_name: str) -> None:
    from fairkernels.train import checkpoint as ckpt
    path = ckpt.checkpoint_path(config.checkpoint_dir)
    if not args.resume:
        return
    if not os.path.exists(path):
        print(f"fairkernels train: no checkpoint at {path}; starting from the first epoch", file=sys.stderr)
        return
    try:
        saved = ckpt.load(path)
    except Exception as err:  # a torn or foreign file: the user decides, nothing is overwritten yet
        raise UsageError(f"--resume: cannot read {path} ({_one_line(err)}); delete it or drop --resume") from None
    if saved.get("trainer") != trainer_name:
        raise UsageError(f"--resume: {path} was written by {saved.get('trainer')}, not {trainer_name}; "
                         "use the same --method or another --out")
    if saved.get("num_groups") != num_groups:
        raise UsageError(f"--resume: {path} has {saved.get('num_groups')} groups but the data has {num_groups}; "
                         "use the same --dataset or another --out")


def prepare_train(args):
    """Check every option, then load the data: -> (dataset, trainer, warning lines). Raises
    UsageError before any training work when something is wrong."""
    from fairkernels import data
    from fairkernels._device import check_device
    from fairkernels.train import DFCTrainer, FCMITrainer

    try:
        device = check_device(args.device, "--device")
    except ValueError as err:
        raise UsageError(_one_line(err)) from None
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a file; give a directory")
    _, extra = _make_config(args, args.n_clusters or 1)      # option errors before the data loads
    _check_backend(args, device)
    options = _data_options(args.data_option)
    loader, filled = _dataset_loader(args.dataset, args.root)
    _check_data_options(args.dataset, loader, filled, options)
    try:
        dataset = data.load(args.dataset, root=args.root, **options)
    except (ValueError, TypeError, OSError, KeyError) as err:
        raise UsageError(f"--dataset {args.dataset}: {_one_line(err)}") from None
    n_clusters = args.n_clusters or dataset.num_classes
    if not n_clusters:
        raise UsageError(f"--dataset {args.dataset} has no labels; give --n-clusters")
    config, extra = _make_config(args, n_clusters)
    warm = _warmup_warning(config)
    if warm is not None and not any("warm" in line for line in extra):
        extra.append(warm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # already collected above, printed once by the caller
        trainer = (FCMITrainer if args.method == "fcmi" else DFCTrainer)(config)
    _check_resume(args, config, int(dataset.groups.max()) + 1, type(trainer).__name__)
    return dataset, trainer, extra


# ---------------------------------------------------------------------------------- train: run
def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024   # Linux reports KiB


def _resume_command(argv) -> str:
    return "fairkernels " + shlex.join(list(argv) + ([] if "--resume" in argv else ["--resume"]))


def cmd_train(args, argv=()) -> int:
    from fairkernels import distributed
    from fairkernels.train import checkpoint as ckpt
    from fairkernels.train.base import NonFiniteLossError
    from fairkernels.train.parallel import local_device

    dataset, trainer, warning_lines = prepare_train(args)
    for line in warning_lines:
        print(f"fairkernels train: warning: {line}", file=sys.stderr)
    initialised_here = not distributed.is_distributed()
    if local_device(args.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(local_device(args.device))
    started = time.perf_counter()
    try:
        trainer.fit(dataset.X, dataset.groups, dataset.y)
    except KeyboardInterrupt:
        path = ckpt.checkpoint_path(trainer.config.checkpoint_dir)
        if os.path.exists(path):
            print(f"fairkernels train: interrupted; the last completed epoch is saved in {path}; "
                  f"continue with: {_resume_command(argv)}", file=sys.stderr)
        else:
            print("fairkernels train: interrupted before the first epoch completed; no checkpoint to resume "
                  "from (run the same command again)", file=sys.stderr)
        return 130
    except NonFiniteLossError as err:
        print(f"fairkernels train: {_one_line(err)}", file=sys.stderr)
        return 1
    wall = time.perf_counter() - started
    try:
        if trainer.parallel.is_rank_zero:      # every rank holds the same labels and history
            _write_train_outputs(args, dataset, trainer, wall)
    finally:
        if initialised_here and distributed.is_distributed():
            import torch.distributed as dist
            dist.destroy_process_group()
    return 0


def _run_totals(trainer, wall: float) -> dict:
    """Wall time and epochs of the whole training: this run plus the epochs restored from the
    checkpoint (their per-epoch seconds are in the history), and this run alone."""
    resumed_at = len(trainer.history) - trainer.epochs_run
    earlier = sum(record.get("seconds", 0.0) for record in trainer.history[:resumed_at])
    return {"wall_seconds": earlier + wall, "epochs_run": len(trainer.history),
            "this_run": {"wall_seconds": wall, "epochs_run": trainer.epochs_run, "resumed_at_epoch": resumed_at}}


def _write_train_outputs(args, dataset, trainer, wall: float) -> None:
    from fairkernels import metrics
    labels = trainer.labels_
    num_groups = int(dataset.groups.max()) + 1
    scores = metrics.evaluate(dataset.y, labels, dataset.groups, num_groups=num_groups)
    num_rows = dataset.X.shape[0]
    report = {
        "method": args.method, "dataset": args.dataset, "n": num_rows, "dim": int(dataset.X.shape[1]),
        "num_groups": num_groups, **scores, **_run_totals(trainer, wall), "total_epochs": trainer.total_epochs,
        "points_per_second": num_rows * trainer.epochs_run / wall if wall > 0 and trainer.epochs_run else None,
        "peak_memory_bytes": _peak_memory_bytes(trainer.device), "device": str(trainer.device),
        "world_size": trainer.world_size, "centers": getattr(trainer, "centers_info", None),
        "config": vars(trainer.config).copy(), "history": trainer.history,
    }
    os.makedirs(args.out, exist_ok=True)
    np.save(os.path.join(args.out, "labels.npy"), labels)
    np.save(os.path.join(args.out, "groups.npy"), dataset.groups)
    if dataset.y is not None:
        np.save(os.path.join(args.out, "y.npy"), dataset.y)
    metrics_path = os.path.join(args.out, "metrics.json")
    with open(metrics_path, "w") as handle:
        json.dump(report, handle, indent=2, default=str)
    print(format_table({args.method: scores}))
    if not args.no_figures:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("fairkernels train: figures skipped: matplotlib is not installed (pip install matplotlib, "
                  "or pip install 'fairkernels[plot]'; --no-figures silences this)", file=sys.stderr)
        else:
            write_figures(trainer, dataset, labels, os.path.join(args.out, "figures"), args.method)
    print(f"wall {report['wall_seconds']:.1f}s; wrote {metrics_path}")


def write_figures(trainer, dataset, labels, directory: str, name: str) -> list:
    from fairkernels import plots
    embeddings = trainer.transform(dataset.X)
    return [
        plots.group_histograms(labels, dataset.groups, os.path.join(directory, f"{name}_groups.png"),
                               title=f"{name}: groups per cluster"),
        plots.training_curves(trainer.history, os.path.join(directory, f"{name}_curves.png"), title=name),
        plots.embedding_scatter(embeddings, labels, dataset.groups, os.path.join(directory, f"{name}_embedding.png"),
                                title=name, group_names=dataset.group_names),
    ]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        return {"train": cmd_train, "evaluate": cmd_evaluate}[args.command](args, argv)
    except UsageError as err:
        print(f"fairkernels: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fairkernels: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
