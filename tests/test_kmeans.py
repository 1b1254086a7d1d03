"""fairkernels.kmeans: recovery of planted clusters, quality vs scikit-learn, spherical variant,
empty-cluster re-seeding, chunking invariance, determinism, edge cases and input validation."""
import numpy as np
import pytest
import sys

import torch
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from fairkernels.kmeans import kmeans
from tests.helpers import available_backends

# fk.kmeans is the function (public API); the module itself is needed to patch its chunk size
kmeans_module = sys.modules["fairkernels.kmeans"]

BACKENDS = available_backends("kmeans_assign", "cpu", torch.float32)


def blobs(n=3000, k=8, d=5, std=0.5, seed=0, dtype=np.float32):
    x, y = make_blobs(n_samples=n, centers=k, n_features=d, cluster_std=std, center_box=(-20, 20),
                      random_state=seed)
    return x.astype(dtype), y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_recovers_planted_clusters(backend, init):
    x, y = blobs(n=1200 if backend == "triton" else 3000)
    result = kmeans(torch.from_numpy(x), 8, init=init, backend=backend, seed=3)
    if init == "k-means++":
        assert adjusted_rand_score(y, result.labels.numpy()) > 0.99
    assert result.centers.shape == (8, 5) and result.centers.dtype == torch.float32
    assert result.labels.dtype == torch.int64 and result.labels.shape == (x.shape[0],)
    # The reported inertia is that of the returned labels and centers.
    expected = ((torch.from_numpy(x).double() - result.centers.double()[result.labels]) ** 2).sum()
    assert result.inertia == pytest.approx(float(expected), rel=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_inertia_close_to_sklearn(seed):
    x, _ = blobs(n=4000, k=12, d=6, std=3.0, seed=seed, dtype=np.float64)
    ours = kmeans(x, 12, seed=seed, backend="reference")
    theirs = KMeans(12, n_init=1, random_state=seed, max_iter=100, tol=1e-4).fit(x)
    assert ours.inertia <= theirs.inertia_ * 1.05
    assert ours.centers.dtype == torch.float64


def test_same_init_centers_match_sklearn_lloyd():
    x, _ = blobs(n=2000, k=6, d=4, std=2.5, dtype=np.float64)
    start = x[:6].copy()
    ours = kmeans(x, 6, init_centers=start, n_iter=300, tol=0.0, backend="reference")
    theirs = KMeans(6, init=start, n_init=1, max_iter=300, tol=0.0, algorithm="lloyd").fit(x)
    assert np.array_equal(ours.labels.numpy(), theirs.labels_)
    np.testing.assert_allclose(ours.centers.numpy(), theirs.cluster_centers_, rtol=1e-10, atol=1e-10)


def test_spherical_unit_centers_and_cosine_labels():
    x, y = blobs(n=2000, k=5, d=8, std=0.3, seed=4)
    result = kmeans(torch.from_numpy(x) * 7.0, 5, spherical=True, backend="reference")
    norms = result.centers.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(5), rtol=0, atol=1e-5)
    unit = torch.nn.functional.normalize(torch.from_numpy(x), dim=1)
    assert torch.equal(result.labels, (unit @ result.centers.t()).argmax(1))
    # Unit rows are at most 2 apart (squared distance 4).
    assert 0 <= result.inertia <= 4 * x.shape[0]


@pytest.mark.parametrize("deterministic", [False, True])
def test_empty_cluster_is_reseeded(deterministic):
    x, y = blobs(n=1500, k=4, d=3, std=0.3, seed=5, dtype=np.float64)
    start = x[np.unique(y, return_index=True)[1]].copy()
    start[3] = 1e6  # no point is nearest to it: empty after the first assignment
    result = kmeans(x, 4, init_centers=start, backend="reference", deterministic=deterministic)
    counts = torch.bincount(result.labels, minlength=4)
    assert bool((counts > 0).all())
    assert result.centers.abs().max() < 100


def test_chunked_assignment_equals_unchunked(monkeypatch):
    x, _ = blobs(n=1000, k=7, d=4, std=2.0, dtype=np.float64)
    whole = kmeans(x, 7, backend="reference", seed=1)
    monkeypatch.setattr(kmeans_module, "CHUNK_ELEMENTS", 7 * 13)  # 13-row chunks
    assert kmeans_module._chunk_rows(7) == 13
    chunked = kmeans(x, 7, backend="reference", seed=1)
    assert torch.equal(whole.labels, chunked.labels)
    torch.testing.assert_close(whole.centers, chunked.centers, rtol=1e-12, atol=1e-12)
    assert whole.n_iter == chunked.n_iter


@pytest.mark.parametrize("deterministic", [False, True])
def test_same_seed_same_result(deterministic):
    x, _ = blobs(n=1500, k=6, d=4, std=2.0)
    first = kmeans(x, 6, seed=11, deterministic=deterministic, backend="reference")
    second = kmeans(x, 6, seed=11, deterministic=deterministic, backend="reference")
    assert torch.equal(first.centers, second.centers) and torch.equal(first.labels, second.labels)
    other = kmeans(x, 6, seed=12, n_iter=0, backend="reference")
    assert not torch.equal(kmeans(x, 6, seed=11, n_iter=0, backend="reference").centers, other.centers)


def test_deterministic_sums_match_index_add():
    x, _ = blobs(n=1500, k=6, d=4, std=2.0, dtype=np.float64)
    start = x[:6].copy()
    fast = kmeans(x, 6, init_centers=start, backend="reference")
    exact = kmeans(x, 6, init_centers=start, backend="reference", deterministic=True)
    assert torch.equal(fast.labels, exact.labels)
    torch.testing.assert_close(fast.centers, exact.centers, rtol=1e-12, atol=1e-12)


def test_n_equals_k_and_single_cluster():
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    every = kmeans(x, 6, backend="reference")
    assert sorted(every.labels.tolist()) == list(range(6))
    assert every.inertia == pytest.approx(0.0, abs=1e-20)
    one = kmeans(x, 1, backend="reference")
    torch.testing.assert_close(one.centers[0], x.mean(0))
    assert bool((one.labels == 0).all())


def test_input_that_requires_grad_builds_no_graph():
    x = torch.from_numpy(blobs(n=300, k=3, d=2)[0]).requires_grad_(True)
    result = kmeans(x, 3, backend="reference")
    assert not result.centers.requires_grad and result.centers.grad_fn is None


def test_sample_size_still_labels_every_row():
    x, y = blobs(n=5000, k=5, d=3, std=0.4, seed=6)
    result = kmeans(x, 5, sample_size=600, backend="reference")
    assert result.labels.shape == (5000,)
    assert adjusted_rand_score(y, result.labels.numpy()) > 0.99


def test_memmap_and_half_inputs(tmp_path):
    x, y = blobs(n=800, k=4, d=3, std=0.3, seed=7)
    path = tmp_path / "x.npy"
    np.save(path, x)
    mapped = np.load(path, mmap_mode="r")
    result = kmeans(mapped, 4, backend="reference")
    assert adjusted_rand_score(y, result.labels.numpy()) > 0.99
    half = kmeans(torch.from_numpy(x).half(), 4, backend="reference")
    assert half.centers.dtype == torch.float16
    assert adjusted_rand_score(y, half.labels.numpy()) > 0.99


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_clusters=0), "n_clusters"),
    (dict(n_clusters=11), "n_clusters"),
    (dict(n_clusters=2.5), "n_clusters"),
    (dict(init="kmeans||"), "init"),
    (dict(n_iter=-1), "n_iter"),
    (dict(tol=-1.0), "tol"),
    (dict(tol=float("nan")), "tol"),
    (dict(sample_size=0), "sample_size"),
    (dict(init_centers=np.zeros((3, 2))), "init_centers"),
    (dict(init_centers=np.full((2, 2), np.inf)), "init_centers"),
    (dict(backend="gpu"), "backend"),
])
def test_bad_arguments(kwargs, match):
    x = np.random.default_rng(0).normal(size=(10, 2))
    args = dict(n_clusters=2)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        kmeans(x, args.pop("n_clusters"), **args)


def test_bad_x():
    with pytest.raises(ValueError, match="x"):
        kmeans(torch.tensor([[0.0, float("nan")], [1.0, 1.0]]), 1)
    with pytest.raises(ValueError, match="x"):
        kmeans(torch.zeros(5), 1)
    with pytest.raises(TypeError, match="x"):
        kmeans(torch.zeros(5, 2, dtype=torch.int64), 1)
    with pytest.raises(TypeError, match="x"):
        kmeans([[0.0, 1.0]], 1)
