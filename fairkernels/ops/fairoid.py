"""The whole DFC fairness term KL(Psi || Phi) of docs/math.md §4 as one autograd node.

The reference composes it from the eq. 12 least-squares solve (a float64 QR), the fairoids,
the Student-t fairness matrix, its smoothed target and the KL: about 250 small tensor ops per
training step forward and backward, more time than a narrow model's own step at batch 256
(README, Training speed). Here the forward is the normal equations of the same ridge problem,
solved by one float64 Cholesky of a K x K matrix, and the backward is the closed form below,
so a step costs a few N x K and N x d products and O(K^2 + K T) work on top. Works on any
device (plain torch ops); the two N-sized products are the only work that grows with the batch.

Forward, with W the N x K assignments the centroids are fitted to and Z the N x d embeddings:
    lam = ridge * sum(W^2) / K,   A = W^T W + lam I,   M = A^-1 W^T Z             (K x d)
    pi_t = mean of z_i over g_i = t (absent groups: `previous`, excluded from Phi)
    D_kt = |M_k - pi_t|^2,  log w_kt = -(a + 1) / 2 log(1 + D_kt / a),  Phi = softmax_t(log w)
    Psi = the smoothed target of Phi (a constant),  L = (1/K) sum_kt psi_kt log(psi_kt / phi_kt)
Backward (Psi rows sum to one over the present groups):
    dL/dlog w = (Phi - Psi) / K,   dL/dD = dL/dlog w * -(a + 1) / (2 (a + D))
    dL/dM_k = 2 sum_t dD_kt (M_k - pi_t),   dL/dpi_t = 2 sum_k dD_kt (pi_t - M_k)
    Y = A^-1 dL/dM,   dA = -Y M^T
    dL/dZ = W Y + dL/dpi_{g_i} / n_{g_i}
    dL/dW = W (dA + dA^T) + Z Y^T + 2 ridge trace(dA) / K * W
M equals the reference's QR solution of the ridge-augmented system up to float64 rounding (the
same minimiser); the condition number of A is at most 1 + K / ridge, far inside float64's range.
"""
from __future__ import annotations

import torch

from fairkernels import _checks, reference
from fairkernels.reference import LOG_EPS


def _solve_spd(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """A^-1 B for the ridge-regularised (so positive-definite) A; non-finite input gives a
    non-finite result (which the trainers report) instead of an exception. No host sync: a
    failed factorisation is turned into NaN on the device."""
    factor, info = torch.linalg.cholesky_ex(A)
    return torch.where(info == 0, torch.cholesky_solve(B, factor), float("nan"))


def group_means(z, groups, num_groups: int, previous=None):
    """(pi [T, d], counts [T]) in z's dtype: the fairoids of reference.fairoids (absent groups keep
    `previous`, else 0) without its host sync: index_add_, not bincount, which reads max(groups)
    on the host (a sync per step on a GPU)."""
    counts = torch.zeros(num_groups, dtype=z.dtype, device=z.device).index_add_(
        0, groups, torch.ones(groups.shape[0], dtype=z.dtype, device=z.device))
    pi = torch.zeros(num_groups, z.shape[1], dtype=z.dtype, device=z.device).index_add_(0, groups, z)
    pi = pi / counts.clamp_min(1.0)[:, None]
    if previous is not None:
        pi = torch.where((counts > 0)[:, None], pi, previous.detach().to(z.dtype))
    return pi, counts


class FairoidTermFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weights, z, groups, num_groups, alpha, beta, previous, ridge):
        W, Z = weights.detach().double(), z.detach().double()
        K = W.shape[1]
        lam = ridge * (W * W).sum().clamp_min(LOG_EPS) / K
        A = W.t() @ W + lam * torch.eye(K, dtype=torch.float64, device=W.device)
        M = _solve_spd(A, W.t() @ Z)
        pi, counts = group_means(Z, groups, num_groups, previous)
        present = counts > 0
        D = ((M[:, None, :] - pi[None, :, :]) ** 2).sum(2)                          # K x T
        log_w = (-(alpha + 1.0) / 2.0 * torch.log1p(D / alpha)).masked_fill(~present[None, :], float("-inf"))
        phi = torch.softmax(log_w, dim=1)
        psi = reference.fairoid_target(phi, beta, present=present)
        loss = (reference._xlogy_safe(psi, psi) - psi * torch.log(phi.clamp_min(LOG_EPS))).sum() / K
        ctx.save_for_backward(weights, z, groups, A, M, pi, D, phi, psi, counts)
        ctx.alpha, ctx.ridge = alpha, ridge
        fairoids = pi.to(z.dtype)
        ctx.mark_non_differentiable(fairoids)
        return loss.to(z.dtype), fairoids

    @staticmethod
    def backward(ctx, grad_loss, _grad_fairoids):
        weights, z, groups, A, M, pi, D, phi, psi, counts = ctx.saved_tensors
        alpha, ridge = ctx.alpha, ctx.ridge
        K = M.shape[0]
        scale = grad_loss.double()
        d_log_w = (phi - psi) * (scale / K)
        d_dist = d_log_w * (-(alpha + 1.0) / 2.0) / (alpha + D)                  # K x T (0 for absent groups)
        d_M = 2.0 * (d_dist.sum(1, keepdim=True) * M - d_dist @ pi)
        d_pi = 2.0 * (d_dist.sum(0)[:, None] * pi - d_dist.t() @ M)
        Y = _solve_spd(A, d_M)
        W, Z = weights.detach().double(), z.detach().double()
        grad_z = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_z = (W @ Y + (d_pi / counts.clamp_min(1.0)[:, None])[groups]).to(z.dtype)
        if ctx.needs_input_grad[0]:
            d_A = -Y @ M.t()
            grad_w = W @ (d_A + d_A.t()) + Z @ Y.t() + (2.0 * ridge * torch.trace(d_A) / K) * W
            grad_w = grad_w.to(weights.dtype)
        return grad_w, grad_z, None, None, None, None, None, None


def fairoid_term(weights, z, groups, num_groups=None, alpha=1.0, beta=1000.0, previous=None, ridge=1e-6, *,
                 check_inputs=True):
    """L_fr = KL(Psi || Phi) of docs/math.md §4 in one autograd node -> (L_fr, fairoids [T, d]).

    weights: the N x K assignments the eq. 12 batch centroids are fitted to (the DEC target P,
    as in the paper, or the soft Q; differentiable when it requires grad); z: the N x d
    embeddings (differentiable). previous: fairoids [T, d] kept for groups absent from the
    batch (they are left out of Phi, as in fairkernels.fairness_matrix). Same value and
    gradients as reference.batch_centroids -> fairoids -> fairness_matrix -> fairoid_target ->
    fairoid_loss, in float64 inside; the loss comes back in z's dtype."""
    _checks.check_matrix(weights, "weights")
    _checks.check_matrix(z, "z")
    if z.shape[0] != weights.shape[0]:
        raise ValueError(f"z has {z.shape[0]} rows but weights has {weights.shape[0]}")
    _checks.check_same_device("z", z, "weights", weights)
    num_groups = _checks.check_groups(groups, z.shape[0], z, num_groups, check_inputs)
    alpha = _checks.check_positive(alpha, "alpha")
    beta = _checks.check_positive(beta, "beta")
    ridge = _checks.check_positive(ridge, "ridge")
    if previous is not None and tuple(previous.shape) != (num_groups, z.shape[1]):
        raise ValueError(f"previous must have shape {(num_groups, z.shape[1])}, got {tuple(previous.shape)}")
    if check_inputs:
        _checks.check_finite(weights, "weights")
        _checks.check_finite(z, "z")
    return FairoidTermFunction.apply(weights, z, groups.long(), num_groups, float(alpha), float(beta), previous,
                                     float(ridge))
