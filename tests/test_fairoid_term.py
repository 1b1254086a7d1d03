"""The fused DFC fairness term (fairkernels.ops.fairoid) against the reference composition in
float64 on fresh random inputs: value, fairoids and both gradients (the target Psi is a
constant of the step in both, so torch.autograd.gradcheck, which would differentiate it, does
not apply; the reference's gradient is autograd's own through the QR solve)."""
import pytest
import torch

import fairkernels as fk
from fairkernels import reference


def _reference_term(W, z, groups, T, previous=None, alpha=1.0, beta=1000.0):
    centroids = reference.batch_centroids(W, z)
    pi, present = reference.fairoids(z, groups, T, previous)
    phi = reference.fairness_matrix(centroids, pi, alpha, present)
    psi = reference.fairoid_target(phi, beta, present=present)
    return reference.fairoid_loss(psi, phi), pi


def _inputs(seed, N, K, d, T, absent=False):
    generator = torch.Generator().manual_seed(seed)
    W = torch.softmax(2.0 * torch.randn(N, K, generator=generator, dtype=torch.float64), 1).requires_grad_()
    z = torch.randn(N, d, generator=generator, dtype=torch.float64).requires_grad_()
    groups = torch.randint(0, T - 1 if absent else T, (N,), generator=generator)
    previous = torch.randn(T, d, generator=generator, dtype=torch.float64) if absent else None
    return W, z, groups, previous


def _assert_matches(W, z, groups, T, previous=None, alpha=1.0, beta=1000.0, w_grad_tol=1e-12, z_grad_tol=1e-12):
    want, want_pi = _reference_term(W, z, groups, T, previous, alpha, beta)
    got, got_pi = fk.fairoid_term(W, z, groups, T, alpha, beta, previous)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(got_pi, want_pi, rtol=1e-12, atol=1e-14)
    mine, theirs = torch.autograd.grad(got, (W, z)), torch.autograd.grad(want, (W, z))
    for name, a, b, tol in (("weights", mine[0], theirs[0], w_grad_tol), ("z", mine[1], theirs[1], z_grad_tol)):
        assert float((a - b).abs().max()) <= tol * float(b.abs().max()) + 1e-15, name


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("T, alpha, beta", [(2, 1.0, 1000.0), (3, 1.0, 2.0), (5, 0.5, 1.5)])
def test_matches_the_reference(seed, T, alpha, beta):
    _assert_matches(*_inputs(seed, 64, 6, 4, T)[:3], T, alpha=alpha, beta=beta)


def test_absent_group_keeps_its_previous_fairoid_and_is_left_out():
    W, z, groups, previous = _inputs(7, 50, 4, 3, 4, absent=True)
    _assert_matches(W, z, groups, 4, previous, beta=1.5)
    _, fairoids = fk.fairoid_term(W, z, groups, 4, previous=previous)
    torch.testing.assert_close(fairoids[3], previous[3])


@pytest.mark.parametrize("case", ["empty cluster", "duplicate clusters", "fewer rows than clusters"])
def test_singular_systems_stay_finite_and_match(case):
    W, z, groups, _ = _inputs(3, 40, 5, 3, 2)
    W = W.detach().clone()
    if case == "empty cluster":
        W[:, 2] = 0.0
        W = W / W.sum(1, keepdim=True)
    elif case == "duplicate clusters":
        W[:, 1] = W[:, 0]
    else:
        W, z, groups = W[:3], z[:3].detach(), torch.tensor([0, 1, 1])
    W, z = W.requires_grad_(), z.detach().requires_grad_()
    loss, _ = fk.fairoid_term(W, z, groups, 2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(W.grad).all() and torch.isfinite(z.grad).all()
    W.grad = z.grad = None
    # Rank-deficient W (identical columns, fewer rows than clusters) leaves part of M to the
    # ridge alone: the gradient in the weights then has condition ~ K / ridge, and the QR and the
    # normal equations (autograd of torch.linalg.solve gives the fused value to 2e-6 relative)
    # agree to 2e-4 of its scale (the gradient in z to 2e-10).
    singular = case != "empty cluster"
    _assert_matches(W, z, groups, 2, w_grad_tol=1e-3 if singular else 1e-12, z_grad_tol=1e-8 if singular else 1e-12)


def test_dfc_loss_backends_agree_and_dtype_follows_z():
    W, z, groups, _ = _inputs(11, 80, 5, 3, 2)
    fused = fk.dfc_loss(W, z, groups, 2, gamma=2.0)
    ref = fk.dfc_loss(W, z, groups, 2, gamma=2.0, backend="reference")
    for mine, theirs in zip(fused, ref):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-14)
    loss, fairoids = fk.fairoid_term(W.detach().float(), z.detach().float(), groups, 2)
    assert loss.dtype == torch.float32 and fairoids.dtype == torch.float32


def test_bad_input_names_the_argument():
    W, z, groups, _ = _inputs(0, 10, 3, 2, 2)
    with pytest.raises(ValueError, match="z has 9 rows but weights has 10"):
        fk.fairoid_term(W, z[:9], groups, 2)
    with pytest.raises(ValueError, match="previous must have shape"):
        fk.fairoid_term(W, z, groups, 2, previous=torch.zeros(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="alpha"):
        fk.fairoid_term(W, z, groups, 2, alpha=0.0)
    with pytest.raises(ValueError, match="z"):
        fk.fairoid_term(W, z.detach().clone().fill_(float("nan")), groups, 2)
