"""Maps a resolved backend name to the module-like object that holds its kernels."""
from __future__ import annotations

import torch


def kernels(backend: str):
    """Kernel namespace for a resolved backend (see fairkernels/ops/torch_kernels.py for the
    interface every backend implements)."""
    if backend in ("cpu", "cuda"):
        return torch.ops.fairkernels
    if backend == "triton":
        from fairkernels import triton as triton_kernels
        return triton_kernels
    from fairkernels.ops import torch_kernels
    return torch_kernels
