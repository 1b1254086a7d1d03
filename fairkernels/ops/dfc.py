"""DFC (Wang & Davidson) losses, docs/math.md §4: DEC target, KL(P||Q), batch centroids (eq. 12),
fairoids, the fairness matrix Phi, its smoothed target Psi and KL(Psi||Phi).

Everything after the N x K assignment is O(K d + T d + K T) algebra, so one implementation
(the reference's) serves every backend; dec_target and kl_div are single passes over N x K and
use a fused kernel where the backend has one."""
from __future__ import annotations

import torch

from fairkernels import _backend, _checks, reference
from fairkernels.ops._dispatch import kernels
from fairkernels.ops.fairoid import fairoid_term


def _check_assignments(q, name="q"):
    _checks.check_matrix(q, name)


def dec_target(q, *, backend="auto", check_inputs=True):
    """DEC target p_ik = (q_ik^2 / f_k) / sum_k' (q_ik'^2 / f_k'), f_k = sum_i q_ik (no gradient)."""
    _check_assignments(q)
    if check_inputs:
        _checks.check_finite(q, "q")
    chosen = _backend.choose(backend, q.device, q.dtype, "dec_target")
    if chosen == "reference":
        return reference.dec_target(q)
    with torch.no_grad():
        return kernels(chosen).dec_target(q.contiguous())


class KLDivFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, target, q, backend):
        ctx.save_for_backward(target, q)
        ctx.backend = backend
        return kernels(backend).kl_div_fwd(target, q)

    @staticmethod
    def backward(ctx, grad_out):
        target, q = ctx.saved_tensors
        return None, kernels(ctx.backend).kl_div_bwd(grad_out, target, q), None


def kl_div(target, q, *, backend="auto", check_inputs=True):
    """KL(P || Q) = (1/N) sum_ik p_ik log(p_ik / q_ik) (docs/math.md §4); differentiable in q only."""
    _check_assignments(target, "target")
    _check_assignments(q)
    if target.shape != q.shape:
        raise ValueError(f"target has shape {tuple(target.shape)} but q has {tuple(q.shape)}")
    _checks.check_same_device("q", q, "target", target)
    if check_inputs:
        _checks.check_finite(q, "q")
        _checks.check_finite(target, "target")
    chosen = _backend.choose(backend, q.device, q.dtype, "kl_div")
    if chosen == "reference":
        return reference.kl_div(target.detach(), q)
    return KLDivFunction.apply(target.detach().contiguous(), q.contiguous(), chosen)


def batch_centroids(q, z, ridge=1e-6):
    """M = (Q^T Q)^-1 Q^T Z (docs/math.md §4, eq. 12) as the least-squares solve of the system with a ridge of
    ridge * trace / K (QR in float64: never fails on singular or indefinite systems; see
    fairkernels.reference.batch_centroids)."""
    _check_assignments(q)
    _checks.check_matrix(z, "z")
    if z.shape[0] != q.shape[0]:
        raise ValueError(f"z has {z.shape[0]} rows but q has {q.shape[0]}")
    _checks.check_positive(ridge, "ridge")
    return reference.batch_centroids(q, z, ridge)


def fairoids(z, groups, num_groups=None, previous=None, *, check_inputs=True):
    """pi_t = mean of z over group t (docs/math.md §4) -> (fairoids T x d, present mask T). Groups absent
    from the batch keep `previous` and are marked absent (excluded from the loss)."""
    _checks.check_matrix(z, "z")
    num_groups = _checks.check_groups(groups, z.shape[0], z, num_groups, check_inputs)
    if previous is not None and tuple(previous.shape) != (num_groups, z.shape[1]):
        raise ValueError(f"previous must have shape {(num_groups, z.shape[1])}, got {tuple(previous.shape)}")
    return reference.fairoids(z, groups, num_groups, previous)


def fairness_matrix(centroids, group_centroids, alpha=1.0, present=None):
    """phi_kt: Student-t kernel between cluster centroid k and fairoid t, normalised over t."""
    _checks.check_matrix(centroids, "centroids")
    _checks.check_matrix(group_centroids, "group_centroids")
    if centroids.shape[1] != group_centroids.shape[1]:
        raise ValueError("centroids and group_centroids must have the same number of columns")
    alpha = _checks.check_positive(alpha, "alpha")
    return reference.fairness_matrix(centroids, group_centroids, alpha, present)


def fairoid_target(phi, beta=1000.0, present=None):
    """Psi: the smoothed, near-uniform target of Phi (docs/math.md §4; no gradient)."""
    _checks.check_matrix(phi, "phi")
    beta = _checks.check_positive(beta, "beta")
    return reference.fairoid_target(phi, beta, present=present)


def fairoid_loss(psi, phi):
    """L_fr = KL(Psi || Phi) = (1/K) sum_kt psi_kt log(psi_kt / phi_kt) (docs/math.md §4)."""
    _checks.check_matrix(psi, "psi")
    _checks.check_matrix(phi, "phi")
    if psi.shape != phi.shape:
        raise ValueError(f"psi has shape {tuple(psi.shape)} but phi has {tuple(phi.shape)}")
    return reference.fairoid_loss(psi.detach(), phi)


def dfc_loss(q, z, groups, num_groups=None, gamma=1.0, alpha=1.0, beta=1000.0, target=None,
             previous_fairoids=None, *, backend="auto", check_inputs=True):
    """L = KL(P||Q) + gamma KL(Psi||Phi) (docs/math.md §4) -> (loss, l_cl, l_fr, fairoids).

    target: the DEC target P for these rows (the trainer refreshes it on its schedule); None
    computes it from q. previous_fairoids: fairoids kept for groups absent from this batch."""
    _check_assignments(q)
    _checks.check_matrix(z, "z")
    if z.shape[0] != q.shape[0]:
        raise ValueError(f"z has {z.shape[0]} rows but q has {q.shape[0]}")
    num_groups = _checks.check_groups(groups, q.shape[0], q, num_groups, check_inputs)
    gamma = _checks.check_real(gamma, "gamma")
    alpha = _checks.check_positive(alpha, "alpha")
    beta = _checks.check_positive(beta, "beta")
    if previous_fairoids is not None and tuple(previous_fairoids.shape) != (num_groups, z.shape[1]):
        raise ValueError(f"previous_fairoids must have shape {(num_groups, z.shape[1])}, "
                         f"got {tuple(previous_fairoids.shape)}")
    if target is None:
        target = dec_target(q, backend=backend, check_inputs=check_inputs)
    l_cl = kl_div(target, q, backend=backend, check_inputs=check_inputs)
    if backend != "reference":        # the fused node of fairkernels.ops.fairoid: same value and gradients
        l_fr, group_centroids = fairoid_term(q, z, groups, num_groups, alpha, beta, previous_fairoids,
                                             check_inputs=False)
        l_fr = l_fr.to(l_cl.dtype)
        return l_cl + gamma * l_fr, l_cl, l_fr, group_centroids
    centroids = reference.batch_centroids(q, z)
    group_centroids, present = reference.fairoids(z, groups, num_groups, previous_fairoids)
    phi = reference.fairness_matrix(centroids, group_centroids, alpha, present)
    psi = reference.fairoid_target(phi, beta, present=present)
    l_fr = reference.fairoid_loss(psi, phi).to(l_cl.dtype)
    return l_cl + gamma * l_fr, l_cl, l_fr, group_centroids.detach()
