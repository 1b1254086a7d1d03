"""Shared test utilities: which backends can run here, and the flash-attention style tolerance."""
from __future__ import annotations

import torch

from fairkernels import _backend

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def available_backends(op: str, device: str = "cpu", dtype: torch.dtype = torch.float64):
    """Backends (excluding 'auto') that can run `op` on this device and dtype right now."""
    dev = torch.device(device)
    return [b for b in ("reference", "cpu", "triton", "cuda")
            if _backend.unavailable_reason(b, dev, dtype, op) is None]


def fused_backends(op: str, device: str = "cpu", dtype: torch.dtype = torch.float64):
    return [b for b in available_backends(op, device, dtype) if b != "reference"]


def assert_close_to_reference(out, out_same_dtype_torch, out_fp64, atol: float):
    """err(kernel) <= 2 * err(torch in the same dtype) + atol, both against float64 (STYLE.md)."""
    err_kernel = (out.double() - out_fp64.double()).abs().max().item()
    err_torch = (out_same_dtype_torch.double() - out_fp64.double()).abs().max().item()
    assert err_kernel <= 2 * err_torch + atol, (err_kernel, err_torch, atol)
