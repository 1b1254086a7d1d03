"""Benchmark of the fused FCMI loss (docs/math.md §3) and its embedding form (docs/math.md §1.2 + 3).

    python benchmarks/bench_fcmi.py            # CPU: N = 10^6, (K, T) in {(10, 2), (100, 30)}
    python benchmarks/bench_fcmi.py --compile  # ... plus torch.compile(reference)
    python benchmarks/bench_fcmi.py --quick    # one tiny config (smoke test)
    python benchmarks/bench_fcmi.py --threads 2 --best-of 3   # a shared 2-core machine

The fused ops are called with their default arguments (check_inputs=True): what a user pays.

Minimal traffic (what a perfect kernel must move): fcmi_loss fwd reads the logits and the
groups once; fwd+bwd reads both twice and writes the gradient. The embedding form reads h
(N x d) instead of the logits: the N x K logits never exist.
"""
from __future__ import annotations

import torch

import harness
import fairkernels as fk
from fairkernels import reference

FAMILY = "fcmi"
GPU_GRID = [(n, k, t) for n in (1 << 20, 1 << 24) for k in (10, 100, 1000) for t in (2, 30)]
CPU_GRID = [(10**6, 10, 2), (10**6, 100, 30)]
QUICK = (256, 4, 2)
EMBEDDING_DIM = {"cpu": 32, "cuda": 128, "quick": 8}


def logits_case(n, k, t, dtype, device) -> harness.Case:
    e = harness.element_size(dtype)

    def make_inputs():
        logits = torch.randn(n, k, dtype=dtype, device=device).mul_(3.0).requires_grad_()
        groups = torch.randint(0, t, (n,), device=device)
        return logits, groups

    return harness.Case(
        op="fcmi_loss", backend_op="fcmi", dtype=dtype, n=n, k=k, t=t, d=None, make_inputs=make_inputs,
        fused=lambda backend, x, g: fk.fcmi_loss(x, g, t, backend=backend),
        reference=lambda x, g: reference.fcmi_loss(x, g, t),
        bytes_per_pass={"fwd": n * k * e + n * 8, "fwd+bwd": 3 * n * k * e + 2 * n * 8})


def embeddings_case(n, k, t, d, dtype, device) -> harness.Case:
    e = harness.element_size(dtype)

    def make_inputs():
        h = torch.randn(n, d, dtype=dtype, device=device).requires_grad_()
        centers = torch.randn(k, d, dtype=dtype, device=device)   # fixed k-means centroids (trainer)
        groups = torch.randint(0, t, (n,), device=device)
        return h, centers, groups

    return harness.Case(
        op="fcmi_loss_from_embeddings", backend_op="fcmi_embeddings", dtype=dtype, n=n, k=k, t=t, d=d,
        make_inputs=make_inputs,
        fused=lambda backend, h, c, g: fk.fcmi_loss_from_embeddings(h, c, g, t, backend=backend),
        reference=lambda h, c, g: reference.fcmi_loss_from_embeddings(h, c, g, t),
        bytes_per_pass={"fwd": n * d * e + k * d * e + n * 8,
                        "fwd+bwd": 3 * n * d * e + 2 * k * d * e + 2 * n * 8})


def cases(args) -> list[harness.Case]:
    device = torch.device(args.device)
    grid = harness.shape_grid(args, GPU_GRID, CPU_GRID, QUICK)
    d = EMBEDDING_DIM["quick" if args.quick else device.type]
    out = []
    for n, k, t in grid:
        # logits, their gradient and the reference's N x K temporaries
        if harness.fits(n * k, args.dtype, 3, device):
            out.append(logits_case(n, k, t, args.dtype, device))
        if harness.fits(n * max(d, k), args.dtype, 3, device):
            out.append(embeddings_case(n, k, t, d, args.dtype, device))
    return out


def main(argv=None) -> list[dict]:
    args = harness.parse_args(harness.parser(__doc__.splitlines()[0]), argv)
    return harness.run_cases(FAMILY, cases(args), args)


if __name__ == "__main__":
    main()
