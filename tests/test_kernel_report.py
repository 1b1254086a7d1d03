"""benchmarks/kernel_report.py: every Triton launch of the quick subset compiles for sm_90 and
fits the hardware (no more than 227 KB of shared memory per block, no register spills).

Runs without a GPU: the report compiles with triton's NVIDIA backend and its bundled ptxas in a
subprocess (TRITON_INTERPRET unset); compiled kernels and ptxas results are cached on disk, so
only the first run pays the compile time."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import kernel_report  # noqa: E402  (imports no kernels: safe under TRITON_INTERPRET)


def _missing_backend():
    try:
        from triton import knobs
        ptxas = knobs.nvidia.ptxas.path
    except Exception as exc:  # no NVIDIA backend in this triton build
        return f"triton's NVIDIA backend is unavailable: {exc!r}"
    if not ptxas or not os.path.exists(ptxas):
        return "triton's bundled ptxas is missing"
    return None


def _run_report(tmp_path):
    out = tmp_path / "report.csv"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_report.py"), "--quick", "--csv",
                             str(out)], capture_output=True, text=True, env=env, timeout=1200)
    rows = list(csv.DictReader(open(out))) if out.exists() else []
    return result, rows


@pytest.mark.skipif(_missing_backend() is not None, reason=str(_missing_backend()))
def test_shipped_configs_fit_sm90(tmp_path):
    result, rows = _run_report(tmp_path)
    assert rows, result.stderr[-3000:]
    assert {r["op"] for r in rows} == set(kernel_report.OPS), "every op family is compiled"
    over = [r for r in rows if float(r["shared_kb"]) * 1024 > kernel_report.SMEM_PER_BLOCK]
    spills = [r for r in rows if int(r["spill_bytes"]) > 0]
    assert not over, [(r["kernel"], r["K"], r["D"], r["shared_kb"]) for r in over]
    assert not spills, [(r["kernel"], r["K"], r["D"], r["spill_bytes"]) for r in spills]
    assert all(int(r["blocks_per_sm"]) >= 1 for r in rows)
    assert result.returncode == 0, result.stdout[-3000:]
    # the fused FCMI loss from logits: <= 128 registers and within 1.15x of its byte floor
    fcmi = [r for r in rows if r["op"] == "fcmi"]
    assert all(int(r["registers"]) <= 128 for r in fcmi)
    assert all(float(r["op_bytes_ratio"]) <= 1.15 for r in fcmi if int(r["K"]) <= 512)


def test_blocks_per_sm_and_problems_follow_the_limits():
    kr = kernel_report
    assert kr.blocks_per_sm(255, 0, 8) == 1            # 8 warps x 8192 registers: the whole file
    assert kr.blocks_per_sm(128, 0, 4) == 4            # 65536 / (128 x 128)
    assert kr.blocks_per_sm(32, 0, 4) == 16            # threads limit: 2048 / 128
    assert kr.blocks_per_sm(32, 100 * 1024, 4) == 2    # shared memory: 228 KB / (100 + 1) KB
    assert kr.blocks_per_sm(32, 228 * 1024, 4) == 0    # over the 227 KB per block: cannot launch
    row = dict(kernel="k", dtype="fp32", K=300, D=128, shared_kb=264.0, spill_bytes=0)
    assert kr.problems([row]) and not kr.problems([dict(row, shared_kb=97.0)])
    assert kr.problems([dict(row, shared_kb=1.0, spill_bytes=8)])
