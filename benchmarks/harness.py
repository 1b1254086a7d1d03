"""The one benchmark harness: timing, bandwidth, peak memory and CSV rows for every op family.

Each bench_<family>.py describes its configs as `Case`s (inputs, the fused call, the reference
call, the minimal bytes each pass must move) and hands them to `run_cases`, which times

    every available fused backend  vs  the eager reference  vs  torch.compile(reference)

for the forward and the forward+backward pass and appends one CSV row per measurement to
benchmarks/results/<family>.csv (columns: CSV_COLUMNS; their meaning is in benchmarks/README.md).

Timing: triton.testing.do_bench (median) on CUDA; on CPU the median of >= 5 wall-clock runs
(time.perf_counter) after warm-up runs, or with --best-of R the fastest of R runs (for a
shared machine, where the minimum is the least disturbed sample). Bandwidth is reported against the bandwidth of a large
tensor copy timed the same way in the same run, so frac_copy_bw is comparable across machines.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import functools
import gc
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # lets `python benchmarks/bench_x.py` run from a checkout without pip install
    sys.path.insert(0, REPO_ROOT)

from fairkernels import _backend  # noqa: E402
DEFAULT_OUT_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")
CSV_COLUMNS = ["date", "commit", "host", "device", "threads", "torch", "triton", "op", "backend", "dtype",
               "n", "k", "t", "d", "pass", "ms", "gbps", "frac_copy_bw", "peak_mb", "speedup_vs_reference"]
PASSES = ("fwd", "fwd+bwd")
EAGER = "reference"
COMPILED = "torch.compile"
# CPU timing: at least this many timed runs (the median is reported) after WARMUP_RUNS.
MIN_REPS = 5
WARMUP_RUNS = 1
# The copy used to measure the device's achievable bandwidth (bytes of the source tensor).
COPY_BYTES = {"cpu": 256 << 20, "cuda": 1 << 30, "quick": 16 << 20}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}


@dataclass
class Case:
    """One benchmark configuration of one op.

    make_inputs() -> tuple of tensors (float leaves that need a gradient have requires_grad=True);
    fused(backend, *inputs) and reference(*inputs) -> a tensor (a 0-dim loss or an N x K output);
    bytes_per_pass maps "fwd"/"fwd+bwd" to the minimal memory traffic of that pass.
    backend_op is the op name that fairkernels._backend uses to decide availability."""
    op: str
    backend_op: str
    dtype: torch.dtype
    n: int
    k: int
    t: int | None
    d: int | None
    make_inputs: Callable[[], tuple]
    fused: Callable
    reference: Callable
    bytes_per_pass: dict
    passes: tuple = PASSES
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- environment
@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    """The short commit of HEAD, with "+dirty" when tracked files differ from it (a result row
    must not claim a commit whose code did not produce it)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
        commit = out.stdout.strip()
        if not commit:
            return "unknown"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=REPO_ROOT, capture_output=True,
                               timeout=10).returncode == 1
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return ""


def environment(device: torch.device) -> dict:
    """The columns shared by every row of one run."""
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": git_commit(),
        "host": socket.gethostname(),
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version(),
    }


# --------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, reps: int = MIN_REPS, best_of: int = 0) -> float:
    """Milliseconds of fn(): do_bench's median on CUDA; on CPU the median of >= MIN_REPS
    perf_counter runs, or the minimum of best_of runs when best_of > 0."""
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, return_mode="median"))
    for _ in range(WARMUP_RUNS):
        fn()
    samples = []
    for _ in range(best_of if best_of > 0 else max(reps, MIN_REPS)):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return min(samples) if best_of > 0 else statistics.median(samples)


def copy_bandwidth_gbps(device: torch.device, reps: int = MIN_REPS, quick: bool = False) -> float:
    """GB/s of torch.empty_like(x).copy_(x) on a large tensor: one read plus one write."""
    nbytes = COPY_BYTES["quick" if quick else device.type if device.type == "cuda" else "cpu"]
    source = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    ms = time_ms(lambda: torch.empty_like(source).copy_(source), device, reps)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def peak_memory_mb(fn: Callable[[], object], device: torch.device):
    """Extra device memory at the peak of one fn() call (CUDA allocator), or "n/a" on CPU, where
    torch's allocations are invisible to tracemalloc and ru_maxrss only ever grows."""
    if device.type != "cuda":
        return "n/a"
    _sync(device)
    gc.collect()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 3)


def _leaves(inputs: tuple) -> list:
    return [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]


def make_pass(call: Callable, inputs: tuple, pass_name: str) -> Callable[[], object]:
    """A zero-argument callable running one pass. fwd runs under no_grad; fwd+bwd seeds the
    backward with ones (an N x K output) and drops .grad each time so nothing accumulates."""
    leaves = _leaves(inputs)
    if pass_name == "fwd":
        def forward():
            with torch.no_grad():
                return call(*inputs)
        return forward

    def forward_backward():
        for leaf in leaves:
            leaf.grad = None
        out = call(*inputs)
        out.backward(torch.ones_like(out))
        return out
    return forward_backward


# --------------------------------------------------------------------------- running cases
def fused_backends(case: Case, device: torch.device) -> list[str]:
    """Fused backends that can run this case here. Interpreted Triton (TRITON_INTERPRET=1 on
    CPU) is a correctness tool, not something to time, so it is never benchmarked."""
    names = []
    for backend in ("cpu", "triton", "cuda"):
        if backend == "triton" and device.type != "cuda":
            continue
        if _backend.unavailable_reason(backend, device, case.dtype, case.backend_op) is None:
            names.append(backend)
    return names


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def run_cases(family: str, cases: list[Case], args) -> list[dict]:
    """Time every case on every backend, print a line per measurement, append the CSV rows."""
    device = torch.device(args.device)
    env = environment(device)
    copy_gbps = copy_bandwidth_gbps(device, args.reps, args.quick)
    print(f"# {family}: {env['device']}, {env['threads']} threads, copy bandwidth {copy_gbps:.1f} GB/s")
    rows = []
    for case in cases:
        try:
            inputs = case.make_inputs()
        except Exception as err:
            if _is_oom(err):
                print(f"skip {case.op} n={case.n} k={case.k}: inputs do not fit in memory")
                continue
            raise
        variants = [(b, functools.partial(case.fused, b)) for b in fused_backends(case, device)]
        variants.append((EAGER, case.reference))
        if args.compile:
            variants.append((COMPILED, torch.compile(case.reference, dynamic=False)))
        for pass_name in case.passes:
            timed = {}
            for backend, call in variants:
                fn = make_pass(call, inputs, pass_name)
                try:
                    ms = time_ms(fn, device, args.reps, args.best_of)
                    peak = peak_memory_mb(fn, device)
                except Exception as err:
                    if not _is_oom(err):
                        raise
                    print(f"skip {case.op}/{backend}/{pass_name} n={case.n} k={case.k}: out of memory")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                timed[backend] = (ms, peak)
            reference_ms = timed.get(EAGER, (None,))[0]
            for backend, (ms, peak) in timed.items():
                gbps = case.bytes_per_pass[pass_name] / (ms * 1e-3) / 1e9
                row = dict(env, op=case.op, backend=backend, dtype=str(case.dtype).replace("torch.", ""),
                           n=case.n, k=case.k, t="" if case.t is None else case.t,
                           d="" if case.d is None else case.d, **{"pass": pass_name},
                           ms=_sig(ms), gbps=_sig(gbps), frac_copy_bw=_sig(gbps / copy_gbps), peak_mb=peak,
                           speedup_vs_reference="" if reference_ms is None else _sig(reference_ms / ms))
                rows.append(row)
                print(f"{case.op:<28} {backend:<14} {pass_name:<8} n={case.n} k={case.k} t={row['t']} "
                      f"d={row['d']}  {ms:9.3f} ms  {gbps:8.2f} GB/s  x{row['speedup_vs_reference']}")
        del inputs, variants
        gc.collect()
    write_rows(os.path.join(args.out_dir, f"{family}.csv"), rows)
    return rows


def _sig(value: float, digits: int = 4) -> float:
    """Round to significant digits (tiny quick-run bandwidths must not round to 0)."""
    return float(f"{value:.{digits}g}")


def write_rows(path: str, rows: list[dict]) -> None:
    """Append rows to a CSV file, writing the header when the file is new."""
    if not rows:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    new_file = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new_file:
            writer.writeheader()
        writer.writerows(rows)


# --------------------------------------------------------------------------- command line
def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--quick", action="store_true", help="one tiny config (a smoke test, not a measurement)")
    p.add_argument("--n", type=int, default=None, help="override the number of rows N")
    p.add_argument("--reps", type=int, default=MIN_REPS, help=f"timed runs on CPU (at least {MIN_REPS})")
    p.add_argument("--best-of", type=int, default=0,
                   help="CPU: report the fastest of this many runs instead of the median (shared machines)")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads before timing")
    p.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help="where <family>.csv is appended")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="also time torch.compile(reference) (default: on for CUDA, off for CPU)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    return p


def parse_args(p: argparse.ArgumentParser, argv=None):
    args = p.parse_args(argv)
    if args.compile is None:
        args.compile = args.device.startswith("cuda")
    args.dtype = DTYPES[args.dtype]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args


def shape_grid(args, gpu_grid: list[tuple], cpu_grid: list[tuple], quick: tuple) -> list[tuple]:
    """The (n, k, t) configs of a run: quick, GPU or CPU grid, with --n overriding N."""
    if args.quick:
        grid = [quick]
    elif args.device.startswith("cuda"):
        grid = gpu_grid
    else:
        grid = cpu_grid
    if args.n is not None:
        grid = sorted({(args.n,) + tuple(cfg[1:]) for cfg in grid})
    return grid


def fits(num_elements: int, dtype: torch.dtype, copies: int, device: torch.device) -> bool:
    """Whether `copies` tensors of num_elements fit in the device's free memory (CUDA only)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return num_elements * element_size(dtype) * copies < 0.9 * free


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
