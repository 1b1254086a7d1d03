"""fairkernels.data.stream: coverage and content of every batch, epoch shuffling, sharding,
prefetch-thread shutdown and error propagation, and encode_in_chunks."""
import threading
import time

import numpy as np
import pytest
import torch

from fairkernels.data import stream as stream_module
from fairkernels.data.stream import BatchStream, encode_in_chunks

N, D = 103, 4


@pytest.fixture(params=["numpy", "memmap", "torch"])
def source(request, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)).astype(np.float32)
    g = rng.integers(0, 3, size=N)
    if request.param == "memmap":
        np.save(tmp_path / "x.npy", x)
        return np.load(tmp_path / "x.npy", mmap_mode="r"), g, x
    if request.param == "torch":
        return torch.from_numpy(x), torch.from_numpy(g), x
    return x, g, x


def collect(stream):
    return [(i.clone(), xb.clone(), gb.clone() if gb is not None else None) for i, xb, gb in stream]


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("shuffle", [True, False])
def test_one_epoch_visits_every_row_once(source, prefetch, shuffle):
    X, g, x = source
    batches = collect(BatchStream(X, g, 10, shuffle=shuffle, prefetch=prefetch))
    assert len(batches) == 11 and [b[0].numel() for b in batches] == [10] * 10 + [3]
    seen = torch.cat([b[0] for b in batches])
    assert sorted(seen.tolist()) == list(range(N))
    for index, xb, gb in batches:
        assert torch.equal(index, torch.sort(index).values)
        assert xb.dtype == torch.float32 and torch.equal(xb, torch.from_numpy(x[index.numpy()]))
        assert gb.dtype == torch.int64 and torch.equal(gb, torch.as_tensor(np.asarray(g))[index])
    if not shuffle:
        assert torch.equal(seen, torch.arange(N))


@pytest.mark.parametrize("gather_rows", [25, 30, 1000])
def test_batches_gathered_in_blocks_are_the_per_batch_ones(source, gather_rows, monkeypatch):
    X, g, _ = source
    per_batch = BatchStream(X, g, 10, seed=3)
    monkeypatch.setattr(per_batch, "gather_rows", 1)       # one gather per batch
    blocked = BatchStream(X, g, 10, seed=3)
    monkeypatch.setattr(blocked, "gather_rows", gather_rows)
    assert per_batch.batches_per_gather == 1 and blocked.batches_per_gather == gather_rows // 10
    expected, got = collect(per_batch), collect(blocked)
    assert len(expected) == len(got) == 11
    for (i0, x0, g0), (i1, x1, g1) in zip(expected, got):
        assert torch.equal(i0, i1) and torch.equal(x0, x1) and torch.equal(g0, g1)


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("gather_rows", [1, 4096])
def test_iteration_yields_the_epoch_batches_themselves(source, prefetch, gather_rows, monkeypatch):
    """epoch_batches() announces the epoch's batches: iterating yields those very index tensors,
    in that order (the DFC trainer's TargetWindow relies on it), and a new epoch has new ones."""
    X, g, _ = source
    stream = BatchStream(X, g, 10, seed=5, prefetch=prefetch)
    monkeypatch.setattr(stream, "gather_rows", gather_rows)
    stream.set_epoch(3)
    announced = stream.epoch_batches()
    yielded = [index for index, _, _ in stream]
    assert len(yielded) == len(announced) == 11 and all(a is b for a, b in zip(announced, yielded))
    stream.set_epoch(4)
    assert not torch.equal(torch.cat(stream.epoch_batches()), torch.cat(announced))


def test_epochs_and_seeds_change_the_order():
    x = np.arange(N * 2, dtype=np.float32).reshape(N, 2)
    stream = BatchStream(x, None, 16, seed=1)
    first = torch.cat([i for i, _, _ in stream])
    again = torch.cat([i for i, _, _ in stream])
    stream.set_epoch(1)
    second = torch.cat([i for i, _, _ in stream])
    other_seed = torch.cat([i for i, _, _ in BatchStream(x, None, 16, seed=2)])
    assert torch.equal(first, again)
    assert not torch.equal(first, second) and not torch.equal(first, other_seed)
    assert all(gb is None for _, _, gb in stream)


def test_ranks_get_disjoint_equal_shares():
    x = np.zeros((N, 1), dtype=np.float32)
    shares = []
    for rank in range(3):
        stream = BatchStream(x, None, 8, seed=4, rank=rank, world_size=3)
        stream.set_epoch(2)
        assert len(stream) == 5  # 34 rows per rank: 4 full batches and one of 2
        shares.append(set(torch.cat([i for i, _, _ in stream]).tolist()))
    assert [len(s) for s in shares] == [34, 34, 34]
    assert not (shares[0] & shares[1]) and not (shares[0] & shares[2]) and not (shares[1] & shares[2])


def test_drop_last_and_block_shuffle():
    x = np.arange(N, dtype=np.float32)[:, None]
    dropped = BatchStream(x, None, 10, drop_last=True)
    assert len(dropped) == 10 and all(i.numel() == 10 for i, _, _ in dropped)
    blocked = BatchStream(x, None, N, block_rows=8, seed=3)
    order = blocked.indices()
    assert sorted(order.tolist()) == list(range(N))
    starts = order[::8]
    assert bool((starts % 8 == 0).all())  # each block of the permutation is a contiguous run
    assert not torch.equal(order, torch.arange(N))


def test_breaking_early_stops_the_prefetch_thread():
    x = np.zeros((1000, 2), dtype=np.float32)
    for _ in BatchStream(x, None, 10, prefetch=2):
        break
    deadline = time.time() + 5
    while any(t.name == "fairkernels-batch-prefetch" for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "fairkernels-batch-prefetch" for t in threading.enumerate())


def test_gather_error_reaches_the_caller(monkeypatch):
    def failing(self, index, buffer):
        raise OSError("disk went away")

    monkeypatch.setattr(stream_module.BatchStream, "_gather", failing)
    with pytest.raises(OSError, match="disk went away"):
        list(BatchStream(np.zeros((5, 1)), None, 2, prefetch=1))


def test_encode_in_chunks_matches_one_pass(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(N, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.Dropout(0.5))
    encoder.train()
    out = encode_in_chunks(encoder, mapped, 17)
    assert encoder.training  # restored
    encoder.eval()
    expected = encoder(torch.from_numpy(x))
    assert out.shape == (N, 3) and not out.requires_grad
    torch.testing.assert_close(out, expected.detach())
    buffer = np.zeros((N, 3), dtype=np.float32)
    assert encode_in_chunks(lambda rows: rows[:, :3] * 2, x, 40, out=buffer) is buffer
    np.testing.assert_array_equal(buffer, x[:, :3] * 2)


def test_bad_arguments():
    x = np.zeros((6, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(x, None, 0)
    with pytest.raises(ValueError, match="rank"):
        BatchStream(x, None, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="groups"):
        BatchStream(x, np.zeros(5, dtype=np.int64), 2)
    with pytest.raises(TypeError, match="groups"):
        BatchStream(x, np.zeros(6), 2)
    with pytest.raises(TypeError, match="X"):
        BatchStream([[0.0]], None, 1)
    with pytest.raises(ValueError, match="out"):
        encode_in_chunks(lambda r: r, x, 2, out=np.zeros((5, 2)))
