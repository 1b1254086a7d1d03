"""Small torch.distributed helpers shared by k-means, the data stream and the trainers.

Every function works without an initialised process group (one process: rank 0 of 1), so the
callers need no `if distributed:` branches. `process_group` arguments follow the ops'
convention (docs/math.md §6): None = no communication, True = the default group, else a group object.
"""
from __future__ import annotations

import os

import torch


def _dist():
    import torch.distributed as dist
    return dist


def is_distributed() -> bool:
    """True when torch.distributed is available and a default process group is initialised."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def _group(process_group):
    return None if process_group is True else process_group


def rank(process_group=None) -> int:
    """This process's rank in `process_group` (the default group for None/True); 0 when not distributed."""
    return _dist().get_rank(_group(process_group)) if is_distributed() else 0


def world_size(process_group=None) -> int:
    """Number of processes in `process_group` (the default group for None/True); 1 when not distributed."""
    return _dist().get_world_size(_group(process_group)) if is_distributed() else 1


def is_rank_zero(process_group=None) -> bool:
    return rank(process_group) == 0


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the default process group from torchrun's environment variables.

    Reads RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (and LOCAL_RANK to pick the GPU under
    nccl). backend=None picks nccl when CUDA is available, else gloo. Returns True when a group
    is initialised afterwards (already initialised counts), False when the environment does not
    describe a multi-process run (WORLD_SIZE unset or 1), in which case nothing is done.
    """
    if is_distributed():
        return True
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but the environment lacks {', '.join(missing)} "
                         "(launch with torchrun)")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl", "mpi"):
        raise ValueError(f"backend must be 'gloo', 'nccl' or 'mpi', got {backend!r}")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    _dist().init_process_group(backend=backend, init_method="env://",
                               rank=int(os.environ["RANK"]), world_size=world)
    return True


def all_reduce_(tensor: torch.Tensor, process_group) -> torch.Tensor:
    """Sum `tensor` in place across `process_group`; a no-op for process_group=None."""
    if process_group is not None:
        _dist().all_reduce(tensor, group=_group(process_group))
    return tensor


def broadcast_(tensor: torch.Tensor, process_group, src: int = 0) -> torch.Tensor:
    """Overwrite `tensor` in place with the copy held by the group's rank `src` (a rank within
    the group, not a global rank); a no-op for process_group=None."""
    if process_group is not None:
        dist = _dist()
        group = _group(process_group)
        global_src = src if group is None else dist.get_global_rank(group, src)
        dist.broadcast(tensor, src=global_src, group=group)
    return tensor


def all_gather(tensor: torch.Tensor, process_group) -> list[torch.Tensor]:
    """Copies of `tensor` from every rank of the group, in rank order (same shape everywhere);
    [tensor] for process_group=None."""
    if process_group is None:
        return [tensor]
    dist = _dist()
    group = _group(process_group)
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, tensor.contiguous(), group=group)
    return out
