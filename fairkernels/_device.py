"""One check for a requested device, so that device="cuda" on a machine without CUDA fails at
once with one sentence (instead of an AssertionError or AttributeError from deep inside torch)."""
from __future__ import annotations

import torch


def cuda_unavailable_reason() -> str | None:
    """None when CUDA tensors can be created here, else why not (in words a user can act on)."""
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return f"this torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (check the driver and CUDA_VISIBLE_DEVICES)"
    return None


def check_device(device, name: str = "device") -> torch.device:
    """The torch.device for `device`; ValueError naming `name` when it is not cpu/cuda[:i] or
    asks for a CUDA device this machine does not have."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{name} must be 'cpu', 'cuda' or 'cuda:<index>', got {device!r}") from err
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be 'cpu', 'cuda' or 'cuda:<index>', got {device!r}")
    if resolved.type == "cuda":
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise ValueError(f"{name}={str(device)!r} but CUDA is not available: {reason}; use {name}='cpu'")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"{name}={str(device)!r} but only {count} CUDA device(s) are visible; "
                             f"use 'cuda:0'..'cuda:{count - 1}' or 'cpu'")
    return resolved
