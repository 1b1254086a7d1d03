"""docs/math.md §6 across real processes: two gloo ranks on CPU, each with its own (unequal) share of a
batch, must get the single-process loss and gradients of the concatenated batch; distributed
k-means must give the single-process centers. One spawn runs every check (process start-up
dominates the cost); the workers save their results and the assertions run here."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import fairkernels
from fairkernels import distributed
from fairkernels.kmeans import kmeans
from tests.helpers import available_backends

WORLD = 2
ROWS = (37, 27)           # unequal shares: the global N must come from the all-reduce
NUM_GROUPS, NUM_CLUSTERS, DIM = 3, 5, 4
TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}


def make_batch(dtype):
    gen = torch.Generator().manual_seed(1234)
    total = sum(ROWS)
    logits = (3 * torch.randn(total, NUM_CLUSTERS, generator=gen)).to(dtype)
    h = torch.randn(total, DIM, generator=gen).to(dtype)
    centers = torch.randn(NUM_CLUSTERS, DIM, generator=gen).to(dtype)
    groups = torch.randint(NUM_GROUPS, (total,), generator=gen)
    groups[ROWS[0]:] = groups[ROWS[0]:].clamp_max(1)  # group 2 absent on rank 1
    points = torch.cat([torch.randn(total // 2, DIM, generator=gen) - 4,
                        torch.randn(total - total // 2, DIM, generator=gen) + 4]).to(dtype)
    return logits, h, centers, groups, points


def shard(rank):
    start = sum(ROWS[:rank])
    return slice(start, start + ROWS[rank])


def single_process(backend, dtype):
    """Loss and gradients of one process on the whole batch."""
    logits, h, centers, groups, points = make_batch(dtype)
    logits.requires_grad_(True)
    loss = fairkernels.fcmi_loss(logits, groups, NUM_GROUPS, backend=backend)
    loss.backward()
    h.requires_grad_(True)
    centers.requires_grad_(True)
    emb_loss = fairkernels.fcmi_loss_from_embeddings(h, centers, groups, NUM_GROUPS, backend=backend)
    emb_loss.backward()
    return dict(loss=loss.detach(), grad_logits=logits.grad, emb_loss=emb_loss.detach(), grad_h=h.grad,
                grad_centers=centers.grad)


def worker(rank, port, out_dir, backends):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    assert distributed.init_from_env("gloo")
    results = {"rank": distributed.rank(), "world": distributed.world_size()}
    rows = shard(rank)
    for backend in backends:
        for dtype in (torch.float64, torch.float32):
            logits, h, centers, groups, _ = make_batch(dtype)
            local_logits = logits[rows].clone().requires_grad_(True)
            loss = fairkernels.fcmi_loss(local_logits, groups[rows], NUM_GROUPS, backend=backend,
                                         process_group=True)
            loss.backward()
            local_h = h[rows].clone().requires_grad_(True)
            centers.requires_grad_(True)
            emb_loss = fairkernels.fcmi_loss_from_embeddings(local_h, centers, groups[rows], NUM_GROUPS,
                                                             backend=backend, process_group=True)
            emb_loss.backward()
            grad_centers = distributed.all_reduce_(centers.grad.clone(), True)
            results[(backend, dtype)] = dict(loss=loss.detach(), grad_logits=local_logits.grad,
                                             emb_loss=emb_loss.detach(), grad_h=local_h.grad,
                                             grad_centers=grad_centers)
    _, _, _, _, points = make_batch(torch.float64)
    start = points[[0, -1, 1, -2]].clone()
    fitted = kmeans(points[rows], 4, init_centers=start, tol=0.0, backend="reference", process_group=True)
    seeded = kmeans(points[rows], 3, seed=5, n_iter=2, backend="reference", process_group=True)
    results["kmeans"] = dict(centers=fitted.centers, labels=fitted.labels, inertia=fitted.inertia,
                             seeded=seeded.centers)
    # More clusters than rows in all (or than rank 0 can seed): every rank raises, none hangs.
    results["kmeans_errors"] = []
    for too_many in (sum(ROWS) + 1, ROWS[0] + 1):
        try:
            kmeans(points[rows], too_many, backend="reference", process_group=True)
        except ValueError as err:
            results["kmeans_errors"].append(str(err))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    backends = [b for b in ("reference", "cpu") if b in available_backends("fcmi", "cpu", torch.float64)]
    out_dir = str(tmp_path_factory.mktemp("dist"))
    mp.spawn(worker, args=(free_port(), out_dir, backends), nprocs=WORLD, join=True)
    return backends, [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_fcmi_matches_single_process(rank_results, backend, dtype):
    backends, ranks = rank_results
    if backend not in backends:
        pytest.skip(f"backend {backend} unavailable here")
    expected = single_process(backend, dtype)
    tol = TOLERANCE[dtype]
    for rank, result in enumerate(ranks):
        got = result[(backend, dtype)]
        torch.testing.assert_close(got["loss"], expected["loss"], **tol)
        torch.testing.assert_close(got["grad_logits"], expected["grad_logits"][shard(rank)], **tol)
        torch.testing.assert_close(got["emb_loss"], expected["emb_loss"], **tol)
        torch.testing.assert_close(got["grad_h"], expected["grad_h"][shard(rank)], **tol)
        torch.testing.assert_close(got["grad_centers"], expected["grad_centers"], **tol)


def test_kmeans_matches_single_process(rank_results):
    _, ranks = rank_results
    _, _, _, _, points = make_batch(torch.float64)
    expected = kmeans(points, 4, init_centers=points[[0, -1, 1, -2]], tol=0.0, backend="reference")
    for rank, result in enumerate(ranks):
        got = result["kmeans"]
        torch.testing.assert_close(got["centers"], expected.centers, rtol=1e-12, atol=1e-12)
        assert torch.equal(got["labels"], expected.labels[shard(rank)])
        assert got["inertia"] == pytest.approx(expected.inertia, rel=1e-12)
    # k-means++ seeded on rank 0 and broadcast: every rank ends with the same centers.
    assert torch.equal(ranks[0]["kmeans"]["seeded"], ranks[1]["kmeans"]["seeded"])


def test_kmeans_bad_n_clusters_raises_on_every_rank(rank_results):
    _, ranks = rank_results
    for result in ranks:
        assert len(result["kmeans_errors"]) == 2
        assert all("n_clusters" in message for message in result["kmeans_errors"])


def test_ranks_and_world(rank_results):
    _, ranks = rank_results
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == WORLD for r in ranks)


def test_helpers_without_process_group(monkeypatch):
    assert not distributed.is_distributed()
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_rank_zero()
    t = torch.ones(3)
    assert distributed.all_reduce_(t, None) is t and torch.equal(t, torch.ones(3))
    assert distributed.broadcast_(t, None) is t
    assert distributed.all_gather(t, None) == [t]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env() is False
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        distributed.init_from_env()
