"""Fidelity of the trainers: FCMI, DFC, DEC (DFC with gamma = 0) and AE + k-means, each at the
library's DEFAULT hyper-parameters, on digits-reverse (bundled) and on its synthetic analogue
`appearance` (the group reverses the input's intensities, never changes its class), over
several seeds. Writes one CSV row per run to benchmarks/results/fidelity.csv and prints a
Markdown table of mean +- std over seeds for ACC, NMI, Balance, MNCE, F_beta, FWD and seconds.

    python benchmarks/fidelity.py                        # every method x data set, seeds 0 1 2
    python benchmarks/fidelity.py --methods fcmi --data digits-reverse --seeds 0 1 2 3 4
    python benchmarks/fidelity.py --set fcmi.beta=1.0    # override a default
    python benchmarks/fidelity.py --methods fcmi --sweep beta=0,0.05,0.2,1,5   # a trade-off curve

Nothing here is tuned per data set or per seed: a method gets the same options on every data
set (only n_clusters follows the data's number of classes).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys
import time

import numpy as np
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from benchmarks.harness import cpu_model, git_commit  # noqa: E402
from fairkernels import data, metrics  # noqa: E402
from fairkernels.train import make_trainer  # noqa: E402

METHODS = ("fcmi", "dfc", "dec", "ae-km")
DATASETS = ("digits-reverse", "appearance")
METRICS = ("acc", "nmi", "bal", "mnce", "f_beta", "fwd_mean")
HEADERS = {"acc": "ACC", "nmi": "NMI", "bal": "Bal", "mnce": "MNCE", "f_beta": "F_beta", "fwd_mean": "FWD",
           "seconds": "seconds"}
CSV_COLUMNS = ["date", "commit", "device", "threads", "dataset", "method", "seed", "options", *METRICS, "fwd_max",
               "seconds"]


def parse_overrides(items: list[str]) -> dict:
    """--set method.name=value (value parsed as int, float, bool or kept as a string)."""
    overrides: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        method, dot, name = key.partition(".")
        if not sep or not dot or method not in METHODS or not name:
            raise SystemExit(f"--set expects method.option=value with method in {METHODS}, got {item!r}")
        overrides.setdefault(method, {})[name] = _parse_value(raw)
    return overrides


def _parse_value(raw: str):
    """An option value from the command line: int, float, bool (true/false) or the string."""
    if raw in ("true", "false"):
        return raw == "true"
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def run_one(method: str, dataset, seed: int, device: str, options: dict) -> dict:
    started = time.perf_counter()
    trainer = make_trainer(method, n_clusters=dataset.num_classes, seed=seed, device=device, progress=False,
                           verbose=False, **options).fit(dataset.X, dataset.groups)
    seconds = time.perf_counter() - started
    scores = metrics.evaluate(dataset.y, trainer.labels_, dataset.groups)
    return {**scores, "seconds": seconds}


def _sort_key(options: str):
    """Rows of a sweep in increasing order of the swept value(s)."""
    values = [_parse_value(item.partition("=")[2]) for item in options.split(";") if item]
    return [(0, v) if isinstance(v, (int, float)) else (1, str(v)) for v in values]


def summarize(rows: list[dict]) -> str:
    """Markdown table: one line per (data set, method), mean +- std over seeds."""
    lines = ["| data | method | seeds | " + " | ".join(HEADERS[m] for m in (*METRICS, "seconds")) + " |",
             "| --- | --- | --- |" + " --- |" * (len(METRICS) + 1)]
    keys = sorted({(row["dataset"], row["method"], row["options"]) for row in rows},
                  key=lambda key: (DATASETS.index(key[0]) if key[0] in DATASETS else 99, METHODS.index(key[1]),
                                   _sort_key(key[2])))
    for dataset, method, options in keys:
        chosen = [row for row in rows if (row["dataset"], row["method"], row["options"]) == (dataset, method, options)]
        cells = []
        for name in (*METRICS, "seconds"):
            values = np.array([float(row[name]) for row in chosen])
            digits = 1 if name == "seconds" else 3
            cells.append(f"{values.mean():.{digits}f} +- {values.std():.{digits}f}")
        label = f"{method} ({options.replace(';', ', ')})" if options else method
        lines.append(f"| {dataset} | {label} | {len(chosen)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--data", nargs="+", default=list(DATASETS), help=f"data set names (default {DATASETS})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--set", action="append", default=[], metavar="METHOD.OPTION=VALUE",
                        help="override a default option of one method (repeatable)")
    parser.add_argument("--sweep", default=None, metavar="OPTION=V1,V2,...",
                        help="run every method once per value of one option (a fairness-weight curve)")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "benchmarks", "results", "fidelity.csv"))
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.set)
    sweep = [{}]
    if args.sweep:
        name, sep, values = args.sweep.partition("=")
        if not sep or not values:
            raise SystemExit(f"--sweep expects option=v1,v2,..., got {args.sweep!r}")
        sweep = [{name: _parse_value(value)} for value in values.split(",")]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_model()
    date = datetime.date.today().isoformat()
    rows = []
    for name in args.data:
        dataset = data.load(name)
        for method, point in ((m, p) for m in args.methods for p in sweep):
            options = {**overrides.get(method, {}), **point}
            for seed in args.seeds:
                result = run_one(method, dataset, seed, args.device, options)
                row = {"date": date, "commit": git_commit(), "device": device_name,
                       "threads": torch.get_num_threads(), "dataset": name, "method": method, "seed": seed,
                       "options": ";".join(f"{k}={v}" for k, v in sorted(options.items())),
                       **{key: round(float(result[key]), 4) for key in (*METRICS, "fwd_max")},
                       "seconds": round(result["seconds"], 2)}
                rows.append(row)
                print(f"{name:15s} {method:6s} seed {seed}: " +
                      " ".join(f"{HEADERS[m]} {row[m]:.3f}" for m in METRICS) + f" ({row['seconds']:.1f}s)",
                      flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        new_file = not os.path.exists(args.out)
        with open(args.out, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            if new_file:
                writer.writeheader()
            writer.writerows(rows)
    print()
    print(summarize(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
