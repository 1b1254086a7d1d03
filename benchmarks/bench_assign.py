"""Benchmark of the soft assignments: Student-t (docs/math.md §1.1) and cosine softmax (docs/math.md §1.2).

    python benchmarks/bench_assign.py [--quick] [--compile] [--n N]

Minimal traffic: fwd reads z (N x d) and the centers and writes q (N x K); the backward reads
dL/dq and q (N x K each) and z again, and writes dL/dz (N x d) and dL/dcenters. The backward
is seeded with ones (its cost does not depend on the seed's values).
"""
from __future__ import annotations

import torch

import harness
import fairkernels as fk
from fairkernels import reference

FAMILY = "assign"
GPU_GRID = [(n, k, None) for n in (1 << 20, 1 << 24) for k in (10, 100, 1000)]
CPU_GRID = [(10**6, 10, None), (10**6, 100, None)]
QUICK = (256, 4, None)
EMBEDDING_DIM = {"cpu": 32, "cuda": 128, "quick": 8}


def assign_case(op, n, k, d, dtype, device) -> harness.Case:
    e = harness.element_size(dtype)
    public, ref_fn, backend_op = {
        "student_t_assign": (fk.student_t_assign, reference.student_t_assign, "student_t"),
        "cosine_assign": (fk.cosine_assign, reference.cosine_assign, "cosine"),
    }[op]

    def make_inputs():
        x = torch.randn(n, d, dtype=dtype, device=device).requires_grad_()
        centers = torch.randn(k, d, dtype=dtype, device=device).requires_grad_()
        return x, centers

    fwd_bytes = n * d * e + k * d * e + n * k * e
    return harness.Case(
        op=op, backend_op=backend_op, dtype=dtype, n=n, k=k, t=None, d=d, make_inputs=make_inputs,
        fused=lambda backend, x, c: public(x, c, backend=backend, check_inputs=False),
        reference=ref_fn,
        bytes_per_pass={"fwd": fwd_bytes, "fwd+bwd": fwd_bytes + 2 * n * k * e + 2 * n * d * e + 2 * k * d * e})


def cases(args) -> list[harness.Case]:
    device = torch.device(args.device)
    d = EMBEDDING_DIM["quick" if args.quick else device.type]
    return [assign_case(op, n, k, d, args.dtype, device)
            for n, k, _ in harness.shape_grid(args, GPU_GRID, CPU_GRID, QUICK)
            if harness.fits(n * max(k, d), args.dtype, 4, device)
            for op in ("student_t_assign", "cosine_assign")]


def main(argv=None) -> list[dict]:
    args = harness.parse_args(harness.parser(__doc__.splitlines()[0]), argv)
    return harness.run_cases(FAMILY, cases(args), args)


if __name__ == "__main__":
    main()
