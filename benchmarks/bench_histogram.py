"""Benchmark of the group x cluster joint histogram J_tk = sum_{g_i = t} P_ik (docs/math.md §2.1).

    python benchmarks/bench_histogram.py [--quick] [--compile] [--n N]

Minimal traffic: fwd reads P (N x K) and the groups once; fwd+bwd also reads the groups again
and writes dL/dP (N x K). The T x K output is negligible.
"""
from __future__ import annotations

import torch

import harness
import fairkernels as fk
from fairkernels import reference

FAMILY = "histogram"
GPU_GRID = [(n, k, t) for n in (1 << 20, 1 << 24) for k in (10, 100, 1000) for t in (2, 30)]
CPU_GRID = [(10**6, 10, 2), (10**6, 100, 30)]
QUICK = (256, 4, 2)


def histogram_case(n, k, t, dtype, device) -> harness.Case:
    e = harness.element_size(dtype)

    def make_inputs():
        probs = torch.softmax(torch.randn(n, k, dtype=dtype, device=device), dim=1).requires_grad_()
        groups = torch.randint(0, t, (n,), device=device)
        return probs, groups

    return harness.Case(
        op="joint_histogram", backend_op="histogram", dtype=dtype, n=n, k=k, t=t, d=None,
        make_inputs=make_inputs,
        fused=lambda backend, p, g: fk.joint_histogram(p, g, t, backend=backend, check_inputs=False),
        reference=lambda p, g: reference.joint_histogram(p, g, t),
        bytes_per_pass={"fwd": n * k * e + n * 8, "fwd+bwd": 2 * n * k * e + 2 * n * 8})


def cases(args) -> list[harness.Case]:
    device = torch.device(args.device)
    return [histogram_case(n, k, t, args.dtype, device)
            for n, k, t in harness.shape_grid(args, GPU_GRID, CPU_GRID, QUICK)
            if harness.fits(n * k, args.dtype, 3, device)]


def main(argv=None) -> list[dict]:
    args = harness.parse_args(harness.parser(__doc__.splitlines()[0]), argv)
    return harness.run_cases(FAMILY, cases(args), args)


if __name__ == "__main__":
    main()
