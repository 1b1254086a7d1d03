"""Does loading fairkernels slow plain torch work on CPU (a second OpenMP runtime, or threads
that oversubscribe the cores)? Issue 10 point 4.

    python benchmarks/bench_threads.py               # 2 threads, batch 256, 3 rounds of 20 steps
    python benchmarks/bench_threads.py --threads 1

One process times a Linear(512, 1024) + BatchNorm1d + ReLU forward+backward+SGD step at batch
256 (best of --rounds rounds of --steps steps, torch.set_num_threads(--threads)) in three
states: before `import fairkernels`, after it, and after one fused CPU call
(fk.fcmi_loss fwd+bwd at N = 10^5, K = 10). Each state also lists the OpenMP runtimes mapped
into the process (/proc/self/maps) and the number of OS threads. Ratios near 1.0 mean the
extension costs torch nothing.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

OPENMP_LIBRARY = re.compile(r"lib(g|i)?omp[^/]*\.so")


def openmp_runtimes() -> list[str]:
    """Paths of the OpenMP runtime libraries mapped into this process."""
    with open("/proc/self/maps") as maps:
        return sorted({line.split()[-1] for line in maps if OPENMP_LIBRARY.search(line.split()[-1])})


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def make_step(batch: int):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.BatchNorm1d(1024), torch.nn.ReLU())
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 512)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()
    return step


def time_step(step, rounds: int, steps: int) -> tuple[float, float]:
    """Best over rounds of the mean wall ms and of the mean process-CPU ms per step. CPU time
    counts every thread of the process, spinning ones included, and is less disturbed than wall
    time when other jobs share the machine."""
    step()  # warm-up
    best_wall = best_cpu = float("inf")
    for _ in range(rounds):
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            step()
        best_wall = min(best_wall, (time.perf_counter() - wall) / steps * 1e3)
        best_cpu = min(best_cpu, (time.process_time() - cpu) / steps * 1e3)
    return best_wall, best_cpu


def fused_call():
    import fairkernels as fk
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(100_000, 10, generator=gen).requires_grad_()
    groups = torch.randint(0, 2, (100_000,), generator=gen)
    fk.fcmi_loss(logits, groups, 2, backend="cpu").backward()


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    step = make_step(args.batch)
    rows = []

    def record(state):
        wall, cpu = time_step(step, args.rounds, args.steps)
        first = rows[0] if rows else {"wall_ms": wall, "cpu_ms": cpu}
        rows.append({"state": state, "wall_ms": wall, "cpu_ms": cpu, "wall_ratio": wall / first["wall_ms"],
                     "cpu_ratio": cpu / first["cpu_ms"], "openmp_runtimes": openmp_runtimes(),
                     "os_threads": os_threads()})
        row = rows[-1]
        print(f"{state:<26} wall {wall:8.3f} ms (x{row['wall_ratio']:.2f})  cpu {cpu:8.3f} ms "
              f"(x{row['cpu_ratio']:.2f})  os_threads={row['os_threads']}  "
              f"openmp={[os.path.basename(p) for p in row['openmp_runtimes']]}", flush=True)

    record("torch only")
    import fairkernels  # noqa: F401
    record("after import fairkernels")
    fused_call()
    record("after a fused CPU call")
    print(f"torch.get_num_threads() = {torch.get_num_threads()}, machine cores = {os.cpu_count()}")
    return rows


if __name__ == "__main__":
    main()
