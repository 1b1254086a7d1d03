"""Cluster matching across groups (fairkernels.matching) and the FCMI trainer's matched centers
(fairkernels.train.matched_centers): pairings recovered under transformations that keep the
clusters' relative geometry, balanced offsets, and the trainer end to end."""
import numpy as np
import pytest
import torch

from fairkernels import data, metrics
from fairkernels.matching import geometry_mismatch, match_clusters
from fairkernels.train import make_trainer
from fairkernels.train import matched_centers as matched


def _random_centers(rng, K, D):
    return rng.normal(size=(K, D)) * 3.0


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("K", [3, 7, 12])
def test_geometry_pairs_reflected_rotated_shifted_copies(seed, K):
    rng = np.random.default_rng(seed)
    C = _random_centers(rng, K, 16)
    Q, _ = np.linalg.qr(rng.normal(size=(16, 16)))        # a random rotation / reflection
    perm = rng.permutation(K)
    transformed = (5.0 - C) @ Q + rng.normal(size=16) * 10      # reversal, rotation, shift
    shuffled = np.empty_like(transformed)
    shuffled[perm] = transformed                          # row perm[k] of the copy is center k
    shuffled += rng.normal(size=shuffled.shape) * 0.01    # the per-group k-means do not agree exactly
    found = match_clusters(C, shuffled, seed=seed)
    np.testing.assert_array_equal(found, perm)
    assert geometry_mismatch(C, shuffled, found) < 0.01
    assert found.dtype == np.int64


def test_nearest_pairing_settles_what_geometry_cannot():
    # K = 2: one distance, so both pairings keep the geometry; the centred similarity decides.
    reference = np.array([[0.0, 0.0], [4.0, 1.0]])
    np.testing.assert_array_equal(match_clusters(reference, reference[::-1] + 100.0), [1, 0])
    np.testing.assert_array_equal(match_clusters(reference, reference + 0.1), [0, 1])
    # An equilateral triangle is symmetric: every pairing fits, the shifted copy is paired as is.
    triangle = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, 3 ** 0.5 / 2]])
    np.testing.assert_array_equal(match_clusters(triangle, triangle + 7.0), [0, 1, 2])
    np.testing.assert_array_equal(match_clusters(triangle[:1], triangle[:1] + 1.0), [0])


def test_reversal_beats_nearest_center():
    # Intensity reversal x -> 1 - x maps each center to 1 - c: the nearest reversed center is
    # usually another cluster's, the geometry still pairs each with its own reversal.
    rng = np.random.default_rng(3)
    C = rng.random((10, 64)) ** 3
    perm = rng.permutation(10)
    reversed_centers = np.empty_like(C)
    reversed_centers[perm] = 1.0 - C
    np.testing.assert_array_equal(match_clusters(C, reversed_centers), perm)
    np.testing.assert_array_equal(match_clusters(C, reversed_centers, tolerance=10.0),
                                  match_clusters(C, reversed_centers, tolerance=10.0))   # deterministic


def test_matching_rejects_bad_input():
    good = np.zeros((3, 2))
    with pytest.raises(ValueError, match="same shape"):
        match_clusters(good, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="reference must be a .K, D. matrix"):
        match_clusters(np.zeros(3), good)
    with pytest.raises(ValueError, match="centers must be finite"):
        match_clusters(good, np.full((3, 2), np.nan))
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        match_clusters(good, good, tolerance=-1)


def test_group_offsets_equalise_every_groups_cluster_shares():
    torch.manual_seed(0)
    groups = torch.cat([torch.zeros(300, dtype=torch.int64), torch.ones(200, dtype=torch.int64)])
    logits = torch.randn(500, 4, dtype=torch.float64) * 2
    logits[groups == 1, 0] += 2.0                         # group 1 leans to cluster 0
    offsets = matched.group_offsets(logits, groups, 3)    # group 2 has no rows
    assert offsets.shape == (3, 4) and torch.all(offsets[2] == 0)
    p = torch.softmax(logits, 1).mean(0)
    for t in (0, 1):
        q = torch.softmax(logits[groups == t] + offsets[t], 1).mean(0)
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed, B, K, T, scale", [(0, 256, 10, 2, 3.0), (1, 900, 7, 3, 10.0), (2, 40, 4, 4, 30.0)])
def test_group_offsets_kernel_matches_tensor_ops(seed, B, K, T, scale):
    """The C++ balancing (one process on CPU) against the tensor-op loop that DDP and GPUs run:
    same Newton and Sinkhorn steps and stopping rule, so the same offsets to float64 rounding, also with
    sharp logits (scale 30, where the factorised softmax underflows) and an absent group."""
    from fairkernels import _backend
    from fairkernels.ops import torch_kernels
    if _backend.choose("auto", torch.device("cpu"), torch.float64, "group_offsets") != "cpu":
        pytest.skip("the compiled extension is not available")
    generator = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(B, K, generator=generator, dtype=torch.float64)
    groups = torch.randint(0, T - 1, (B,), generator=generator)
    got = matched.group_offsets(logits, groups, T)
    want = torch_kernels.group_offsets(logits, groups, T)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert torch.all(got[T - 1] == 0)
    with pytest.raises(ValueError, match="groups"):
        matched.group_offsets(logits, groups + T, T)


def _largest_share_gap(logits, groups, offsets, T):
    """max over present groups and clusters of |log q_t - log p| (the balancing's residual)."""
    p = torch.softmax(logits, 1).mean(0)
    return max(float((torch.softmax(logits[groups == t] + offsets[t], 1).mean(0).log() - p.log()).abs().max())
               for t in range(T) if bool((groups == t).any()))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("seed", range(3))
def test_group_offsets_converge_in_few_passes_where_sinkhorn_stalls(backend, seed):
    """Peaked logits whose groups lean to different clusters: the Sinkhorn step alone was still
    1e-4..1e-2 away after 200 iterations on such batches; the Newton steps reach the 1e-6
    tolerance within 20 passes over the rows (4 on milder logits), from zeros, and within 8 from a
    nearby start."""
    from fairkernels import _backend
    from fairkernels.ops import torch_kernels
    if backend == "cpu" and _backend.choose("auto", torch.device("cpu"), torch.float64, "group_offsets") != "cpu":
        pytest.skip("the compiled extension is not available")
    solve = (lambda L, g, T, it, init=None: torch.ops.fairkernels.group_offsets(L, g, T, it, 1e-6)) \
        if backend == "cpu" else (lambda L, g, T, it, init=None: torch_kernels.group_offsets(L, g, T, it, 1e-6, init=init))
    generator = torch.Generator().manual_seed(seed)
    B, K, T = 300, 6, 3
    groups = torch.randint(0, T, (B,), generator=generator)
    logits = 8.0 * (torch.randn(B, K, generator=generator, dtype=torch.float64) +
                    torch.randn(T, K, generator=generator, dtype=torch.float64)[groups])
    offsets = solve(logits, groups, T, 20)
    assert _largest_share_gap(logits, groups, offsets, T) <= 2e-6
    if backend == "torch":
        nearby = offsets + 0.05 * torch.randn(T, K, generator=generator, dtype=torch.float64)
        assert _largest_share_gap(logits, groups, solve(logits, groups, T, 8, init=nearby), T) <= 2e-6


@pytest.mark.parametrize("case", ["empty cluster", "one row", "one cluster", "identical rows", "underflow"])
def test_group_offsets_degenerate_batches(case):
    """Batches where the Newton system is singular or the shares underflow: finite offsets that
    balance the groups, the C++ kernel and the tensor ops agreeing (where the shares are smooth
    enough to have one answer to rounding)."""
    from fairkernels import _backend
    from fairkernels.ops import torch_kernels
    generator = torch.Generator().manual_seed(5)
    B, K, T = 120, 5, 2
    logits = 2.0 * torch.randn(B, K, generator=generator, dtype=torch.float64)
    groups = torch.randint(0, T, (B,), generator=generator)
    if case == "empty cluster":
        logits[:, 3] = -60.0                  # no row leans to cluster 3: p_3 ~ 1e-26
    elif case == "one row":
        groups = torch.zeros(B, dtype=torch.int64)
        groups[7] = 1
    elif case == "one cluster":
        logits = logits[:, :1]
    elif case == "identical rows":
        logits = logits[:1].expand(B, K).clone()
    elif case == "underflow":
        logits = 400.0 * logits
    want = torch_kernels.group_offsets(logits, groups, T)
    assert torch.isfinite(want).all()
    if case != "underflow":          # exp(-x) of 400-scaled logits underflows the gap's own check
        assert _largest_share_gap(logits, groups, want, T) <= 1e-5
    if _backend.choose("auto", torch.device("cpu"), torch.float64, "group_offsets") == "cpu":
        got = torch.ops.fairkernels.group_offsets(logits, groups, T, 200, 1e-6)
        assert torch.isfinite(got).all()
        if case == "underflow":   # rows are one-hot to rounding: shares jump, the two paths part at rounding
            rows = torch.softmax(logits + got[groups], 1)
            assert torch.isfinite(rows).all() and torch.allclose(rows.sum(1), torch.ones(B, dtype=rows.dtype))
            return
        torch.testing.assert_close(torch.softmax(logits + got[groups], 1), torch.softmax(logits + want[groups], 1),
                                   rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("balance, running", [(False, False), (True, False), (True, True)])
def test_dec_batch_target_kernel_matches_tensor_ops(balance, running):
    """The DFC trainer's per-batch DEC target (C++) against its plain-torch specification, and
    the balanced one gives every group the batch's mean target."""
    from fairkernels import _backend
    from fairkernels.ops import torch_kernels
    if _backend.choose("auto", torch.device("cpu"), torch.float64, "dec_batch_target") != "cpu":
        pytest.skip("the compiled extension is not available")
    generator = torch.Generator().manual_seed(3)
    q = torch.softmax(3.0 * torch.randn(300, 6, generator=generator, dtype=torch.float64), 1)
    groups = torch.randint(0, 2, (300,), generator=generator)
    previous = torch.softmax(torch.randn(6, generator=generator, dtype=torch.float64), 0) if running else None
    got = torch.ops.fairkernels.dec_batch_target(q, groups, previous, None, 0.9, balance, 2, 200, 1e-6)
    want = torch_kernels.dec_batch_target(q, groups, previous, None, 0.9, balance, 2, 200, 1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    if balance:
        shares = [got[0][groups == t].mean(0) for t in (0, 1)]
        torch.testing.assert_close(shares[0], shares[1], rtol=1e-4, atol=1e-5)
    else:
        assert not got[2].any()


def test_dec_batch_target_warm_start_reaches_the_same_balanced_target():
    """Started from the previous batch's offsets (what the DFC trainer passes), the balancing
    reaches the same target to its tolerance as from zeros, the kernel agrees with its
    specification from the same start, and a group absent from the batch keeps its start."""
    from fairkernels import _backend
    from fairkernels.ops import torch_kernels
    if _backend.choose("auto", torch.device("cpu"), torch.float64, "dec_batch_target") != "cpu":
        pytest.skip("the compiled extension is not available")
    generator = torch.Generator().manual_seed(4)
    batches = [torch.softmax(3.0 * torch.randn(256, 6, generator=generator, dtype=torch.float64), 1)
               for _ in range(2)]
    groups = torch.randint(0, 2, (256,), generator=generator)
    ops = torch.ops.fairkernels
    _, _, first = ops.dec_batch_target(batches[0], groups, None, None, 0.9, True, 3, 200, 1e-6)
    cold = ops.dec_batch_target(batches[1], groups, None, None, 0.9, True, 3, 200, 1e-6)
    warm = ops.dec_batch_target(batches[1], groups, None, first, 0.9, True, 3, 200, 1e-6)
    torch.testing.assert_close(warm[0], cold[0], rtol=1e-5, atol=1e-6)
    want = torch_kernels.dec_batch_target(batches[1], groups, None, first, 0.9, True, 3, 200, 1e-6)
    for a, b in zip(warm, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert torch.equal(warm[2][2], first[2])          # group 2 has no rows here
    with pytest.raises(RuntimeError, match="offsets must be"):
        ops.dec_batch_target(batches[1], groups, None, first[:2], 0.9, True, 3, 200, 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("balance, start", [(False, False), (True, False), (True, True), (False, True)])
def test_dec_batch_targets_is_dec_batch_target_on_each_batch_in_turn(dtype, balance, start):
    """The list op (a TargetWindow segment's lagged targets in one call) gives bitwise the values
    of one dec_batch_target call a batch, each given the previous call's frequency (rounded to
    its dtype) and, with balance, offsets, as the DFC trainer's per-step path passes them."""
    from fairkernels import _backend
    if _backend.choose("auto", torch.device("cpu"), torch.float64, "dec_batch_target") != "cpu":
        pytest.skip("the compiled extension is not available")
    generator = torch.Generator().manual_seed(5)
    sizes = [64, 64, 17, 64]
    qs = [torch.softmax(3.0 * torch.randn(b, 6, generator=generator, dtype=torch.float64), 1).to(dtype)
          for b in sizes]
    groups = [torch.randint(0, 3, (b,), generator=generator) for b in sizes]
    groups[2].fill_(1)                                  # a batch that misses groups 0 and 2
    ops = torch.ops.fairkernels
    running = torch.softmax(torch.randn(6, generator=generator, dtype=torch.float64), 0).to(dtype) if start else None
    offsets = torch.randn(3, 6, generator=generator, dtype=torch.float64) if start else None
    first_running, first_offsets = running, offsets
    want = []
    for q, g in zip(qs, groups):
        target, running, reached = ops.dec_batch_target(q, g, running, offsets, 0.9, balance, 3, 200, 1e-6)
        offsets = reached if balance else offsets
        want.append(target)
    got, frequency, reached_last = ops.dec_batch_targets(qs, groups, first_running, first_offsets, 0.9, balance, 3,
                                                         200, 1e-6)
    assert got.dtype == dtype and frequency.dtype == dtype and reached_last.dtype == torch.float64
    assert torch.equal(got, torch.cat(want)) and torch.equal(frequency, running) and torch.equal(reached_last, reached)
    with pytest.raises(RuntimeError, match="one tensor per batch"):
        ops.dec_batch_targets(qs, groups[:2], None, None, 0.9, balance, 3, 200, 1e-6)
    with pytest.raises(RuntimeError, match="6 columns"):
        ops.dec_batch_targets([qs[0], qs[1][:, :5]], groups[:2], None, None, 0.9, balance, 3, 200, 1e-6)


def test_refresh_keeps_cluster_identity_per_group():
    rng = np.random.default_rng(0)
    base = torch.as_tensor(rng.normal(size=(3, 5)) * 4)
    rows = torch.cat([base[k] + 0.3 * torch.randn(40, 5, dtype=torch.float64) for k in range(3)])
    h = torch.cat([rows, -rows])                          # group 1: the reflection of group 0
    groups = torch.repeat_interleave(torch.tensor([0, 1]), 120)
    truth = torch.arange(3).repeat_interleave(40).repeat(2)
    h_unit = torch.nn.functional.normalize(h, dim=1)
    start = matched.centers_from_labels(h_unit, groups, truth, 2, 3)
    refreshed = matched.refresh_matched(h_unit, groups, start + 0.05, n_iter=5, chunk_size=64)
    assert torch.equal(matched.assign_matched(h_unit, refreshed, groups, 64), truth)


def test_fcmi_matched_centers_pair_reversed_groups():
    """The appearance set (group 1 sees every feature reversed): shared centers pair the groups'
    clusters arbitrarily, matched centers pair them by class."""
    ds = data.load("appearance", n=1200, seed=0)
    common = dict(n_clusters=10, epochs=14, warmup_epochs=6, width=0.25, progress=False, verbose=False, seed=0)
    fcmi = make_trainer("fcmi", **common).fit(ds.X, ds.groups, ds.y)
    assert fcmi.centers_info["mode"] == "matched" and fcmi.centers_info["joint_input_mnce"] < 0.1
    shared = make_trainer("fcmi", centers="shared", **common).fit(ds.X, ds.groups, ds.y)
    got, base = (metrics.evaluate(ds.y, t.labels_, ds.groups) for t in (fcmi, shared))
    assert got["acc"] > 0.7 and got["acc"] > base["acc"] + 0.2
    assert got["bal"] > 0.6 and got["mnce"] > 0.95
    np.testing.assert_array_equal(fcmi.predict(ds.X, ds.groups), fcmi.labels_)
    assert fcmi.state["group_offsets"].shape == (2, 10)


def test_auto_keeps_shared_centers_when_groups_already_mix():
    ds = data.load("synthetic", n=400, dim=6, n_clusters=3, n_groups=2, bias=0.0, seed=2)
    trainer = make_trainer("fcmi", n_clusters=3, epochs=3, warmup_epochs=1, width=0.05, progress=False,
                           verbose=False).fit(ds.X, ds.groups)
    assert trainer.centers_info["mode"] == "shared" and trainer.centers_info["joint_input_mnce"] > 0.5
    assert trainer.cluster_centers_.shape == (3, 3)
    np.testing.assert_array_equal(trainer.predict(ds.X), trainer.labels_)


def test_matched_needs_enough_rows_per_group():
    X = np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)
    groups = np.r_[np.zeros(55, int), np.ones(5, int)]
    small = dict(n_clusters=8, epochs=2, warmup_epochs=1, width=0.05, progress=False, verbose=False)
    with pytest.raises(ValueError, match="a group has only 5 rows for n_clusters=8; use centers='shared'"):
        make_trainer("fcmi", centers="matched", **small).fit(X, groups)
    assert make_trainer("fcmi", **small).fit(X, groups).centers_info == {"mode": "shared"}
    with pytest.raises(ValueError, match="center_refresh='warm'"):
        make_trainer("fcmi", centers="matched", center_refresh="restart", **small)
    with pytest.raises(ValueError, match="centers must be 'auto', 'matched' or 'shared'"):
        make_trainer("fcmi", centers="per-group", **small)
