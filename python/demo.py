"""Demo: FCMI against AE + k-means on digits-reverse (bundled; each 8x8 digit appears once as
is and once with reversed intensities, the reversal being the protected group).

An unconstrained autoencoder separates originals from reversed digits, so AE + k-means builds
clusters of a single group (Balance and MNCE near 0). FCMI's I(G;C) term makes every cluster
mix both groups, and its default group-matched centers (docs/math.md §8) pair each original
digit's cluster with its reversed copy's. FCMI runs at the library's defaults except width=0.25,
a quarter of the paper's layer widths, so that both runs finish in about 20 s on a 2-core CPU;
benchmarks/fidelity.py has the multi-seed table at the same width.

    python python/demo.py [--out runs/demo] [--device cpu] [--epochs 100] [--width 0.25]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from fairkernels import data, metrics
from fairkernels.cli import format_table, write_figures
from fairkernels.train import make_trainer

AEKM_DEMO = dict(pretrain_epochs=2, finetune_epochs=30)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=100, help="FCMI epochs (including 20 warm-up epochs)")
    parser.add_argument("--width", type=float, default=0.25, help="layer widths relative to the paper's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    args = parser.parse_args(argv)

    dataset = data.load("digits-reverse")
    print(f"digits-reverse: N={dataset.X.shape[0]}, D={dataset.X.shape[1]}, "
          f"{int(dataset.groups.max()) + 1} groups, {int(dataset.y.max()) + 1} classes; device {args.device}")
    common = dict(n_clusters=10, device=args.device, seed=args.seed, progress=args.progress, verbose=False)
    runs = {"FCMI": ("fcmi", dict(epochs=args.epochs, width=args.width)),
            "AE + k-means": ("ae-km", dict(AEKM_DEMO, width=args.width))}
    scores, timings = {}, {}
    for name, (method, options) in runs.items():
        started = time.perf_counter()
        trainer = make_trainer(method, **common, **options).fit(dataset.X, dataset.groups, dataset.y)
        timings[name] = time.perf_counter() - started
        scores[name] = metrics.evaluate(dataset.y, trainer.labels_, dataset.groups)
        write_figures(trainer, dataset, trainer.labels_, os.path.join(args.out, "figures"), method)
        print(f"{name}: {timings[name]:.1f}s")
    print()
    print(format_table(scores))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "demo_metrics.json"), "w") as handle:
        json.dump({"scores": scores, "seconds": timings}, handle, indent=2)
    print(f"\nfigures and demo_metrics.json in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
