"""Mini-batches from arrays larger than memory: shuffled, sharded, prefetched.

`BatchStream` iterates (index, x_batch, g_batch) over the rows of a numpy array, an np.memmap
(np.load(path, mmap_mode="r")) or a torch tensor without loading it whole: each batch is one
gather of its rows, sorted so that a memmap is read in increasing file offsets. A background
thread gathers the next `prefetch` batches while the caller trains on the current one; when the
target is a CUDA device the rows land in pinned host buffers and are copied with
non_blocking=True. With rank/world_size every rank sees a disjoint share of the same per-epoch
permutation, all shares of equal length (the tail that does not divide evenly is left out of
that epoch, as DistributedSampler(drop_last=True) does).

`encode_in_chunks` maps a function (an encoder) over the rows in large chunks with the same
prefetching, under no_grad and eval mode, into one output tensor.
"""
from __future__ import annotations

import numbers
import queue
import threading

import numpy as np
import torch

_STOP_POLL_SECONDS = 0.1


def _check_int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _check_rows(X, name="X"):
    if isinstance(X, torch.Tensor):
        if X.dim() < 1:
            raise ValueError(f"{name} must have at least one dimension, got a 0-D tensor")
        return X
    if isinstance(X, np.ndarray):
        if X.ndim < 1:
            raise ValueError(f"{name} must have at least one dimension, got a 0-D array")
        return X
    raise TypeError(f"{name} must be a numpy array, np.memmap or torch.Tensor, got {type(X).__name__}")


def _torch_dtype(X):
    return X.dtype if isinstance(X, torch.Tensor) else torch.from_numpy(np.empty(0, dtype=X.dtype)).dtype


class BatchStream:
    """Iterate (index int64 [b], x_batch [b, ...], g_batch int64 [b] or None) over rows of X.

    X: numpy array / np.memmap / torch tensor with rows on its first axis; groups: matching
    vector (numpy or torch) or None. shuffle: a new permutation each epoch from (seed, epoch)
    (call set_epoch(e)); block_rows > 1 permutes contiguous blocks of that many rows instead
    of single rows (fewer, longer reads from disk). Each batch's indices are sorted. device:
    where batches are delivered; pin_memory (default: device is CUDA) stages them in pinned
    host memory for asynchronous copies. prefetch: batches gathered ahead by a background
    thread (0 = gather in the caller's thread). rank/world_size: this process's disjoint,
    equal-length share of each epoch's permutation.
    """

    def __init__(self, X, groups, batch_size, *, shuffle=True, seed=0, device="cpu", pin_memory=None,
                 prefetch=2, drop_last=False, rank=0, world_size=1, block_rows=1):
        self.X = _check_rows(X)
        self.num_rows = int(self.X.shape[0])
        if groups is not None:
            groups = torch.as_tensor(np.asarray(groups) if not isinstance(groups, torch.Tensor) else groups)
            if groups.dim() != 1 or groups.shape[0] != self.num_rows:
                raise ValueError(f"groups must be 1-D with {self.num_rows} entries, got shape {tuple(groups.shape)}")
            if groups.is_floating_point() or groups.is_complex():
                raise TypeError(f"groups must hold integers, got {groups.dtype}")
            groups = groups.to(torch.int64)
        self.groups = groups
        self.batch_size = _check_int(batch_size, "batch_size", 1)
        self.seed = _check_int(seed, "seed", 0)
        self.prefetch = _check_int(prefetch, "prefetch", 0)
        self.block_rows = _check_int(block_rows, "block_rows", 1)
        self.world_size = _check_int(world_size, "world_size", 1)
        self.rank = _check_int(rank, "rank", 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be < world_size={self.world_size}, got {self.rank}")
        if self.num_rows < self.world_size:
            raise ValueError(f"X has {self.num_rows} rows, fewer than world_size={self.world_size}")
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.device = torch.device(device)
        self.pin_memory = (self.device.type == "cuda") if pin_memory is None else bool(pin_memory)
        if self.pin_memory and not torch.cuda.is_available():
            self.pin_memory = False  # pinning needs a CUDA driver; pageable memory works the same
        self.epoch = 0
        self._epoch_batches = None      # (key, batches) of epoch_batches()

    # ------------------------------------------------------------------ indices
    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of epoch `epoch` (same on every rank for the same seed)."""
        self.epoch = _check_int(epoch, "epoch", 0)

    @property
    def rows_per_rank(self) -> int:
        return self.num_rows // self.world_size if self.world_size > 1 else self.num_rows

    def __len__(self) -> int:
        full, rest = divmod(self.rows_per_rank, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def indices(self) -> torch.Tensor:
        """This rank's row order for the current epoch (int64, before batching)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            if self.block_rows > 1:
                num_blocks = -(-self.num_rows // self.block_rows)
                blocks = torch.randperm(num_blocks, generator=generator)
                order = (blocks[:, None] * self.block_rows + torch.arange(self.block_rows)).reshape(-1)
                order = order[order < self.num_rows]
            else:
                order = torch.randperm(self.num_rows, generator=generator)
        else:
            order = torch.arange(self.num_rows)
        share = self.rows_per_rank
        return order[self.rank * share:(self.rank + 1) * share]

    def epoch_batches(self) -> list:
        """The row indices (int64) of this epoch's batches, in the order iteration yields them:
        iterating the stream yields these very tensors as each batch's index, so a caller that
        keeps per-row state can work on the coming batches' rows ahead (the DFC trainer's lagged
        target, train/target_window.py). Computed once per epoch (and seed, shard and batch size)."""
        key = (self.epoch, self.seed, self.shuffle, self.rank, self.world_size, self.batch_size, self.drop_last,
               self.block_rows, self.num_rows)
        cached = self._epoch_batches
        if cached is None or cached[0] != key:
            # Each batch's indices in increasing order (sequential memmap reads), sorted for the
            # whole epoch in one call: a sort per batch cost a narrow model's step tens of us.
            order = self.indices()
            count = len(self)
            full = min(count, order.shape[0] // self.batch_size)
            batches = list(order[:full * self.batch_size].view(full, self.batch_size).sort(dim=1).values.unbind(0))
            if count > full:
                batches.append(torch.sort(order[full * self.batch_size:]).values)
            cached = self._epoch_batches = (key, batches)
        return list(cached[1])

    def _batches(self):
        yield from self.epoch_batches()

    # ------------------------------------------------------------------ gathering
    def _gather(self, index, buffer):
        """Rows `index` of X, written into `buffer` (a pinned host tensor) when given."""
        count = index.shape[0]
        if isinstance(self.X, torch.Tensor):
            rows = index.to(self.X.device)
            if buffer is not None and self.X.device.type == "cpu":
                return torch.index_select(self.X, 0, rows, out=buffer[:count])
            return self.X.index_select(0, rows)
        if buffer is not None:
            np.take(self.X, index.numpy(), axis=0, out=buffer[:count].numpy())
            return buffer[:count]
        return torch.from_numpy(np.take(self.X, index.numpy(), axis=0))

    def _new_buffer(self):
        shape = (self.batch_size,) + tuple(self.X.shape[1:])
        return torch.empty(shape, dtype=_torch_dtype(self.X), pin_memory=True)

    def _produce(self, out_queue, stop, buffers, ready_events):
        """Background thread: gather batches into the ring of pinned buffers (or new tensors)."""
        try:
            for position, index in enumerate(self._batches()):
                slot = position % len(buffers) if buffers else None
                if slot is not None and ready_events[slot] is not None:
                    ready_events[slot].synchronize()  # its previous copy to the device is done
                host = self._gather(index, buffers[slot] if buffers else None)
                groups = self.groups.index_select(0, index) if self.groups is not None else None
                item = (index, host, groups, slot)
                while not stop.is_set():
                    try:
                        out_queue.put(item, timeout=_STOP_POLL_SECONDS)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            out_queue.put(None)
        except BaseException as err:  # surfaced in the consumer's thread
            out_queue.put(err)

    def _deliver(self, index, host, groups, slot, ready_events):
        if host.device != self.device:
            host = host.to(self.device, non_blocking=self.pin_memory)
            if slot is not None and self.device.type == "cuda":
                event = torch.cuda.Event()
                event.record()
                ready_events[slot] = event
        elif slot is not None:
            host = host.clone()  # the ring buffer is refilled while the caller holds the batch
        if groups is not None:
            groups = groups.to(self.device, non_blocking=self.pin_memory)
        return index, host, groups

    # Rows gathered per call when nothing runs ahead (prefetch 0 and no pinned staging: the CPU
    # training loop): whole batches up to this many rows in one gather, then views of it. A
    # 256-row gather took 73-104 us of a narrow encoder's 2-3 ms DFC step in the loop, 49-66 us
    # as a sixteenth of a 4096-row one (alternating epochs, 10^5 rows, 2-core VM): the dispatch
    # is paid once, and one long gather overlaps its cache misses.
    gather_rows = 4096

    @property
    def batches_per_gather(self) -> int:
        return max(1, self.gather_rows // self.batch_size)

    def _gathered_in_blocks(self):
        """The batches of _batches(), gathered batches_per_gather at a time (same rows, same order)."""
        batches = list(self._batches())
        step = self.batches_per_gather
        for start in range(0, len(batches), step):
            block = batches[start:start + step]
            index = torch.cat(block)
            sizes = [batch_index.shape[0] for batch_index in block]
            # The block's batches as views, one split call each (a slice per batch is an op per batch).
            rows = self._gather(index, None).split(sizes)
            groups = self.groups.index_select(0, index).split(sizes) if self.groups is not None else [None] * len(block)
            if rows[0].device == self.device and (groups[0] is None or groups[0].device == self.device):
                # Already where the caller wants them: _deliver would only check that, per batch.
                yield from zip(block, rows, groups)
                continue
            for batch_index, batch_rows, batch_groups in zip(block, rows, groups):
                yield self._deliver(batch_index, batch_rows, batch_groups, None, [None])

    def __iter__(self):
        pinned = self.pin_memory and not (isinstance(self.X, torch.Tensor) and self.X.device.type != "cpu")
        if self.prefetch == 0 and not pinned and self.batches_per_gather > 1:
            yield from self._gathered_in_blocks()
            return
        if self.prefetch == 0:
            buffers = [self._new_buffer()] if pinned else []
            events = [None]
            for index in self._batches():
                if buffers and events[0] is not None:
                    events[0].synchronize()
                host = self._gather(index, buffers[0] if buffers else None)
                groups = self.groups.index_select(0, index) if self.groups is not None else None
                yield self._deliver(index, host, groups, 0 if buffers else None, events)
            return
        # prefetch queued batches + the one being copied + the one the caller holds
        buffers = [self._new_buffer() for _ in range(self.prefetch + 2)] if pinned else []
        ready_events = [None] * len(buffers)
        out_queue: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        worker = threading.Thread(target=self._produce, args=(out_queue, stop, buffers, ready_events),
                                  daemon=True, name="fairkernels-batch-prefetch")
        worker.start()
        try:
            while True:
                item = out_queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                index, host, groups, slot = item
                yield self._deliver(index, host, groups, slot, ready_events)
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    out_queue.get_nowait()
                except queue.Empty:
                    pass
                worker.join(timeout=_STOP_POLL_SECONDS)


def encode_in_chunks(fn, X, chunk_size, device="cpu", *, out=None, prefetch=1):
    """fn applied to consecutive row chunks of X (numpy / memmap / tensor), concatenated.

    Runs under torch.no_grad(), with fn.eval() for the duration when fn is an nn.Module
    (its training flag is restored). Returns a torch tensor on `device` of shape
    (N, *fn_output.shape[1:]) and fn's output dtype, or fills and returns `out` (a
    preallocated torch tensor or numpy array with N rows) instead, e.g. a memmap for
    embeddings that do not fit in memory.
    """
    X = _check_rows(X)
    chunk_size = _check_int(chunk_size, "chunk_size", 1)
    num_rows = int(X.shape[0])
    if out is not None:
        _check_rows(out, "out")
        if out.shape[0] != num_rows:
            raise ValueError(f"out has {out.shape[0]} rows but X has {num_rows}")
    stream = BatchStream(X, None, chunk_size, shuffle=False, device=device, prefetch=prefetch)
    module = fn if isinstance(fn, torch.nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    try:
        with torch.no_grad():
            for index, rows, _ in stream:
                encoded = fn(rows)
                start, stop = int(index[0]), int(index[-1]) + 1
                if out is None:
                    out = torch.empty((num_rows,) + tuple(encoded.shape[1:]), dtype=encoded.dtype,
                                      device=encoded.device)
                if isinstance(out, np.ndarray):
                    out[start:stop] = encoded.detach().cpu().numpy()
                else:
                    out[start:stop] = encoded.to(out.device)
    finally:
        if module is not None:
            module.train(was_training)
    return out
