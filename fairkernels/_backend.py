"""The one place that decides which backend runs an op (backend="auto" or an explicit name).

Backends: "reference" (pure PyTorch, everywhere), "cpu" (C++/OpenMP kernels of the compiled
extension, CPU tensors, float32/float64), "triton" (CUDA tensors; CPU tensors too when
TRITON_INTERPRET=1, which is how the tests exercise the kernels), "cuda" (CUDA C++ kernels of the
extension when it was built with CUDA).
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
CPU_DTYPES = (torch.float32, torch.float64)
# Ops with C++ kernels in the compiled extension (csrc/ops.cpp); the others are O(T K) algebra
# or one elementwise pass that the reference already does at memory speed on CPU.
EXTENSION_OPS = frozenset({"fcmi", "fcmi_embeddings", "histogram", "student_t", "cosine", "kmeans_assign"})
# Ops with a C++ CPU kernel only: on a GPU they are compositions of the other ops' kernels.
CPU_ONLY_OPS = frozenset({"dfc_embeddings", "group_offsets", "dec_batch_target"})


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _has_extension() -> bool:
    from fairkernels import _extension
    return _extension.load()


@functools.lru_cache(maxsize=None)
def _has_cuda_kernels() -> bool:
    return _has_extension() and hasattr(torch.ops.fairkernels, "fcmi_fwd") and \
        torch._C._dispatch_has_kernel_for_dispatch_key("fairkernels::fcmi_fwd", "CUDA")


def unavailable_reason(backend: str, device: torch.device, dtype: torch.dtype, op: str) -> str | None:
    """None when `backend` can run `op` on this device/dtype, else a sentence saying why not."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend needs CPU tensors, got {device}"
        if dtype not in CPU_DTYPES:
            return f"the cpu backend supports float32/float64, got {dtype}"
        if op not in EXTENSION_OPS | CPU_ONLY_OPS:
            return f"no C++ kernel for {op}"
        if not _has_extension():
            return "the compiled extension fairkernels._C could not be loaded or built"
        return None
    if backend == "triton":
        if not _triton_importable():
            return "triton is not installed"
        if device.type == "cpu" and not triton_interpreted():
            return "triton needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)"
        if device.type not in ("cpu", "cuda"):
            return f"triton does not support device {device}"
        from fairkernels import triton as fk_triton
        if not fk_triton.supports(op):
            return f"no Triton kernel for {op}"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device}"
        if op not in EXTENSION_OPS:
            return f"no CUDA kernel for {op}"
        if not _has_cuda_kernels():
            return "fairkernels._C was built without CUDA kernels"
        return None
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def choose(backend: str, device: torch.device, dtype: torch.dtype, op: str) -> str:
    """Resolve `backend` for an op on tensors of this device and dtype.

    "auto": on CPU the C++ kernels (float32/float64) else the reference; on CUDA the Triton
    kernels (measured faster than eager and torch.compile of the reference; see README), else
    the reference. An explicit backend that cannot run raises RuntimeError saying why.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cpu":
            candidates = ("cpu",)
        elif device.type == "cuda":
            candidates = ("triton", "cuda")
        else:
            candidates = ()
        for candidate in candidates:
            if unavailable_reason(candidate, device, dtype, op) is None:
                return candidate
        return "reference"
    reason = unavailable_reason(backend, device, dtype, op)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} is unavailable for {op}: {reason}")
    return backend
