"""The DFC clustering phase's per-row DEC target, read (and, lagged, written) a segment of
batches at a time instead of a batch at a time.

Every clustering step reads its batch's rows of the [N, K] target table P, and with
target_refresh "lagged" writes the P its Q gives back into them. Done per batch those are two
scattered accesses of 256 rows in a table far larger than the caches, each its own op call: on a
narrow encoder (DFC width 0.25, 10^5 rows, 2-core CPU) they took 60-90 us of a 2.5-3 ms step. An
epoch visits every row once, in an order known at its start (BatchStream.epoch_batches), so a
TargetWindow gathers the rows of the next batches (up to segment_rows rows) in one call into a
buffer in visiting order; each step reads and writes its contiguous slice, and the segment is
scattered back in one call when the next one is loaded or the epoch ends.

The values are those of the per-batch reads and writes: no row is visited twice in an epoch, so
nothing reads a row between its write and the write-back. A table that is replaced (the
interval target's refresh) is re-read from the current batch on; a batch that is not the next
one expected (a caller iterating other batches) gets None, after the rows written so far are
written back, and the caller falls back to its own per-batch access.
"""
from __future__ import annotations

import torch


class TargetWindow:
    """The coming batches' rows of a per-row table. batches: the epoch's batch indices, in the
    order the steps see them (the very tensors each step receives as its index)."""

    # Rows gathered per segment (whole batches, at least one): 64 batches of 256, a 640 KB buffer
    # at K = 10; one gather and one scatter of that size overlap their cache misses.
    segment_rows = 16384

    def __init__(self, batches, segment_rows: int | None = None):
        self.batches = list(batches)
        if segment_rows is not None:
            self.segment_rows = int(segment_rows)
        self.position = 0          # batches read so far
        self.table = None          # the table the loaded segment came from
        self.index = None          # the segment's rows (on the table's device), in visiting order
        self.values = None         # table[index]
        self.segment_start = 0     # batch position where the loaded segment starts
        self.segment_end = 0       # batch position where the loaded segment ends
        self.offset = 0            # rows of the segment read so far
        self.written = 0           # rows of the segment written so far (a prefix: batches in order)
        self.views = None          # values split into the segment's batches (one split, not a slice a step)
        self.current = None        # (start, end, view) of the last read batch in the segment
        self.pending = None        # (end, view, values) of the last write, copied in at the next read
        self.deferred = []         # write_later's items for the batches after the written prefix
        self.deferred_end = 0      # rows of the segment covered by written + deferred
        self.produce = None        # write_later's producer: items -> their rows, one [rows, K] tensor

    def read(self, table: torch.Tensor, index: torch.Tensor):
        """table[index] as a view of the window when index is the next batch, else None."""
        self._apply_pending()
        if self.position >= len(self.batches) or index is not self.batches[self.position]:
            self.close()
            return None
        if self.position >= self.segment_end or table is not self.table:
            self.flush()
            self._load(table)
        start, end = self.offset, self.offset + index.shape[0]
        view = self.views[self.position - self.segment_start]
        self.current = (start, end, view)
        self.position += 1
        self.offset = end
        return view

    def write(self, values: torch.Tensor) -> None:
        """Set the rows of the last read batch (to values, its [B, K] new target). The copy into
        the window is made at the next read or flush: the rows read may still be needed by the
        step's backward (the reference loss saves its target), which runs after this call."""
        start, end, view = self.current
        if start != self.written or self.pending is not None or self.deferred:
            raise RuntimeError("TargetWindow.write: each read batch is written once, in order")
        self.pending = (end, view, values)

    def write_later(self, item, produce) -> None:
        """Set the rows of the last read batch to what produce makes of item, at the next flush
        (when a segment is loaded or the window closes), together with the items of the
        segment's other batches written this way: produce(items) -> their rows in visiting
        order, one [rows, K] tensor. For rows that one call can make for many batches faster
        than one call a batch (DFC's lagged target: a step's call ran 2-5x slower between the
        model's ops than back to back)."""
        start, end, _ = self.current
        if start != (self.deferred_end if self.deferred else self.written) or self.pending is not None:
            raise RuntimeError("TargetWindow.write_later: each read batch is written once, in order")
        self.deferred.append(item)
        self.deferred_end, self.produce = end, produce

    def _apply_pending(self) -> None:
        if self.pending is not None:
            end, view, values = self.pending
            view.copy_(values)
            self.written, self.pending = end, None

    def flush(self) -> None:
        """Write the rows written since the segment was loaded back into its table."""
        self._apply_pending()
        if self.deferred:
            items, self.deferred = self.deferred, []
            self.values[self.written:self.deferred_end].copy_(self.produce(items))
            self.written = self.deferred_end
        if self.table is not None and self.written > 0:
            self.table.index_copy_(0, self.index[:self.written], self.values[:self.written])
        self.written = 0

    def close(self) -> None:
        """flush() and stop: every later read returns None."""
        self.flush()
        self.position = len(self.batches)
        self.table = self.index = self.values = self.views = None

    def _load(self, table: torch.Tensor) -> None:
        end, rows = self.position, 0
        while end < len(self.batches) and (end == self.position or rows + self.batches[end].shape[0] <= self.segment_rows):
            rows += self.batches[end].shape[0]
            end += 1
        segment = self.batches[self.position:end]
        self.index = torch.cat(segment).to(table.device)
        self.values = table.index_select(0, self.index)
        self.views = self.values.split([batch.shape[0] for batch in segment])
        self.table, self.segment_start, self.segment_end, self.offset, self.written = table, self.position, end, 0, 0
