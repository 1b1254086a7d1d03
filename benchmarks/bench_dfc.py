"""Benchmark of the DFC losses (docs/math.md §4): DEC target, KL(P || Q), the whole dfc_loss and
the trainer's loss from the embeddings (dfc_loss_from_embeddings).

    python benchmarks/bench_dfc.py [--quick] [--compile] [--n N]     # --n 256: DFC's training batch

Minimal traffic: dec_target reads q twice (f_k needs every row before any p_ik) and writes P;
kl_div fwd reads P and Q, its backward reads both again and writes dL/dQ; dfc_loss fwd reads q
three times (two for the target, one for the KL and the centroid statistics Q^T Q, Q^T Z), z
once and the groups once; its backward reads q, the target and z and writes dL/dq and dL/dz.
"""
from __future__ import annotations

import torch

import harness
import fairkernels as fk
from fairkernels import reference

FAMILY = "dfc"
GPU_GRID = [(n, k, t) for n in (1 << 20, 1 << 24) for k in (10, 100, 1000) for t in (2, 30)]
CPU_GRID = [(10**6, 10, 2), (10**6, 100, 30)]
QUICK = (256, 4, 2)
EMBEDDING_DIM = 10   # DFC's embedding size


def _soft_assignments(n, k, dtype, device, requires_grad):
    q = torch.softmax(torch.randn(n, k, dtype=dtype, device=device) * 2.0, dim=1)
    return q.requires_grad_(requires_grad)


def dec_target_case(n, k, dtype, device) -> harness.Case:
    e = harness.element_size(dtype)
    return harness.Case(
        op="dec_target", backend_op="dec_target", dtype=dtype, n=n, k=k, t=None, d=None,
        make_inputs=lambda: (_soft_assignments(n, k, dtype, device, False),),
        fused=lambda backend, q: fk.dec_target(q, backend=backend, check_inputs=False),
        reference=reference.dec_target, bytes_per_pass={"fwd": 3 * n * k * e}, passes=("fwd",))


def kl_div_case(n, k, dtype, device) -> harness.Case:
    e = harness.element_size(dtype)

    def make_inputs():
        q = _soft_assignments(n, k, dtype, device, True)
        return reference.dec_target(q), q

    return harness.Case(
        op="kl_div", backend_op="kl_div", dtype=dtype, n=n, k=k, t=None, d=None, make_inputs=make_inputs,
        fused=lambda backend, p, q: fk.kl_div(p, q, backend=backend, check_inputs=False),
        reference=reference.kl_div, bytes_per_pass={"fwd": 2 * n * k * e, "fwd+bwd": 5 * n * k * e})


def dfc_loss_case(n, k, t, dtype, device) -> harness.Case:
    e = harness.element_size(dtype)
    d = EMBEDDING_DIM

    def make_inputs():
        q = _soft_assignments(n, k, dtype, device, True)
        z = torch.randn(n, d, dtype=dtype, device=device).requires_grad_()
        groups = torch.randint(0, t, (n,), device=device)
        return q, z, groups

    fwd_bytes = 3 * n * k * e + n * d * e + n * 8
    return harness.Case(
        op="dfc_loss", backend_op="kl_div", dtype=dtype, n=n, k=k, t=t, d=d, make_inputs=make_inputs,
        fused=lambda backend, q, z, g: fk.dfc_loss(q, z, g, t, backend=backend, check_inputs=False)[0],
        reference=lambda q, z, g: reference.dfc_loss(q, z, g, t)[0],
        bytes_per_pass={"fwd": fwd_bytes, "fwd+bwd": fwd_bytes + 3 * n * k * e + 2 * n * d * e})


def dfc_embeddings_case(n, k, t, dtype, device) -> harness.Case:
    """The DFC trainer's clustering loss from the embeddings (Student-t Q, KL(P||Q) and the
    fairness term in one call), shared centroids; --n 256 is DFC's training batch."""
    e = harness.element_size(dtype)
    d = EMBEDDING_DIM

    def make_inputs():
        z = torch.randn(n, d, dtype=dtype, device=device).requires_grad_()
        centers = torch.randn(k, d, dtype=dtype, device=device).requires_grad_()
        groups = torch.randint(0, t, (n,), device=device)
        target = _soft_assignments(n, k, dtype, device, False)
        return z, centers, groups, target

    def loss(backend, z, centers, groups, target):
        return fk.dfc_loss_from_embeddings(z, centers, groups, t, target=target, backend=backend,
                                           check_inputs=False)[0]

    fwd_bytes = n * (d + 2 * k) * e + n * 8      # z, P and the groups read, Q written
    return harness.Case(
        op="dfc_loss_from_embeddings", backend_op="dfc_embeddings", dtype=dtype, n=n, k=k, t=t, d=d,
        make_inputs=make_inputs, fused=loss,
        reference=lambda *inputs: loss("reference", *inputs),
        bytes_per_pass={"fwd": fwd_bytes, "fwd+bwd": fwd_bytes + n * d * e})


def cases(args) -> list[harness.Case]:
    device = torch.device(args.device)
    out, seen_nk = [], set()
    for n, k, t in harness.shape_grid(args, GPU_GRID, CPU_GRID, QUICK):
        if not harness.fits(n * k, args.dtype, 5, device):
            continue
        if (n, k) not in seen_nk:   # dec_target and kl_div do not depend on T: one row per (N, K)
            seen_nk.add((n, k))
            out += [dec_target_case(n, k, args.dtype, device), kl_div_case(n, k, args.dtype, device)]
        out += [dfc_loss_case(n, k, t, args.dtype, device), dfc_embeddings_case(n, k, t, args.dtype, device)]
    return out


def main(argv=None) -> list[dict]:
    args = harness.parse_args(harness.parser(__doc__.splitlines()[0]), argv)
    return harness.run_cases(FAMILY, cases(args), args)


if __name__ == "__main__":
    main()
