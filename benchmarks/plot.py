"""Plot the speedup over the eager reference of every backend, per config, from results/*.csv.

    python benchmarks/plot.py [--results-dir benchmarks/results] [--out benchmarks/results/speedup.png]

One panel per (op, pass); bars per config (N, K, T, d) and backend, from the newest row of each
(device, op, backend, dtype, pass, N, K, T, d) so that re-runs replace older measurements.
"""
from __future__ import annotations

import argparse
import csv
import glob
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
KEY_COLUMNS = ("device", "op", "backend", "dtype", "pass", "n", "k", "t", "d")


def load_rows(results_dir: str) -> list[dict]:
    """The newest row of each measurement key across every CSV in results_dir."""
    newest = {}
    for path in sorted(glob.glob(os.path.join(results_dir, "*.csv"))):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if not row.get("speedup_vs_reference"):
                    continue
                key = tuple(row[c] for c in KEY_COLUMNS)
                if key not in newest or row["date"] >= newest[key]["date"]:
                    newest[key] = row
    return list(newest.values())


def config_label(row: dict) -> str:
    parts = [f"N={row['n']}", f"K={row['k']}"]
    parts += [f"T={row['t']}"] if row["t"] else []
    parts += [f"d={row['d']}"] if row["d"] else []
    return " ".join(parts)


def plot(rows: list[dict], out_path: str) -> str:
    panels = sorted({(r["op"], r["pass"]) for r in rows})
    if not panels:
        raise ValueError("no benchmark rows with a speedup to plot")
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.8 * len(panels)), squeeze=False)
    for ax, (op, pass_name) in zip(axes[:, 0], panels):
        panel_rows = [r for r in rows if r["op"] == op and r["pass"] == pass_name]
        configs = sorted({config_label(r) for r in panel_rows},
                         key=lambda c: [float(v.split("=")[1]) for v in c.split()])
        backends = sorted({r["backend"] for r in panel_rows})
        width = 0.8 / len(backends)
        for j, backend in enumerate(backends):
            speedup = {config_label(r): float(r["speedup_vs_reference"]) for r in panel_rows
                       if r["backend"] == backend}
            xs = [i + j * width for i, c in enumerate(configs) if c in speedup]
            ax.bar(xs, [speedup[c] for c in configs if c in speedup], width, label=backend)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(configs))], configs, fontsize=7)
        ax.set_ylabel("speedup vs eager")
        ax.set_title(f"{op} ({pass_name})", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--out", default=None, help="PNG path (default: <results-dir>/speedup.png)")
    args = p.parse_args(argv)
    out = plot(load_rows(args.results_dir), args.out or os.path.join(args.results_dir, "speedup.png"))
    print(out)
    return out


if __name__ == "__main__":
    main()
