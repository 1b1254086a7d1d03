"""DEC's whole-set target refresh against the lagged per-row target (DFCConfig.target_refresh)
on a set large enough for the choice to matter: `appearance` with 40,000 rows, width 0.25.

    python python/target_refresh.py [--n 40000] [--seeds 0 1] [--out benchmarks/results/target_refresh.csv]
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import subprocess
import time

import numpy as np

from fairkernels import data, metrics
from fairkernels.train import make_trainer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40_000)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--modes", nargs="+", default=["interval", "lagged"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    ds = data.load("appearance", n=args.n, seed=0)
    X = ds.X.astype(np.float32)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = []
    for seed in args.seeds:
        for mode in args.modes:
            started = time.perf_counter()
            trainer = make_trainer("dec", width=0.25, seed=seed, target_refresh=mode, n_clusters=ds.num_classes,
                                   progress=False, verbose=False).fit(X, ds.groups)
            scores = metrics.evaluate(ds.y, trainer.labels_, ds.groups)
            row = dict(date=datetime.date.today().isoformat(), commit=commit, n=args.n, method="dec", seed=seed,
                       target_refresh=mode, acc=round(scores["acc"], 4), nmi=round(scores["nmi"], 4),
                       mnce=round(scores["mnce"], 4), seconds=round(time.perf_counter() - started, 1))
            print(row, flush=True)
            rows.append(row)
    if args.out:
        new = not os.path.exists(args.out)
        with open(args.out, "a", newline="") as f:
            writer = csv.DictWriter(f, list(rows[0]))
            if new:
                writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
