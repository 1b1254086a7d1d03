"""fairkernels.train.target_window: reading and writing a per-row table through a TargetWindow
gives the tables and values of the per-batch index_select / index_copy_ it replaces, across
segment boundaries, a replaced table, an unexpected batch and an epoch cut short; and a DFC fit
through it is bitwise the fit without it."""
import numpy as np
import pytest
import torch

from fairkernels.data.stream import BatchStream
from fairkernels.train import make_trainer
from fairkernels.train import dfc as dfc_module
from fairkernels.train.target_window import TargetWindow


def _epoch(num_rows=103, batch_size=10, seed=0):
    stream = BatchStream(np.zeros((num_rows, 1), np.float32), None, batch_size, seed=seed, prefetch=0)
    return stream.epoch_batches()


def _new_rows(index, k, step):
    return (index.double()[:, None] * 10 + torch.arange(k) + 1000 * step).float()


@pytest.mark.parametrize("segment_rows", [1, 25, 40, 10_000])
def test_lagged_reads_and_writes_match_per_batch_ones(segment_rows):
    k = 3
    start = torch.randn(103, k)
    expected, table = start.clone(), start.clone()
    window = TargetWindow(_epoch(), segment_rows=segment_rows)
    for step, index in enumerate(window.batches):
        want = expected.index_select(0, index)
        got = window.read(table, index)
        assert got is not None and torch.equal(got, want)
        expected.index_copy_(0, index, _new_rows(index, k, step))
        window.write(_new_rows(index, k, step))
    window.close()
    assert torch.equal(table, expected)
    assert not torch.equal(table, start)


def test_a_replaced_table_is_read_from_the_current_batch_on():
    batches = _epoch()
    first, second = torch.randn(103, 2), torch.randn(103, 2)
    window = TargetWindow(batches, segment_rows=10_000)
    assert torch.equal(window.read(first, batches[0]), first[batches[0]])
    assert torch.equal(window.read(second, batches[1]), second[batches[1]])   # the interval target's refresh
    assert torch.equal(window.read(second, batches[2]), second[batches[2]])


def _first_batch_written():
    """(batches, table of zeros, a window over them whose first batch was read and set to ones)."""
    batches = _epoch()
    table = torch.zeros(103, 2)
    window = TargetWindow(batches, segment_rows=10_000)
    window.read(table, batches[0])
    window.write(torch.ones(batches[0].shape[0], 2))
    return batches, table, window


def test_an_unexpected_batch_writes_back_and_falls_back():
    batches, table, window = _first_batch_written()
    assert window.read(table, batches[2]) is None                  # not the next batch
    assert torch.equal(table[batches[0]], torch.ones(batches[0].shape[0], 2))
    assert window.read(table, batches[1]) is None                  # closed for the rest of the epoch
    assert int((table != 0).any(1).sum()) == batches[0].shape[0]


def test_an_epoch_cut_short_keeps_only_the_written_rows():
    batches, table, window = _first_batch_written()
    window.read(table, batches[1])                                  # read, never written (a crash)
    window.close()
    assert int((table != 0).any(1).sum()) == batches[0].shape[0]
    with pytest.raises(RuntimeError, match="once, in order"):
        w = TargetWindow(batches)
        w.read(table, batches[0])
        w.write(torch.ones(batches[0].shape[0], 2))
        w.write(torch.ones(batches[0].shape[0], 2))


@pytest.mark.parametrize("mode,centers,backend", [("lagged", "shared", "auto"), ("lagged", "matched", "auto"),
                                                  ("interval", "shared", "auto"), ("interval", "matched", "auto"),
                                                  ("lagged", "shared", "reference")])
def test_dfc_fit_through_the_window_is_the_per_batch_fit(mode, centers, backend, monkeypatch):
    """backend "reference": its loss keeps the target for the backward, which runs after the
    step's write (applied at the next read)."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(700, 6)).astype(np.float32)
    groups = rng.integers(0, 2, size=700)
    config = dict(progress=False, verbose=False, width=0.05, batch_size=32, backend=backend, kmeans_iter=10,
                  n_clusters=3, seed=0, pretrain_epochs=1, finetune_epochs=1, epochs=3, update_interval=7,
                  target_refresh=mode, centers=centers)
    monkeypatch.setattr(TargetWindow, "segment_rows", 64)          # several segments an epoch
    served, read = [0], TargetWindow.read

    def counted(self, table, index):
        rows = read(self, table, index)
        served[0] += rows is not None
        return rows
    monkeypatch.setattr(TargetWindow, "read", counted)
    through = make_trainer("dfc", **config).fit(X, groups)
    assert served[0] == 3 * 22                                      # every step of the 3 clustering epochs

    class Off(TargetWindow):
        def read(self, table, index):
            return None
    monkeypatch.setattr(dfc_module, "TargetWindow", Off)
    per_batch = make_trainer("dfc", **config).fit(X, groups)
    assert torch.equal(through.mu.detach(), per_batch.mu.detach())
    assert torch.equal(through.state["target"], per_batch.state["target"])
    assert np.array_equal(through.labels_, per_batch.labels_)


@pytest.mark.parametrize("segment_rows", [1, 25, 10_000])
def test_deferred_writes_are_made_per_segment_and_match_per_batch_ones(segment_rows):
    """write_later: the rows are made once a segment (at its write-back), from that segment's
    items in visiting order, and the table ends as with per-batch writes; a plain write after a
    deferred one in the same segment is refused."""
    k = 3
    start = torch.randn(103, k)
    expected, table = start.clone(), start.clone()
    window = TargetWindow(_epoch(), segment_rows=segment_rows)
    calls = []

    def produce(items):
        calls.append(len(items))
        return torch.cat([_new_rows(index, k, step) for index, step in items])
    for step, index in enumerate(window.batches):
        assert torch.equal(window.read(table, index), expected.index_select(0, index))
        expected.index_copy_(0, index, _new_rows(index, k, step))
        window.write_later((index, step), produce)
    window.close()
    assert torch.equal(table, expected)
    segments, rows = [], segment_rows          # whole batches, up to segment_rows rows (at least one)
    for index in window.batches:
        if rows + index.shape[0] > segment_rows:
            segments.append(0)
            rows = 0
        segments[-1] += 1
        rows += index.shape[0]
    assert calls == segments and len(calls) > (segment_rows < 103)
    again = TargetWindow(_epoch(), segment_rows=10_000)
    batches = again.batches
    again.read(table, batches[0])
    again.write_later((batches[0], 0), produce)
    again.read(table, batches[1])
    with pytest.raises(RuntimeError, match="once, in order"):
        again.write(torch.zeros(batches[1].shape[0], k))
