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


# --------------------------------------------------------------------------- the fused C++ Lloyd step
needs_cpu_kernels = pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the C++ kernels")


def _step_inputs(n, k, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    centers = torch.randn(k, d, generator=gen, dtype=torch.float64)
    return x.to(dtype), centers.to(dtype)


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (5, 3, 2), (123, 10, 7), (4097, 37, 32), (700, 1000, 3)])
def test_kmeans_step_matches_reference(dtype, n, k, d):
    """Odd N (ragged 6/12-row blocks and 240-row tiles), K not a multiple of the vector width
    (ragged column groups), d = 1 .. 32: labels are nearest centers, min_dist matches the
    reference, and the sums / counts are exactly those of the returned labels."""
    from fairkernels.ops import torch_kernels
    x, centers = _step_inputs(n, k, d, dtype, seed=n + k)
    labels, min_dist, sums, counts = torch.ops.fairkernels.kmeans_step(x, centers)
    want_labels, want_dist = torch_kernels.kmeans_assign(x, centers)
    assert labels.dtype == torch.int64 and min_dist.dtype == dtype
    assert sums.dtype == torch.float64 and counts.dtype == torch.int64 and sums.shape == (k, d)
    full = torch_kernels._sq_dist(x, centers)
    torch.testing.assert_close(full.gather(1, labels[:, None])[:, 0], want_dist)
    torch.testing.assert_close(min_dist, want_dist)
    assert (labels == want_labels).double().mean() > 0.99
    want_sums = torch.zeros(k, d, dtype=torch.float64).index_add_(0, labels, x.double())
    torch.testing.assert_close(sums, want_sums, rtol=1e-12, atol=1e-12)
    assert torch.equal(counts, torch.bincount(labels, minlength=k))
    assign_labels, assign_dist = torch.ops.fairkernels.kmeans_assign(x, centers)
    assert torch.equal(assign_labels, labels) and torch.equal(assign_dist, min_dist)


@needs_cpu_kernels
def test_kmeans_step_ties_pick_lowest_index():
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(9, 4, generator=gen)
    centers = torch.cat([base, base, base])  # K = 27: k, k + 9, k + 18 tie exactly
    x = base[torch.randint(0, 9, (500,), generator=gen)] * 1.0001
    labels, _, _, counts = torch.ops.fairkernels.kmeans_step(x, centers)
    assert torch.equal(labels, torch.cdist(x.double(), base.double()).argmin(1))
    assert int(counts[9:].sum()) == 0


@needs_cpu_kernels
def test_kmeans_step_and_fit_bitwise_identical_across_thread_counts():
    x, centers = _step_inputs(20_000, 23, 6, torch.float32, seed=5)
    previous = torch.get_num_threads()
    steps, fits = [], []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            steps.append(torch.ops.fairkernels.kmeans_step(x, centers))
            fits.append(kmeans(x, 23, init_centers=centers, n_iter=5, tol=0.0, backend="cpu"))
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(a, b) for a, b in zip(*steps))
    assert torch.equal(fits[0].centers, fits[1].centers) and torch.equal(fits[0].labels, fits[1].labels)
    assert fits[0].inertia == fits[1].inertia


@needs_cpu_kernels
def test_cpu_backend_matches_sklearn_lloyd():
    """Same start, float64: the fused C++ Lloyd loop and scikit-learn's give the same labels,
    centers and iteration count (both stop when no label changes)."""
    x, _ = blobs(n=3000, k=7, d=5, std=3.0, seed=8, dtype=np.float64)
    start = x[:7].copy()
    ours = kmeans(x, 7, init_centers=start, n_iter=300, tol=0.0, backend="cpu")
    theirs = KMeans(7, init=start, n_init=1, max_iter=300, tol=0.0, algorithm="lloyd").fit(x)
    assert np.array_equal(ours.labels.numpy(), theirs.labels_)
    np.testing.assert_allclose(ours.centers.numpy(), theirs.cluster_centers_, rtol=1e-10, atol=1e-10)
    assert ours.n_iter == theirs.n_iter_
    assert ours.inertia == pytest.approx(theirs.inertia_, rel=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stops_when_no_label_changes(backend):
    """tol=0 stops at the first iteration that moves no label, with the labels and inertia of
    the returned centers; a larger cap changes nothing."""
    x, _ = blobs(n=2000 if backend != "triton" else 600, k=5, d=3, std=1.0, seed=9)
    short = kmeans(x, 5, n_iter=200, tol=0.0, backend=backend, seed=2)
    long = kmeans(x, 5, n_iter=400, tol=0.0, backend=backend, seed=2)
    assert short.n_iter < 200 and short.n_iter == long.n_iter
    assert torch.equal(short.centers, long.centers) and torch.equal(short.labels, long.labels)
    fresh = kmeans(x, 5, init_centers=short.centers, n_iter=0, backend=backend)
    assert torch.equal(fresh.labels, short.labels)
    assert short.inertia == pytest.approx(fresh.inertia, rel=1e-6)


@needs_cpu_kernels
@pytest.mark.parametrize("spherical", [False, True])
@pytest.mark.parametrize("deterministic", [False, True])
def test_cpu_backend_equals_reference_backend(spherical, deterministic, monkeypatch):
    """float64, with chunked spherical copies: the fused path follows the reference Lloyd loop."""
    monkeypatch.setattr(kmeans_module, "CHUNK_ELEMENTS", 4 * 311)  # 311-row spherical chunks
    x, _ = blobs(n=2500, k=6, d=4, std=2.0, seed=10, dtype=np.float64)
    kwargs = dict(n_iter=50, tol=0.0, spherical=spherical, deterministic=deterministic, seed=4)
    fused = kmeans(x, 6, backend="cpu", **kwargs)
    ref = kmeans(x, 6, backend="reference", **kwargs)
    assert torch.equal(fused.labels, ref.labels) and fused.n_iter == ref.n_iter
    torch.testing.assert_close(fused.centers, ref.centers, rtol=1e-10, atol=1e-12)


@needs_cpu_kernels
def test_cpu_backend_reseeds_empty_cluster_and_sample_size():
    x, y = blobs(n=3000, k=4, d=3, std=0.3, seed=5)
    start = x[np.unique(y, return_index=True)[1]].copy()
    start[3] = 1e6  # empty after the first assignment
    result = kmeans(x, 4, init_centers=start, backend="cpu")
    assert bool((torch.bincount(result.labels, minlength=4) > 0).all())
    sampled = kmeans(x, 4, sample_size=500, backend="cpu")
    assert sampled.labels.shape == (3000,) and adjusted_rand_score(y, sampled.labels.numpy()) > 0.99


def test_huge_finite_values_are_accepted():
    """The one-sum finiteness check overflows here (float32 sum of 1e38s) and must fall back to
    the elementwise check instead of calling finite data non-finite."""
    x = torch.full((8, 2), 3e38)
    x[4:] = -3e38
    x[::2, 1] = 3e38
    assert not bool(torch.isfinite(x.sum()))
    assert kmeans(x, 2, n_iter=0, backend="reference").centers.shape == (2, 2)
    x[0, 0] = float("inf")
    with pytest.raises(ValueError, match="x"):
        kmeans(x, 2)


def test_bench_kmeans_writes_rows(tmp_path):
    """benchmarks/bench_kmeans.py at a tiny size: one row per method and thread count, and every
    Lloyd implementation ends at the same inertia from the same start."""
    from benchmarks import bench_kmeans
    out = tmp_path / "kmeans.csv"
    rows = bench_kmeans.main(["--n", "3000", "--dim", "4", "--k", "5", "--reps", "1", "--threads", "1",
                              "--methods", "fairkernels,sklearn", "--out", str(out)])
    methods = {row["method"] for row in rows}
    assert "sklearn-lloyd" in methods and "fairkernels-seed(k-means++)" in methods
    assert any(m.startswith("fairkernels-") and "seed" not in m for m in methods)
    lloyd = [float(row["inertia"]) for row in rows if "seed" not in row["method"]]
    assert max(lloyd) == pytest.approx(min(lloyd), rel=1e-5)
    with open(out) as f:
        header = f.readline().strip().split(",")
    assert header == bench_kmeans.CSV_COLUMNS
    assert all(row["commit"] and row["device"] and int(row["threads"]) == 1 for row in rows)
