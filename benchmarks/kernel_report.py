"""Compile every Triton kernel variant the library launches for sm_90 (H100/H200), without a GPU,
and report what the hardware limits hide from the interpreter.

Each row is one kernel launch of one op at one shape class: the op's own launcher runs on "meta"
tensors with fairkernels.triton._common.LAUNCH_HOOK set, so the kernel, its constexprs,
num_warps/num_stages and the argument specialisation (dtypes, 16-divisibility) are exactly what
the launcher would hand to Triton on a GPU; the report then compiles that launch the way
triton.JITFunction.run does (GPUTarget("cuda", 90, 32)), and runs the bundled
`ptxas -v --gpu-name=sm_90a` on the PTX. Compiled kernels are cached by Triton, ptxas results
next to them (TRITON_CACHE_DIR/fairkernels-ptxas), so a second run costs seconds.

Columns: registers per thread, spill bytes (stores + loads), shared memory per block, blocks per
SM (H100: 65536 registers, 227 KB shared per block, 228 KB per SM, 2048 threads, 32 blocks; 1 KB
reserved per block, registers allocated per warp in units of 256), global atomics in the PTX
(`atom.global` / `red.global` instructions: a count of sites, not of executions), and the byte
model: DRAM bytes per row the kernel moves (row_bytes below) against the floor of its op.

Usage: python benchmarks/kernel_report.py [--quick] [--csv PATH] [--jobs N] [--ops ...] [--ks ...]
       python benchmarks/kernel_report.py --summary PATH.csv ...   (the README table)
Exit status 1 when a shipped config needs more than 227 KB of shared memory or spills.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# H100 / H200 (sm_90) per-SM limits
REGISTERS_PER_SM = 65536
SMEM_PER_BLOCK = 227 * 1024
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_BLOCK = 1024
THREADS_PER_SM = 2048
BLOCKS_PER_SM = 32
REGISTER_UNIT = 256  # registers are allocated per warp in units of 256

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}
FULL = dict(dtypes=["fp32", "fp64", "bf16"], ks=[2, 10, 100, 300, 1000, 4096], ds=[10, 64, 128, 512],
            groups=[2, 100], deterministic=[False, True])
# make test's subset, float32: one K tile (K = 10) and K-tiled (K = 1000: several tiles for the
# row kernels, and the same kernels as K = 300, the case, for the dot kernels at D = 128)
QUICK = dict(dtypes=["fp32"], ks=[10, 1000], ds=[128], groups=[2], deterministic=[False, True])
ROWS = 1 << 20   # N of the report's launches (only the grid depends on it: N is not specialised)
GROUP_BYTES = 8  # int64 groups, torch's default integer dtype

FIELDS = ["op", "kernel", "dtype", "K", "D", "T", "deterministic", "config", "num_warps", "num_stages",
          "registers", "spill_bytes", "shared_kb", "blocks_per_sm", "atomics", "bytes_per_row",
          "floor_bytes_per_row", "op_bytes_ratio"]


# --------------------------------------------------------------------------- launches of each op
def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def _raw(op):
    """The launcher body of a torch.library custom op (its fake would run on meta tensors)."""
    return getattr(op, "_init_fn", op)


def _op_calls(op, dtype, k, d, t, det):
    """Calls of the op's launchers for one shape class, forward then backward."""
    from fairkernels import triton as fkt
    n = ROWS
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    groups = _meta(n, dtype=torch.int64)
    if op == "fcmi":
        x = _meta(n, k, dtype=dtype)
        lse, _, _ = _raw(fkt.fcmi_fwd)(x, groups, t, det)
        _raw(fkt.fcmi_bwd)(x, groups, lse, _meta(t, k, dtype=acc), _meta(dtype=acc), det)
    elif op == "fcmi_emb":
        h, c = _meta(n, d, dtype=dtype), _meta(k, d, dtype=dtype)
        lse, _, _ = _raw(fkt.fcmi_emb_fwd)(h, c, groups, t, 0.1, det)
        _raw(fkt.fcmi_emb_bwd)(h, c, groups, lse, _meta(t, k, dtype=acc), _meta(dtype=acc), 0.1, det)
    elif op in ("student_t", "cosine"):
        x, c = _meta(n, d, dtype=dtype), _meta(k, d, dtype=dtype)
        q = _raw(getattr(fkt, f"{op}_fwd"))(x, c, 1.0)
        _raw(getattr(fkt, f"{op}_bwd"))(_meta(n, k, dtype=dtype), q, x, c, 1.0)
    elif op == "histogram":
        p = _meta(n, k, dtype=dtype)
        joint = _raw(fkt.histogram_fwd)(p, groups, None, t, det)
        _raw(fkt.histogram_bwd)(joint, groups, None)
    elif op == "kmeans":
        _raw(fkt.kmeans_assign)(_meta(n, d, dtype=dtype), _meta(k, d, dtype=dtype))
    elif op == "dfc":
        q = _meta(n, k, dtype=dtype)
        target = _raw(fkt.dec_target)(q)
        _raw(fkt.kl_div_fwd)(target, q)
        _raw(fkt.kl_div_bwd)(_meta(dtype=dtype), target, q)
    else:
        raise ValueError(f"unknown op {op!r}")


# ops -> which of (D, T, deterministic) their launches depend on
OPS = {"fcmi": ("T", "det"), "fcmi_emb": ("D", "T", "det"), "student_t": ("D",), "cosine": ("D",),
       "histogram": ("T", "det"), "kmeans": ("D",), "dfc": ()}


def _shape_classes(grid):
    for op, axes in OPS.items():
        if grid.get("ops") and op not in grid["ops"]:
            continue
        for dtype in grid["dtypes"]:
            for k in grid["ks"]:
                for d in grid["ds"] if "D" in axes else [None]:
                    for t in grid["groups"] if "T" in axes else [None]:
                        for det in grid["deterministic"] if "det" in axes else [None]:
                            yield op, dtype, k, d, t, det


def record_launches(op, dtype, k, d, t, det):
    """[(kernel, args, kwargs)] the op's launchers make for this shape class."""
    from fairkernels.triton import _common
    launches = []
    _common.LAUNCH_HOOK = lambda kernel, grid, args, kwargs: launches.append((kernel, args, kwargs))
    try:
        _op_calls(op, DTYPES[dtype], k, d or 16, t or 2, bool(det))
    finally:
        _common.LAUNCH_HOOK = None
    return launches


# --------------------------------------------------------------------------- compile, as JITFunction.run
def _target():
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", 90, 32)


def launch_spec(kernel, args, kwargs):
    """What JITFunction.run would compile for this launch on sm_90: (signature, constexprs,
    attrs, options), by the same binder and _pack_args."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    backend = make_backend(_target())
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options.__dict__


def _ptxas_report(ptx: str) -> dict:
    from triton import knobs
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        # the flags triton's CUDA backend passes (make_cubin), so the numbers are those that ship
        run = subprocess.run([knobs.nvidia.ptxas.path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                              "--gpu-name=sm_90a", str(src), "-o", str(Path(tmp) / "kernel.cubin")],
                             capture_output=True, text=True, check=True)
    log = run.stderr + run.stdout
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return dict(registers=regs, spill_bytes=int(spills.group(1)) + int(spills.group(2)),
                stack_bytes=int(stack.group(1)))


def _cache_dir() -> Path:
    from triton import knobs
    path = Path(knobs.cache.dir) / "fairkernels-ptxas"
    path.mkdir(parents=True, exist_ok=True)
    return path


def compile_launch(job):
    """Compiles one launch spec (run in a worker); returns its resource usage."""
    module, name, signature, constexprs, attrs, options = job
    import importlib

    import triton
    from triton.compiler import ASTSource
    kernel = getattr(importlib.import_module(module), name)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=_target(),
                              options=options)
    meta = compiled.metadata
    cached = _cache_dir() / f"{meta.hash}.json"
    if cached.exists():
        usage = json.loads(cached.read_text())
    else:
        ptx = compiled.asm["ptx"]
        usage = _ptxas_report(ptx)
        usage["atomics"] = len(re.findall(r"^\s*(?:@%p\d+\s+)?(?:atom|red)\.global", ptx, re.M))
        cached.write_text(json.dumps(usage))
    usage.update(shared=meta.shared, num_warps=meta.num_warps, num_stages=meta.num_stages)
    return usage


def blocks_per_sm(registers, shared, num_warps):
    threads = 32 * num_warps
    regs_per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    by_regs = (REGISTERS_PER_SM // regs_per_warp) // num_warps
    by_smem = SMEM_PER_SM // (shared + SMEM_RESERVED_PER_BLOCK)
    if shared > SMEM_PER_BLOCK:
        return 0
    return min(by_regs, by_smem, THREADS_PER_SM // threads, BLOCKS_PER_SM)


# --------------------------------------------------------------------------- byte model
def row_bytes(name, cx, dtype, k, d):
    """DRAM bytes per row the kernel moves: every per-row load and store it issues (T x K tables,
    centres and other O(K d) operands are reused from L2 and not counted; a second pass over a
    row that does not fit one K tile is counted, though on a GPU it usually hits L2)."""
    s = torch.empty((), dtype=DTYPES[dtype]).element_size()
    a = 8 if dtype == "fp64" else 4
    g = GROUP_BYTES
    single = cx.get("SINGLE_K_TILE", True)
    passes = 1 if single else 2
    lse_io = 0 if single else a  # one K tile: the backward recomputes the row logsumexp
    if name == "_fcmi_fwd_kernel":
        return passes * k * s + g + lse_io
    if name == "_fcmi_bwd_kernel":
        return passes * k * s + g + lse_io + k * s
    if name == "_fcmi_emb_fwd_kernel":
        return d * s + g + lse_io
    if name == "_fcmi_emb_bwd_kernel":
        return d * s + g + lse_io + d * s
    if name == "_soft_assign_fwd_kernel":
        return d * s + k * s
    if name == "_soft_assign_bwd_kernel":  # q and dL/dq read twice (row dot, then the epilogue)
        return d * s + 2 * 2 * k * s + d * s
    if name == "_histogram_fwd_kernel":
        return k * s + g
    if name == "_histogram_bwd_kernel":
        return g + k * a
    if name == "_kmeans_assign_kernel":
        return d * s + 8 + a
    if name in ("_dec_target_colsum_kernel", "_kl_div_bwd_kernel"):
        return k * s if name.startswith("_dec") else 3 * k * s
    if name == "_dec_target_fwd_kernel":
        return 2 * k * s + k * s
    if name == "_kl_div_fwd_kernel":
        return 2 * k * s
    raise KeyError(name)


def floor_bytes(op, dtype, k, d):
    """Per-row floor of the op (forward + backward): each kernel reads its row inputs once and
    writes its row outputs once; the forward must finish the batch statistics before any
    gradient exists, so the backward reads the rows again."""
    s = torch.empty((), dtype=DTYPES[dtype]).element_size()
    g = GROUP_BYTES
    a = 8 if dtype == "fp64" else 4
    return {"fcmi": (k * s + g) + (k * s + g + k * s),
            "fcmi_emb": (d * s + g) + (d * s + g + d * s),
            "student_t": (d * s + k * s) + (2 * k * s + d * s + d * s),
            "cosine": (d * s + k * s) + (2 * k * s + d * s + d * s),
            "histogram": (k * s + g) + (g + k * a),
            "kmeans": d * s + 8 + a,
            "dfc": k * s + (k * s + k * s) + 2 * k * s + 3 * k * s}[op]


# --------------------------------------------------------------------------- driver
def _config(cx):
    keys = [k for k in ("BLOCK_N", "BLOCK_K", "BLOCK_D", "BLOCK_T", "BLOCK") if k in cx]
    flags = [k for k, v in cx.items() if isinstance(v, bool) and v]
    return " ".join(f"{k[6:] or 'B'}={cx[k]}" for k in keys) + (" " + ",".join(flags) if flags else "")


def build_rows(grid, jobs=1, log=print):
    classes = list(_shape_classes(grid))
    plans, unique = [], {}
    for shape in classes:
        kernels, seen = [], set()
        for kernel, args, kwargs in record_launches(*shape):
            signature, constexprs, attrs, options = launch_spec(kernel, args, kwargs)
            job = (kernel.fn.__module__, kernel.fn.__name__, signature, constexprs, attrs, options)
            key = hashlib.sha256(repr(job).encode()).hexdigest()
            unique.setdefault(key, job)
            if key in seen:  # a fallback's row chunks launch the same kernel again: one row each
                continue
            seen.add(key)
            cx = {kernel.arg_names[p[0]]: v for p, v in constexprs.items()}
            kernels.append((kernel.fn.__name__, cx, key))
        plans.append((shape, kernels))
    log(f"{len(classes)} shape classes, {sum(len(k) for _, k in plans)} launches, {len(unique)} distinct kernels")
    keys = list(unique)
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            usages = dict(zip(keys, pool.map(compile_launch, [unique[k] for k in keys])))
    else:
        usages = {key: compile_launch(unique[key]) for key in keys}
    rows = []
    for (op, dtype, k, d, t, det), kernels in plans:
        op_bytes = sum(row_bytes(name, cx, dtype, k, d or 0) for name, cx, _ in kernels)
        floor = floor_bytes(op, dtype, k, d or 0)
        for name, cx, key in kernels:
            use = usages[key]
            rows.append(dict(
                op=op, kernel=name, dtype=dtype, K=k, D=d if d is not None else "", T=t if t is not None else "",
                deterministic="" if det is None else int(det), config=_config(cx), num_warps=use["num_warps"],
                num_stages=use["num_stages"], registers=use["registers"], spill_bytes=use["spill_bytes"],
                shared_kb=round(use["shared"] / 1024, 1),
                blocks_per_sm=blocks_per_sm(use["registers"], use["shared"], use["num_warps"]),
                atomics=use["atomics"], bytes_per_row=row_bytes(name, cx, dtype, k, d or 0),
                floor_bytes_per_row=floor, op_bytes_ratio=round(op_bytes / floor, 3)))
    return rows


def problems(rows):
    """Launches that cannot run (shared memory over the per-block limit) or spill."""
    bad = []
    for r in rows:
        if r["shared_kb"] * 1024 > SMEM_PER_BLOCK:
            bad.append(f"{r['kernel']} {r['dtype']} K={r['K']} D={r['D']}: {r['shared_kb']} KB shared memory")
        if r["spill_bytes"] > 0:
            bad.append(f"{r['kernel']} {r['dtype']} K={r['K']} D={r['D']}: {r['spill_bytes']} spill bytes")
    return bad


def summary(rows):
    """Markdown table, one line per (op, dtype): the worst case over its K / D / T / modes."""
    lines = ["| op | dtype | kernels | max registers | spill bytes | max shared KB | min blocks/SM "
             "| bytes/floor K=10 | bytes/floor K=1000 |", "|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["op"], r["dtype"]) for r in rows}, key=lambda key: (list(OPS).index(key[0]), key[1]))
    for op, dtype in keys:
        group = [r for r in rows if (r["op"], r["dtype"]) == (op, dtype)]

        def ratio(k):
            vals = [float(r["op_bytes_ratio"]) for r in group if int(r["K"]) == k]
            return f"{max(vals):.2f}" if vals else "-"
        lines.append(f"| {op} | {dtype} | {len({r['kernel'] for r in group})} "
                     f"| {max(int(r['registers']) for r in group)} | {sum(int(r['spill_bytes']) for r in group)} "
                     f"| {max(float(r['shared_kb']) for r in group):.1f} "
                     f"| {min(int(r['blocks_per_sm']) for r in group)} | {ratio(10)} | {ratio(1000)} |")
    return "\n".join(lines)


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the subset make test runs")
    parser.add_argument("--csv", type=Path, default=None, help="write the table here")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--ops", nargs="*", choices=list(OPS), help="only these ops")
    parser.add_argument("--ks", nargs="*", type=int, help="only these K")
    parser.add_argument("--dtypes", nargs="*", choices=list(DTYPES), help="only these dtypes")
    parser.add_argument("--groups", nargs="*", type=int, help="only these T")
    parser.add_argument("--summary", nargs="*", type=Path, help="print the markdown summary of these CSVs")
    args = parser.parse_args(argv)
    if args.summary:
        print(summary([row for path in args.summary for row in _read_csv(path)]))
        return 0
    grid = dict(QUICK if args.quick else FULL, ops=args.ops)
    grid.update({key: value for key, value in (("ks", args.ks), ("dtypes", args.dtypes), ("groups", args.groups)) if value})
    rows = build_rows(grid, args.jobs)
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, FIELDS)
            writer.writeheader()
            writer.writerows(rows)
    width = {f: max(len(f), *(len(str(r[f])) for r in rows)) for f in FIELDS}
    print("  ".join(f.ljust(width[f]) for f in FIELDS))
    for r in rows:
        print("  ".join(str(r[f]).ljust(width[f]) for f in FIELDS))
    bad = problems(rows)
    for line in bad:
        print("PROBLEM:", line)
    return 1 if bad else 0


if __name__ == "__main__":
    # the report compiles and never interprets: triton.jit must build JITFunctions, so this is
    # unset before fairkernels' kernels are imported (they are imported lazily, above)
    os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main())
