"""FCMI ops (docs/math.md §3) on every available backend vs the float64 reference: values, gradients,
edge cases (empty clusters, absent groups, huge logits), index dtypes, determinism."""
import pytest
import torch

import fairkernels
from fairkernels import reference
from fairkernels.ops import fcmi as fcmi_ops
from tests.helpers import assert_close_to_reference, available_backends, fused_backends

SHAPES = [(1, 1, 1), (5, 3, 2), (123, 10, 7), (4097, 3, 30), (64, 257, 2)]


def _inputs(n, k, t, dtype=torch.float64, scale=2.0, seed=0, index_dtype=torch.int64):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=gen, dtype=torch.float64).mul_(scale).to(dtype)
    groups = torch.randint(0, t, (n,), generator=gen).to(index_dtype)
    return logits, groups


def _value_and_grad(fn, logits):
    x = logits.detach().clone().requires_grad_()
    out = fn(x)
    out.backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("backend", available_backends("fcmi"))
@pytest.mark.parametrize("n,k,t", SHAPES)
def test_fcmi_loss_matches_reference_float64(backend, n, k, t):
    logits, groups = _inputs(n, k, t, seed=n + k)
    val, grad = _value_and_grad(lambda x: fairkernels.fcmi_loss(x, groups, t, 0.3, 0.7, backend=backend), logits)
    ref_val, ref_grad = _value_and_grad(lambda x: reference.fcmi_loss(x, groups, t, 0.3, 0.7), logits)
    torch.testing.assert_close(val, ref_val, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("backend", available_backends("fcmi"))
def test_fcmi_terms_each_term_and_gradient(backend):
    logits, groups = _inputs(123, 10, 7)
    for index in (0, 1):
        val, grad = _value_and_grad(lambda x: fairkernels.fcmi_terms(x, groups, 7, backend=backend)[index], logits)
        ref_val, ref_grad = _value_and_grad(lambda x: reference.fcmi_terms(x, groups, 7)[index], logits)
        torch.testing.assert_close(val, ref_val, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("backend", fused_backends("fcmi"))
def test_fcmi_gradcheck(backend):
    logits, groups = _inputs(9, 4, 3, scale=1.0)
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda v: fairkernels.fcmi_terms(v, groups, 3, backend=backend), (x,))


@pytest.mark.parametrize("backend", fused_backends("fcmi", dtype=torch.float32))
@pytest.mark.parametrize("n,k,t", [(123, 10, 7), (4097, 10, 30), (33, 257, 2)])
def test_fcmi_float32_close_to_reference(backend, n, k, t):
    logits64, groups = _inputs(n, k, t, seed=3)
    logits32 = logits64.float()
    loss = lambda x: fairkernels.fcmi_loss(x, groups, t, 0.5, 0.5, backend=backend)  # noqa: E731
    ref = lambda x: reference.fcmi_loss(x, groups, t, 0.5, 0.5)  # noqa: E731
    val, grad = _value_and_grad(loss, logits32)
    torch_val, torch_grad = _value_and_grad(ref, logits32)
    ref_val, ref_grad = _value_and_grad(ref, logits64)
    assert val.dtype == grad.dtype == torch.float32
    assert_close_to_reference(val, torch_val, ref_val, atol=1e-6)
    assert_close_to_reference(grad, torch_grad, ref_grad, atol=1e-8)


@pytest.mark.parametrize("backend", available_backends("fcmi"))
def test_empty_clusters_absent_groups_and_huge_logits(backend):
    n, k = 40, 5
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(n, k, generator=gen, dtype=torch.float64)
    logits[:, 4] = -1e4                      # cluster 4 empty: p_k underflows to exactly 0
    logits[::7, 0] = 1e4                     # saturated rows: c is one-hot
    groups = torch.randint(0, 3, (n,), generator=gen) * 2  # groups 1, 3, 5 absent, T = 6
    val, grad = _value_and_grad(lambda x: fairkernels.fcmi_loss(x, groups, 6, backend=backend), logits)
    ref_val, ref_grad = _value_and_grad(lambda x: reference.fcmi_loss(x, groups, 6), logits)
    assert torch.isfinite(val) and torch.isfinite(grad).all()
    torch.testing.assert_close(val, ref_val, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("backend", fused_backends("fcmi", dtype=torch.float32))
def test_huge_logits_float32_finite(backend):
    logits, groups = _inputs(257, 10, 3, dtype=torch.float32, scale=1e4)
    val, grad = _value_and_grad(lambda x: fairkernels.fcmi_loss(x, groups, 3, backend=backend), logits)
    assert torch.isfinite(val) and torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", available_backends("fcmi"))
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_index_dtypes_and_non_contiguous(backend, index_dtype):
    wide, groups = _inputs(50, 12, 4, index_dtype=index_dtype)
    logits = wide[:, ::2]                     # non-contiguous view, K = 6
    assert not logits.is_contiguous()
    val, grad = _value_and_grad(lambda x: fairkernels.fcmi_loss(x[:, ::2], groups, 4, backend=backend), wide)
    ref_val, ref_grad = _value_and_grad(lambda x: reference.fcmi_loss(x[:, ::2], groups.long(), 4), wide)
    torch.testing.assert_close(val, ref_val, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("backend", fused_backends("fcmi", dtype=torch.float32))
def test_deterministic_bitwise(backend):
    logits, groups = _inputs(5000, 10, 7, dtype=torch.float32, seed=5)
    runs = [_value_and_grad(lambda x: fairkernels.fcmi_loss(x, groups, 7, backend=backend, deterministic=True),
                            logits) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.skipif("cpu" not in fused_backends("fcmi", dtype=torch.float32), reason="needs the C++ kernels")
def test_cpu_bitwise_identical_across_thread_counts():
    """The cpu kernels reduce over a thread-count-independent row partition (csrc/cpu/common.h)."""
    logits, groups = _inputs(30000, 10, 7, dtype=torch.float32, seed=6)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(torch.ops.fairkernels.fcmi_fwd(logits, groups, 7, True))
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", available_backends("fcmi_embeddings"))
@pytest.mark.parametrize("n,k,t,d", [(5, 3, 2, 4), (123, 10, 7, 16)])
def test_fcmi_loss_from_embeddings(backend, n, k, t, d):
    gen = torch.Generator().manual_seed(n)
    h = torch.randn(n, d, generator=gen, dtype=torch.float64)
    centers = torch.randn(k, d, generator=gen, dtype=torch.float64)
    groups = torch.randint(0, t, (n,), generator=gen)
    out = _grads_embeddings(lambda a, b: fairkernels.fcmi_loss_from_embeddings(a, b, groups, t, 0.2, backend=backend),
                            h, centers)
    ref = _grads_embeddings(lambda a, b: reference.fcmi_loss_from_embeddings(a, b, groups, t, 0.2), h, centers)
    for got, want in zip(out, ref):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)


def _grads_embeddings(fn, h, centers):
    hv, cv = h.clone().requires_grad_(), centers.clone().requires_grad_()
    out = fn(hv, cv)
    out.backward()
    return out.detach(), hv.grad, cv.grad


@pytest.mark.parametrize("backend", fused_backends("fcmi_embeddings"))
def test_fcmi_embeddings_chunked_path_matches_reference(backend, monkeypatch):
    monkeypatch.setattr(fcmi_ops, "EMBEDDING_CHUNK_ELEMENTS", 7 * 4)   # 7 rows per chunk, K = 4
    gen = torch.Generator().manual_seed(11)
    h = torch.randn(50, 6, generator=gen, dtype=torch.float64)
    centers = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    groups = torch.randint(0, 3, (50,), generator=gen)
    assert len(fcmi_ops._embedding_chunks(50, 4)) == 8
    out = _grads_embeddings(lambda a, b: fairkernels.fcmi_loss_from_embeddings(a, b, groups, 3, backend=backend),
                            h, centers)
    ref = _grads_embeddings(lambda a, b: reference.fcmi_loss_from_embeddings(a, b, groups, 3), h, centers)
    for got, want in zip(out, ref):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("backend", fused_backends("fcmi_embeddings"))
def test_fcmi_embeddings_gradcheck(backend):
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(7, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    centers = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    groups = torch.randint(0, 2, (7,), generator=gen)
    assert torch.autograd.gradcheck(
        lambda a, b: fairkernels.fcmi_loss_from_embeddings(a, b, groups, 2, 0.5, backend=backend), (h, centers))


def test_explicit_backends():
    logits, groups = _inputs(10, 3, 2)
    if "cpu" in available_backends("fcmi"):
        fairkernels.fcmi_loss(logits, groups, 2, backend="cpu")
    with pytest.raises(RuntimeError, match="cuda backend needs CUDA tensors"):
        fairkernels.fcmi_loss(logits, groups, 2, backend="cuda")


@pytest.mark.skipif("cpu" not in fused_backends("fcmi"), reason="needs the C++ kernels")
def test_cpu_kernel_rejects_out_of_range_groups():
    """The kernels check the group range in their own pass (ValueError, _checks.py's wording)."""
    logits, _ = _inputs(10, 3, 2)
    ops = torch.ops.fairkernels
    with pytest.raises(ValueError, match="groups must be < num_groups=2, found 5"):
        ops.fcmi_fwd(logits, torch.full((10,), 5), 2, False)
    bad = torch.tensor([0, 1, -3, 1, 0, 7, 0, 1, 0, -1])
    with pytest.raises(ValueError, match="groups must be >= 0, found -3"):
        ops.fcmi_fwd(logits, bad, 2, False)
    table = torch.zeros(2, 3, dtype=logits.dtype)
    with pytest.raises(ValueError, match="groups must be >= 0, found -3"):
        ops.fcmi_bwd(logits, bad, logits[:, 0], table, torch.tensor(0.1, dtype=logits.dtype), False)


def _embedding_inputs(n, k, t, d, dtype, seed, index_dtype=torch.int64):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)
    centers = torch.randn(k, d, generator=gen, dtype=torch.float64).to(dtype)
    groups = torch.randint(0, t, (n,), generator=gen).to(index_dtype)
    return h, centers, groups


def _emb_kernel_outputs(k, h, centers, groups, t, tau):
    """(lse, joint, ent_sum, grad_h, grad_centers) of one backend's fused or chunked kernels."""
    acc = h.dtype
    table = torch.linspace(-1.0, 1.0, t * centers.shape[0], dtype=acc).reshape(t, -1)
    logc_coef = torch.tensor(0.3, dtype=acc)
    if k is None:
        stats = fcmi_ops._chunked_emb_fwd(torch.ops.fairkernels, h, centers, groups, t, tau, True)
        grads = fcmi_ops._chunked_emb_bwd(torch.ops.fairkernels, h, centers, groups, stats[0], table,
                                          logc_coef, tau, True)
    else:
        stats = k.fcmi_emb_fwd(h, centers, groups, t, tau, True)
        grads = k.fcmi_emb_bwd(h, centers, groups, stats[0], table, logc_coef, tau, True)
    return (*stats, *grads)


@pytest.mark.skipif("cpu" not in fused_backends("fcmi_embeddings"), reason="needs the C++ kernels")
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_cpu_fused_embedding_kernels_match_chunked_path(dtype, tol, index_dtype):
    """fcmi_emb_fwd/_bwd (csrc/cpu/fcmi_emb.cpp) == the chunked fcmi_fwd/_bwd path, kernel by
    kernel, over several row chunks and a ragged last block; one row of h is all zeros."""
    h, centers, groups = _embedding_inputs(4099, 11, 5, 7, dtype, seed=21, index_dtype=index_dtype)
    h[17] = 0.0
    got = _emb_kernel_outputs(torch.ops.fairkernels, h, centers, groups, 5, 0.3)
    want = _emb_kernel_outputs(None, h, centers, groups, 5, 0.3)
    for name, a, b in zip(("lse", "joint", "ent_sum", "grad_h", "grad_centers"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        scale = b.abs().max().clamp_min(1.0)
        if name == "grad_h":   # the zero row's gradient is dL/dunit / eps: compare it relatively
            scale = b.abs().amax(1, keepdim=True).clamp_min(1.0)
        assert ((a - b).abs() / scale).max() <= tol, name


@pytest.mark.skipif("cpu" not in fused_backends("fcmi_embeddings"), reason="needs the C++ kernels")
def test_cpu_fused_embeddings_zero_rows_finite_and_match_reference():
    h, centers, groups = _embedding_inputs(40, 4, 3, 5, torch.float64, seed=8)
    h[::7] = 0.0
    out = _grads_embeddings(lambda a, b: fairkernels.fcmi_loss_from_embeddings(a, b, groups, 3, backend="cpu"),
                            h, centers)
    ref = _grads_embeddings(lambda a, b: reference.fcmi_loss_from_embeddings(a, b, groups, 3), h, centers)
    for got, want in zip(out, ref):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)


@pytest.mark.skipif("cpu" not in fused_backends("fcmi_embeddings"), reason="needs the C++ kernels")
def test_cpu_fused_embeddings_gradcheck_float64():
    h, centers, groups = _embedding_inputs(70, 5, 3, 4, torch.float64, seed=4)   # 2 row blocks
    h.requires_grad_()
    centers.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: fairkernels.fcmi_terms_from_embeddings(a, b, groups, 3, 0.7, backend="cpu"), (h, centers))


@pytest.mark.skipif("cpu" not in fused_backends("fcmi_embeddings"), reason="needs the C++ kernels")
def test_cpu_fused_embeddings_bitwise_identical_across_thread_counts():
    h, centers, groups = _embedding_inputs(30000, 10, 7, 16, torch.float32, seed=5)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(_emb_kernel_outputs(torch.ops.fairkernels, h, centers, groups, 7, 0.1))
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.skipif("cpu" not in fused_backends("fcmi_embeddings"), reason="needs the C++ kernels")
def test_cpu_fused_embedding_kernels_reject_bad_arguments():
    h, centers, groups = _embedding_inputs(10, 3, 2, 4, torch.float64, seed=1)
    ops = torch.ops.fairkernels
    with pytest.raises(ValueError, match="groups must be < num_groups=2, found 5"):
        ops.fcmi_emb_fwd(h, centers, torch.full((10,), 5), 2, 0.1, False)
    with pytest.raises(RuntimeError, match="columns but h has"):
        ops.fcmi_emb_fwd(h, centers[:, :3], groups, 2, 0.1, False)
    with pytest.raises(RuntimeError, match="tau must be > 0"):
        ops.fcmi_emb_fwd(h, centers, groups, 2, 0.0, False)


@pytest.mark.skipif("cpu" not in fused_backends("fcmi"), reason="needs the C++ kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("row,col", [(0, 0), (2500, 3), (4999, 9)])
def test_cpu_fused_check_finds_every_non_finite_logit(dtype, value, row, col):
    """The cpu kernels' in-pass check (ent_sum turns NaN) catches a single bad value anywhere
    (first / middle / last chunk and column); check_inputs=False lets it through."""
    logits, groups = _inputs(5000, 10, 3, dtype=dtype, seed=9)
    logits[row, col] = value
    with pytest.raises(ValueError, match="logits contains NaN or inf"):
        fairkernels.fcmi_loss(logits, groups, 3, backend="cpu")
    fairkernels.fcmi_loss(logits, groups, 3, backend="cpu", check_inputs=False)
    h, centers, groups = _embedding_inputs(3000, 4, 3, 5, dtype, seed=2)
    bad_h = h.clone()
    bad_h[min(row, 2999), col % 5] = value
    with pytest.raises(ValueError, match="h contains NaN or inf"):
        fairkernels.fcmi_loss_from_embeddings(bad_h, centers, groups, 3, backend="cpu")
    centers[col % 4, row % 5] = value
    with pytest.raises(ValueError, match="centers contains NaN or inf"):
        fairkernels.fcmi_loss_from_embeddings(h, centers, groups, 3, backend="cpu")


@pytest.mark.skipif("cpu" not in fused_backends("fcmi"), reason="needs the C++ kernels")
def test_cpu_default_checks_add_no_pass(monkeypatch):
    """With check_inputs=True (the default) and valid inputs, the cpu path never runs the
    separate value scans of _checks.py: the kernels did the checks; and the op builds no
    tensor from a Python number on the device (torch.tensor) per call."""
    from fairkernels import _checks

    def forbidden(*args, **kwargs):
        raise AssertionError("a separate value-check pass ran")

    logits, groups = _inputs(300, 6, 3, dtype=torch.float32)
    h, centers, _ = _embedding_inputs(300, 6, 3, 4, torch.float32, seed=3)
    monkeypatch.setattr(_checks, "check_finite", forbidden)
    monkeypatch.setattr(_checks, "check_group_values", forbidden)
    monkeypatch.setattr(fcmi_ops.torch, "tensor", forbidden)
    fairkernels.fcmi_loss(logits.requires_grad_(), groups, 3).backward()
    fairkernels.fcmi_loss_from_embeddings(h.requires_grad_(), centers, groups, 3).backward()
    fairkernels.joint_histogram(torch.softmax(logits.detach(), 1), groups, 3)
    assert torch.isfinite(logits.grad).all() and torch.isfinite(h.grad).all()
