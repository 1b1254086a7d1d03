"""Joint histogram (docs/math.md §2.1) and mutual information (docs/math.md §2.2) on every available backend."""
import pytest
import torch

import fairkernels
from fairkernels import reference
from tests.helpers import assert_close_to_reference, available_backends, fused_backends


def _inputs(n, k, t, dtype=torch.float64, seed=0, index_dtype=torch.int64):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.rand(n, k, generator=gen, dtype=torch.float64).to(dtype)
    groups = torch.randint(0, t, (n,), generator=gen).to(index_dtype)
    weights = torch.rand(n, generator=gen, dtype=torch.float64).to(dtype)
    return probs, groups, weights


def _joint_and_grads(fn, probs, weights):
    p = probs.clone().requires_grad_()
    w = None if weights is None else weights.clone().requires_grad_()
    joint = fn(p, w)
    upstream = torch.linspace(-1, 1, joint.numel(), dtype=joint.dtype).reshape(joint.shape)
    (joint * upstream).sum().backward()
    return joint.detach(), p.grad, None if w is None else w.grad


@pytest.mark.parametrize("backend", available_backends("histogram"))
@pytest.mark.parametrize("n,k,t", [(1, 1, 1), (5, 3, 2), (123, 10, 7), (4097, 10, 30), (33, 257, 2)])
@pytest.mark.parametrize("weighted", [False, True])
def test_joint_histogram_matches_reference(backend, n, k, t, weighted):
    probs, groups, weights = _inputs(n, k, t, seed=n)
    weights = weights if weighted else None
    got = _joint_and_grads(lambda p, w: fairkernels.joint_histogram(p, groups, t, w, backend=backend), probs, weights)
    want = _joint_and_grads(lambda p, w: reference.joint_histogram(p, groups, t, w), probs, weights)
    for a, b in zip(got, want):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", fused_backends("histogram"))
def test_joint_histogram_gradcheck(backend):
    probs, groups, weights = _inputs(11, 4, 3)
    p, w = probs.requires_grad_(), weights.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: fairkernels.joint_histogram(a, groups, 3, b, backend=backend), (p, w))


@pytest.mark.parametrize("backend", fused_backends("histogram", dtype=torch.float32))
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_joint_histogram_float32_absent_groups_non_contiguous(backend, index_dtype):
    probs64, groups, weights = _inputs(4097, 20, 3, seed=4, index_dtype=index_dtype)
    probs32 = probs64.float()[:, ::2]                 # non-contiguous
    num_groups = 5                                    # groups 3, 4 absent
    got = fairkernels.joint_histogram(probs32, groups, num_groups, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (5, 10)
    assert torch.equal(got[3:], torch.zeros(2, 10))
    want = reference.joint_histogram(probs64[:, ::2], groups, num_groups)
    same_dtype = reference.joint_histogram(probs32, groups, num_groups)
    assert_close_to_reference(got, same_dtype, want, atol=1e-5)


@pytest.mark.parametrize("backend", fused_backends("histogram", dtype=torch.float32))
def test_joint_histogram_deterministic(backend):
    probs, groups, _ = _inputs(5000, 10, 7, dtype=torch.float32, seed=8)
    first = fairkernels.joint_histogram(probs, groups, 7, backend=backend, deterministic=True)
    second = fairkernels.joint_histogram(probs, groups, 7, backend=backend, deterministic=True)
    assert torch.equal(first, second)


def test_mutual_information_values_and_gradient():
    gen = torch.Generator().manual_seed(0)
    joint = torch.rand(3, 4, generator=gen, dtype=torch.float64)
    joint[1, 2] = 0.0                                 # a zero cell: 0 log 0 = 0, finite gradient
    j = joint.clone().requires_grad_()
    info = fairkernels.mutual_information(j)
    info.backward()
    p = joint / joint.sum()
    outer = p.sum(1, keepdim=True) * p.sum(0, keepdim=True)
    mask = p > 0
    expected = (p[mask] * torch.log(p[mask] / outer[mask])).sum()
    torch.testing.assert_close(info.detach(), expected)
    assert torch.isfinite(j.grad).all()
    inner = j.detach()[torch.arange(3) != 1]          # gradcheck away from the zero cell's kink
    assert torch.autograd.gradcheck(fairkernels.mutual_information, (inner.clone().requires_grad_(),))


def test_mutual_information_independent_table_is_zero():
    joint = torch.outer(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 0.25, 0.25], dtype=torch.float32))
    assert abs(fairkernels.mutual_information(joint).item()) < 1e-6


@pytest.mark.parametrize("backend", available_backends("histogram"))
def test_joint_histogram_rejects_negative_and_non_finite_values(backend):
    """check_inputs=True: negative or non-finite probs and non-finite weights raise, naming the
    argument (the cpu kernel finds them in the pass that builds the table); check_inputs=False
    accepts a negative entry and sums it."""
    gen = torch.Generator().manual_seed(4)
    probs = torch.rand(3000, 5, generator=gen, dtype=torch.float64)
    groups = torch.randint(0, 3, (3000,), generator=gen)
    weights = torch.rand(3000, generator=gen, dtype=torch.float64)
    for row, col in ((0, 0), (2999, 4)):
        bad = probs.clone()
        bad[row, col] = -0.25
        with pytest.raises(ValueError, match="probs must be non-negative, found -0.25"):
            fairkernels.joint_histogram(bad, groups, 3, backend=backend)
        got = fairkernels.joint_histogram(bad, groups, 3, backend=backend, check_inputs=False)
        torch.testing.assert_close(got, reference.joint_histogram(bad, groups, 3), rtol=1e-12, atol=1e-12)
        for value in (float("nan"), float("inf")):
            bad[row, col] = value
            with pytest.raises(ValueError, match="probs contains NaN or inf"):
                fairkernels.joint_histogram(bad, groups, 3, backend=backend)
            bad_w = weights.clone()
            bad_w[row] = value
            with pytest.raises(ValueError, match="weights contains NaN or inf"):
                fairkernels.joint_histogram(probs, groups, 3, weights=bad_w, backend=backend)
    fairkernels.joint_histogram(probs, groups, 3, weights=weights, backend=backend)


@pytest.mark.skipif("cpu" not in fused_backends("histogram"), reason="needs the C++ kernels")
def test_histogram_fwd_checked_flags_match_reference_and_table():
    """The fused check's flags equal the reference body's (torch_kernels) and the table is the
    unchecked kernel's, bit for bit."""
    from fairkernels.ops import torch_kernels

    gen = torch.Generator().manual_seed(5)
    probs = torch.rand(5000, 7, generator=gen)
    groups = torch.randint(0, 4, (5000,), generator=gen, dtype=torch.int32)
    weights = torch.rand(5000, generator=gen)
    cases = [(probs, weights), (probs, None)]
    for index, value in ((123, -1.0), (4000, float("nan")), (4999 * 7 + 6, float("-inf"))):
        bad = probs.clone().reshape(-1)
        bad[index] = value
        cases.append((bad.reshape(5000, 7), weights))
    bad_w = weights.clone()
    bad_w[77] = float("inf")
    cases.append((probs, bad_w))
    for p, w in cases:
        joint, flags = torch.ops.fairkernels.histogram_fwd_checked(p, groups, w, 4, False)
        _, want_flags = torch_kernels.histogram_fwd_checked(p, groups, w, 4, False)
        assert torch.equal(flags, want_flags), (flags, want_flags)
        torch.testing.assert_close(joint, torch.ops.fairkernels.histogram_fwd(p, groups, w, 4, False),
                                   rtol=0, atol=0, equal_nan=True)
