"""The eq. 12 batch-centroid solve (reference.batch_centroids, fk.batch_centroids): equal to the
exact least-squares solution on well-posed systems, to the closed-form ridge solution always,
finite on singular / indefinite systems (the float32 Cholesky of P^T P used to crash there),
and differentiable (gradcheck, also on singular systems)."""
import numpy as np
import pytest
import torch

import fairkernels as fk
from fairkernels import reference


def _simplex(n, k, seed, dtype=torch.float64, sharp=1.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(sharp * torch.randn(n, k, generator=gen, dtype=dtype), 1)


def _ridge_closed_form(q, z, ridge):
    """(P^T P + lam I)^-1 P^T Z in numpy float64, lam = ridge * trace / K (the documented form)."""
    p, zz = q.double().numpy(), z.double().numpy()
    gram = p.T @ p
    lam = ridge * np.trace(gram) / p.shape[1]
    return np.linalg.solve(gram + lam * np.eye(p.shape[1]), p.T @ zz)


@pytest.mark.parametrize("seed", range(4))
def test_equals_exact_solve_when_well_posed(seed):
    q = _simplex(200, 6, seed)
    z = torch.randn(200, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 100))
    exact = np.linalg.lstsq(q.numpy(), z.numpy(), rcond=None)[0]
    np.testing.assert_allclose(reference.batch_centroids(q, z, ridge=1e-12).numpy(), exact, rtol=0, atol=1e-9)
    # The default ridge is the closed form to rounding, and within its O(lam / sigma_min^2) of exact.
    default = fk.batch_centroids(q, z).numpy()
    np.testing.assert_allclose(default, _ridge_closed_form(q, z, 1e-6), rtol=0, atol=1e-11)
    sigma_min = np.linalg.svd(q.numpy(), compute_uv=False)[-1]
    lam = 1e-6 * (q.numpy() ** 2).sum() / 6
    bound = 2 * lam / sigma_min ** 2 * np.abs(exact).max() + 1e-12
    assert np.abs(default - exact).max() <= bound


def _singular_cases():
    q = _simplex(64, 5, 0, torch.float32, sharp=3.0)
    z = torch.randn(64, 3, generator=torch.Generator().manual_seed(7))
    dup = torch.cat([q[:32], q[:32]])                          # duplicate points
    twin = torch.cat([q[:, :4], q[:, 3:4]], 1)                 # two clusters with equal columns
    twin = twin / twin.sum(1, keepdim=True)
    empty = q.clone()
    empty[:, 2] = 0.0                                          # an empty cluster
    empty = empty / empty.sum(1, keepdim=True)
    one_point = q[:1]                                          # N = 1 < K (a group with one point)
    hard = torch.nn.functional.one_hot(torch.tensor([0, 0, 1, 1, 1]), 5).float()  # 3 clusters empty
    return {"duplicate-points": (dup, z), "twin-clusters": (twin, z), "empty-cluster": (empty, z),
            "one-point": (one_point, z[:1]), "one-hot-empty": (hard, z[:5])}


@pytest.mark.parametrize("name", list(_singular_cases()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_singular_systems_are_finite_and_match_ridge_form(name, dtype):
    q, z = (t.to(dtype) for t in _singular_cases()[name])
    m = fk.batch_centroids(q, z)
    assert m.dtype == dtype and m.shape == (q.shape[1], z.shape[1])
    assert torch.isfinite(m).all()
    # Still the ridge solution: compare in float64 with a tolerance for the float32 input rounding.
    want = _ridge_closed_form(q, z, 1e-6)
    scale = max(1.0, np.abs(want).max())
    np.testing.assert_allclose(m.double().numpy(), want, rtol=0, atol=(1e-9 if dtype == torch.float64 else 1e-4) * scale)


def test_empty_cluster_centroid_shrinks_to_zero():
    q, z = _singular_cases()["one-hot-empty"]
    m = fk.batch_centroids(q.double(), z.double())
    assert m[2:].abs().max() == 0.0                            # no mass: no arbitrary centroid
    np.testing.assert_allclose(m[0].numpy(), z[:2].double().mean(0).numpy(), rtol=1e-5)


@pytest.mark.parametrize("name", ["well-posed", "twin-clusters", "empty-cluster", "one-point"])
def test_gradcheck(name):
    if name == "well-posed":
        q, z = _simplex(12, 4, 3), torch.randn(12, 3, dtype=torch.float64)
    else:
        q, z = (t.double() for t in _singular_cases()[name])
    q, z = q.clone().requires_grad_(), z.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: reference.batch_centroids(a, b, 1e-3), (q, z))


def test_dfc_loss_on_three_random_groups_of_digits_is_finite():
    # The reported crash: 3 random groups on sklearn digits, float32, through dfc_loss.
    from sklearn.datasets import load_digits
    X = torch.as_tensor(load_digits().data[:256] / 16.0, dtype=torch.float32)
    groups = torch.as_tensor(np.random.RandomState(0).randint(0, 3, 256))
    z = X @ torch.randn(64, 10, generator=torch.Generator().manual_seed(0)) / 8
    centers = z[:10].clone().requires_grad_()
    q = fk.student_t_assign(z, centers, backend="reference")
    loss, _, l_fr, _ = fk.dfc_loss(q, z, groups, 3, backend="reference")
    loss.backward()
    assert torch.isfinite(l_fr) and torch.isfinite(centers.grad).all()


def test_gradients_are_contiguous():
    q = _simplex(40, 5, 1, torch.float32).requires_grad_()
    z = torch.randn(40, 3, requires_grad=True)
    grad_q, grad_z = torch.autograd.grad(fk.batch_centroids(q, z).square().sum(), [q, z])
    assert grad_q.is_contiguous() and grad_z.is_contiguous()
