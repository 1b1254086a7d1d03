"""Soft assignments (docs/math.md §1.1 Student-t, 1.2 cosine) and the k-means assignment kernel."""
import pytest
import torch

import fairkernels
from fairkernels import reference
from fairkernels.ops import torch_kernels
from tests.helpers import assert_close_to_reference, available_backends, fused_backends

OPS = {
    "student_t": (fairkernels.student_t_assign, reference.student_t_assign, 1.5),
    "cosine": (fairkernels.cosine_assign, reference.cosine_assign, 0.2),
}


def _inputs(n, k, d, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)
    centers = torch.randn(k, d, generator=gen, dtype=torch.float64).to(dtype)
    return x, centers


def _out_and_grads(fn, x, centers):
    xv, cv = x.clone().requires_grad_(), centers.clone().requires_grad_()
    out = fn(xv, cv)
    upstream = torch.cos(torch.arange(out.numel(), dtype=out.dtype)).reshape(out.shape)
    (out * upstream).sum().backward()
    return out.detach(), xv.grad, cv.grad


def _cases(op):
    return [(op, b) for b in available_backends(op)]


@pytest.mark.parametrize("op,backend", _cases("student_t") + _cases("cosine"))
@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (5, 3, 2), (123, 10, 7), (4097, 3, 16), (33, 257, 5)])
def test_assign_matches_reference_float64(op, backend, n, k, d):
    public, ref, param = OPS[op]
    x, centers = _inputs(n, k, d, seed=n + k)
    got = _out_and_grads(lambda a, b: public(a, b, param, backend=backend), x, centers)
    want = _out_and_grads(lambda a, b: ref(a, b, param), x, centers)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("op,backend", [(o, b) for o in OPS for b in fused_backends(o)])
def test_assign_gradcheck(op, backend):
    public, _, param = OPS[op]
    x, centers = _inputs(6, 4, 3, seed=1)
    assert torch.autograd.gradcheck(lambda a, b: public(a, b, param, backend=backend),
                                    (x.requires_grad_(), centers.requires_grad_()))


@pytest.mark.parametrize("op,backend", [(o, b) for o in OPS for b in fused_backends(o, dtype=torch.float32)])
def test_assign_float32_close_to_reference(op, backend):
    public, ref, param = OPS[op]
    x64, c64 = _inputs(4097, 10, 16, seed=2)
    x32, c32 = x64.float(), c64.float()
    got = _out_and_grads(lambda a, b: public(a, b, param, backend=backend), x32, c32)
    same = _out_and_grads(lambda a, b: ref(a, b, param), x32, c32)
    want = _out_and_grads(lambda a, b: ref(a, b, param), x64, c64)
    for a, s, w in zip(got, same, want):
        assert a.dtype == torch.float32
        assert_close_to_reference(a, s, w, atol=1e-5)


@pytest.mark.parametrize("backend", available_backends("cosine"))
def test_cosine_zero_rows_finite(backend):
    x, centers = _inputs(5, 3, 4)
    x[2] = 0.0                                    # norm below the 1e-12 clamp
    centers[1] = 0.0
    got = _out_and_grads(lambda a, b: fairkernels.cosine_assign(a, b, 0.1, backend=backend), x, centers)
    want = _out_and_grads(lambda a, b: reference.cosine_assign(a, b, 0.1), x, centers)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("op,backend", [(o, b) for o in OPS for b in available_backends(o)])
def test_assign_non_contiguous(op, backend):
    public, ref, param = OPS[op]
    x, centers = _inputs(40, 6, 10, seed=3)
    got = _out_and_grads(lambda a, b: public(a[:, ::2], b[:, ::2], param, backend=backend), x, centers)
    want = _out_and_grads(lambda a, b: ref(a[:, ::2], b[:, ::2], param), x, centers)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)


@pytest.mark.skipif("cpu" not in fused_backends("kmeans_assign"), reason="needs the C++ kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (123, 10, 7), (70000, 20, 3)])
def test_kmeans_assign_matches_reference(dtype, n, k, d):
    x, centers = _inputs(n, k, d, dtype=dtype, seed=k)
    labels, min_dist = torch.ops.fairkernels.kmeans_assign(x, centers)
    want_labels, want_dist = torch_kernels.kmeans_assign(x, centers)
    assert labels.dtype == torch.int64 and min_dist.dtype == dtype
    full = torch_kernels._sq_dist(x, centers)
    # Ties may resolve differently; the chosen center must be (numerically) a nearest one.
    torch.testing.assert_close(full.gather(1, labels[:, None])[:, 0], want_dist)
    torch.testing.assert_close(min_dist, want_dist)
    assert (labels == want_labels).float().mean() > 0.999


@pytest.mark.skipif("cpu" not in fused_backends("kmeans_assign"), reason="needs the C++ kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kmeans_assign_ties_pick_lowest_index_across_tiles(dtype):
    """Duplicated centers tie exactly: the lowest index must win, in every 256-row tile (the
    last one ragged) and for K not a multiple of the vector width."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    centers = torch.cat([base, base, base[:13 % 12 + 1]]).to(dtype)      # K = 26: k, k + 12 tie
    x = (base[torch.randint(0, 12, (700,), generator=gen)] * 1.0001).to(dtype)
    labels, min_dist = torch.ops.fairkernels.kmeans_assign(x, centers)
    want = torch.cdist(x.double(), base).argmin(1)
    assert torch.equal(labels, want)
    assert bool((min_dist >= 0).all())


@pytest.mark.skipif("cpu" not in fused_backends("kmeans_assign"), reason="needs the C++ kernels")
def test_kmeans_assign_bitwise_identical_across_thread_counts():
    x, centers = _inputs(3001, 37, 6, dtype=torch.float32, seed=9)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(torch.ops.fairkernels.kmeans_assign(x, centers))
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.skipif("cpu" not in fused_backends("student_t"), reason="needs the C++ kernels")
@pytest.mark.parametrize("op,arg", [("student_t_fwd", 1.0), ("cosine_fwd", 0.1)])
def test_cpu_soft_assignment_rejects_zero_centers(op, arg):
    """The softmax epilogue reads the first logit of every row: K = 0 must be refused, not read."""
    with pytest.raises(RuntimeError, match="at least one row"):
        getattr(torch.ops.fairkernels, op)(torch.randn(5, 3), torch.randn(0, 3), arg)


def _offset_inputs(norm, n=2000, k=10, d=32, seed=0):
    """Embeddings far from the origin (norm ~ `norm`), centres among them: the regime where the
    plain expansion |z|^2 + |mu|^2 - 2 z.mu cancels (issue 11: 6.5e-3 error at norm 300)."""
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(d, generator=gen, dtype=torch.float64)
    centers = norm * direction / direction.norm() + torch.randn(k, d, generator=gen, dtype=torch.float64)
    z = centers[torch.randint(0, k, (n,), generator=gen)] + 0.5 * torch.randn(n, d, generator=gen,
                                                                             dtype=torch.float64)
    return z.float(), centers.float()


@pytest.mark.parametrize("backend", [b for b in ("reference", "cpu")
                                     if b in available_backends("student_t", dtype=torch.float32)])
@pytest.mark.parametrize("norm", [30, 300, 1000])
def test_student_t_float32_accurate_at_large_norms(backend, norm):
    """float32 q and both gradients within 1e-5 (relative to the largest entry) of float64 on the
    same float32 inputs, at embedding norms up to 10^3 (centred distances, reference.py)."""
    z, centers = _offset_inputs(norm)
    got = _out_and_grads(lambda a, b: fairkernels.student_t_assign(a, b, 1.0, backend=backend), z, centers)
    want = _out_and_grads(lambda a, b: reference.student_t_assign(a, b, 1.0), z.double(), centers.double())
    for name, a, b in zip(("q", "grad_z", "grad_centers"), got, want):
        assert a.dtype == torch.float32
        err = ((a.double() - b).abs().max() / b.abs().max()).item()
        assert err <= 1e-5, (name, err)
