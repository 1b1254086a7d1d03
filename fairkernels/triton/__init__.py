"""Triton kernels, one module per op family, exposing the kernel interface of
fairkernels/ops/torch_kernels.py (same names, signatures and output dtypes)."""
from __future__ import annotations

# Ops with a Triton implementation; fairkernels._backend consults this before choosing Triton.
SUPPORTED: frozenset = frozenset()


def supports(op: str) -> bool:
    return op in SUPPORTED
