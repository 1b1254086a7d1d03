"""What a trainer needs to run under torchrun (DistributedDataParallel, one process per device).

`Parallel` holds the process groups and this process's share of the data:
  * the training batches: `GlobalBatchStream` splits every *global* batch of `batch_size` rows
    (the batch one process would draw from the same (seed, epoch) permutation) into
    world_size equal slices, one per rank, so a W-process run sees the same batches as one
    process; the tail batch that does not split evenly loses its last (n mod W) rows.
  * the evaluation / k-means rows: a balanced contiguous shard of the whole set (or of the
    k-means sample) per rank; metrics come from all-reduced contingency counts.
DDP gets its own process group, separate from the default one that the BatchNorm statistics,
the FCMI op (docs/math.md §6), k-means and the metrics all-reduce on, so collectives issued from the
autograd engine (DDP's gradient buckets, the BatchNorm backward) can never interleave
differently on two ranks.
"""
from __future__ import annotations

import os

import torch

from fairkernels import distributed
from fairkernels.data.stream import BatchStream


def wants_distributed(flag) -> bool:
    """config.distributed: True forces it, False forbids it, None follows torchrun's WORLD_SIZE."""
    if flag is None:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 or distributed.is_distributed()
    return bool(flag)


def local_device(device: str) -> torch.device:
    """'cuda' without an index becomes this process's GPU under torchrun (LOCAL_RANK)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


class Parallel:
    """Rank, world size and process groups of this run; world_size 1 means one plain process."""

    def __init__(self, enabled: bool, device: torch.device):
        self.process_group = None      # the ops' convention: None = no communication
        self.ddp_group = None
        if enabled:
            backend = "nccl" if device.type == "cuda" else "gloo"
            if not distributed.init_from_env(backend):
                raise ValueError("distributed=True but no process group is initialised and WORLD_SIZE is "
                                 "unset or 1; launch with torchrun --nproc_per_node=N")
            if distributed.world_size() > 1:
                import torch.distributed as dist
                self.process_group = True
                self.ddp_group = dist.new_group(backend=backend)
        self.rank = distributed.rank(self.process_group)
        self.world_size = distributed.world_size(self.process_group)

    @property
    def active(self) -> bool:
        return self.process_group is not None

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0

    def shard(self, num_rows: int) -> slice:
        """This rank's balanced contiguous share of num_rows (the first num_rows % W ranks get one more)."""
        base, extra = divmod(num_rows, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def gather_rows(self, local: torch.Tensor, num_rows: int) -> torch.Tensor:
        """The rows of every rank's shard(num_rows), concatenated in rank order (all_gather of
        equal-size padded blocks)."""
        if not self.active:
            return local
        longest = -(-num_rows // self.world_size)
        padded = local.new_zeros((longest,) + tuple(local.shape[1:]))
        padded[:local.shape[0]] = local
        blocks = distributed.all_gather(padded, self.process_group)
        sizes = [num_rows // self.world_size + (1 if r < num_rows % self.world_size else 0)
                 for r in range(self.world_size)]
        return torch.cat([block[:size] for block, size in zip(blocks, sizes)])

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        return distributed.all_reduce_(tensor, self.process_group)

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        return distributed.broadcast_(tensor, self.process_group, src=0)

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist
            dist.barrier()

    def average_gradients(self, parameters) -> None:
        """DDP's averaging for parameters it does not cover (ones outside the wrapped module,
        or a phase that never calls the module's forward): one flat all-reduce, / W."""
        grads = [p.grad for p in parameters if p.grad is not None]
        if not self.active or not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.all_reduce_(flat).div_(self.world_size)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def batch_stream(self, X, groups, batch_size: int, *, seed: int, device):
        # On the CPU the next batch is gathered in the training thread: a prefetch thread's
        # gathers are torch ops of their own, whose OpenMP team competes with the training
        # step's for the same cores (measured: the epoch's backward passes ran 3x slower).
        # On a GPU the prefetch thread overlaps the host gather with the device's work.
        prefetch = 2 if torch.device(device).type == "cuda" else 0
        if not self.active:
            return BatchStream(X, groups, batch_size, shuffle=True, seed=seed, device=device, prefetch=prefetch)
        if batch_size % self.world_size:
            raise ValueError(f"batch_size={batch_size} (the global batch) must be divisible by the "
                             f"{self.world_size} processes")
        return GlobalBatchStream(X, groups, batch_size, rank=self.rank, world_size=self.world_size, seed=seed,
                                 device=device, prefetch=prefetch)


class GlobalBatchStream(BatchStream):
    """BatchStream whose batch b on rank r is slice r of the global batch b of one process.

    BatchStream's own rank sharding gives each rank a contiguous block of the permutation, a
    valid but different batching; slicing each global batch keeps a W-process run step for step
    equal to the single-process run with the same seed and global batch size."""

    def __init__(self, X, groups, global_batch_size: int, *, rank: int, world_size: int, seed: int, device,
                 prefetch: int = 2):
        super().__init__(X, groups, global_batch_size // world_size, shuffle=True, seed=seed, device=device,
                         prefetch=prefetch)
        self.global_batch_size = global_batch_size
        self.shard_rank, self.shard_world = rank, world_size

    def _split(self):
        full, tail = divmod(self.num_rows, self.global_batch_size)
        return full, tail // self.shard_world

    def __len__(self) -> int:
        full, tail_share = self._split()
        return full + (1 if tail_share else 0)

    def indices(self) -> torch.Tensor:
        order = super().indices()                      # the whole permutation (world_size 1 here)
        full, tail_share = self._split()
        share = self.batch_size
        head = order[:full * self.global_batch_size].view(full, self.shard_world, share)[:, self.shard_rank]
        tail = order[full * self.global_batch_size:]
        tail = tail[self.shard_rank * tail_share:(self.shard_rank + 1) * tail_share]
        return torch.cat([head.reshape(-1), tail])
