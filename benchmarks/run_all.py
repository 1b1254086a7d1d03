"""Run every benchmark family (`make bench`) and print a markdown table for the README.

    python benchmarks/run_all.py                # full CPU or GPU grid, rows appended to results/
    python benchmarks/run_all.py --quick --out-dir /tmp/bench   # smoke test
    python benchmarks/run_all.py --only fcmi histogram

Every flag other than --only is passed to each bench_<family>.py (see harness.parser).
"""
from __future__ import annotations

import argparse
import sys

import harness
import bench_assign
import bench_dfc
import bench_fcmi
import bench_histogram

FAMILIES = {"fcmi": bench_fcmi, "histogram": bench_histogram, "assign": bench_assign, "dfc": bench_dfc}
TABLE_COLUMNS = ("op", "backend", "dtype", "pass", "n", "k", "t", "ms", "speedup_vs_reference")


def markdown_table(rows: list[dict]) -> str:
    """One line per measurement: op, backend, dtype, pass, N, K, T, ms, speedup vs the eager reference."""
    header = ["op", "backend", "dtype", "pass", "N", "K", "T", "ms", "speedup vs reference"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row[c]) if row[c] != "" else "-" for c in TABLE_COLUMNS]
        cells[-2] = f"{float(row['ms']):.3f}"
        if row["speedup_vs_reference"] != "":
            cells[-1] = f"{float(row['speedup_vs_reference']):.2f}x"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> str:
    argv = sys.argv[1:] if argv is None else list(argv)
    selector = argparse.ArgumentParser(add_help=False)
    selector.add_argument("--only", nargs="+", choices=sorted(FAMILIES), default=list(FAMILIES))
    chosen, rest = selector.parse_known_args(argv)
    harness.parse_args(harness.parser("run_all"), rest)   # reject bad flags before hours of work
    rows = []
    for name in chosen.only:
        rows += FAMILIES[name].main(rest)
    table = markdown_table(rows)
    print()
    print(table)
    return table


if __name__ == "__main__":
    main()
