"""Pure-PyTorch reference of every op in docs/math.md (sections 1-4).

This module is the ground truth of the tests and the baseline of the benchmarks. It is written
for clarity, differentiated by torch autograd, and materialises N x K tensors freely. It does no
input validation: the public ops in `fairkernels.ops` validate and then dispatch here when
backend="reference".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# docs/math.md §2.2: the floor inside log() used for gradients of zero statistics.
LOG_EPS = 1e-12
# docs/math.md §1.2: norms are clamped below at this value (as F.normalize).
NORM_EPS = 1e-12


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """docs/math.md §7: accumulate in float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _xlogy_safe(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x * log(y) with 0 log 0 = 0 in the value and a finite gradient at zero (docs/math.md §2.2)."""
    return torch.where(x > 0, x * torch.log(y.clamp_min(LOG_EPS)), torch.zeros_like(x))


# --------------------------------------------------------------------------- 1. assignments
def squared_distances(z: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """d_ik = ||z_i - mu_k||^2 (docs/math.md §1.1) by the expansion ||z'||^2 + ||mu'||^2 - 2 z'.mu',
    clamped at >= 0, on z' = z - m and mu' = mu - m with m the mean of the centres.

    The shift leaves every distance unchanged but makes the expansion cancel terms of the size
    of the data's spread around the centres instead of the embeddings' norm: in float32 the
    plain expansion loses ~1e-2 relative accuracy at norm 300, the centred one stays ~1e-6 up
    to norm 10^3 (tests/test_assign.py), while keeping the matrix product (BLAS / tensor
    cores) for the N x K dot products."""
    shift = centers.mean(0, keepdim=True)
    z, centers = z - shift, centers - shift
    z_sq = (z * z).sum(1, keepdim=True)
    mu_sq = (centers * centers).sum(1)
    return (z_sq + mu_sq - 2.0 * z @ centers.t()).clamp_min(0.0)


def student_t_assign(z: torch.Tensor, centers: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """q_ik = softmax_k( -(a+1)/2 * log1p(d_ik / a) )  (docs/math.md §1.1, DEC's Student-t kernel)."""
    dist = squared_distances(z, centers)
    log_w = -(alpha + 1.0) / 2.0 * torch.log1p(dist / alpha)
    return torch.softmax(log_w, dim=1)


def cosine_logits(h: torch.Tensor, centers: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """logits_ik = <h_i, u_k> / (||h_i|| ||u_k|| tau)  (docs/math.md §1.2)."""
    return F.normalize(h, dim=1, eps=NORM_EPS) @ F.normalize(centers, dim=1, eps=NORM_EPS).t() / tau


def cosine_assign(h: torch.Tensor, centers: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """c_ik = softmax_k(cos(h_i, u_k) / tau)  (docs/math.md §1.2)."""
    return torch.softmax(cosine_logits(h, centers, tau), dim=1)


# --------------------------------------------------------------------------- 2. statistics
def joint_histogram(probs: torch.Tensor, groups: torch.Tensor, num_groups: int,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """J_tk = sum_{i: g_i = t} w_i P_ik  (docs/math.md §2.1), in the accumulation dtype."""
    acc = _acc_dtype(probs.dtype)
    rows = probs.to(acc)
    if weights is not None:
        rows = rows * weights.to(acc)[:, None]
    joint = torch.zeros(num_groups, probs.shape[1], dtype=acc, device=probs.device)
    return joint.index_add(0, groups.long(), rows)


class _MutualInformation(torch.autograd.Function):
    """I(G;C) from a joint table, with the docs/math.md §2.2 gradient (eps-floored logs, never NaN)."""

    @staticmethod
    def forward(ctx, joint):
        total = joint.sum()
        p_joint = joint / total
        p_group = p_joint.sum(1, keepdim=True)
        p_cluster = p_joint.sum(0, keepdim=True)
        log_ratio = (torch.log(p_joint.clamp_min(LOG_EPS)) - torch.log(p_group.clamp_min(LOG_EPS))
                     - torch.log(p_cluster.clamp_min(LOG_EPS)))
        info = torch.where(p_joint > 0, p_joint * log_ratio, torch.zeros_like(p_joint)).sum()
        ctx.save_for_backward(log_ratio, info, total)
        return info

    @staticmethod
    def backward(ctx, grad_info):
        log_ratio, info, total = ctx.saved_tensors
        return grad_info * (log_ratio - info) / total


def mutual_information(joint: torch.Tensor) -> torch.Tensor:
    """I(G;C) = sum_tk p_tk log(p_tk / (p_t p_k)), p = J / sum J  (docs/math.md §2.2)."""
    return _MutualInformation.apply(joint)


# --------------------------------------------------------------------------- 3. FCMI loss
def fcmi_terms(logits: torch.Tensor, groups: torch.Tensor, num_groups: int):
    """(L_clu, L_fair) of docs/math.md §3, computed from the full N x K softmax."""
    acc = _acc_dtype(logits.dtype)
    x = logits.to(acc)
    n = x.shape[0]
    log_c = x - torch.logsumexp(x, dim=1, keepdim=True)
    c = log_c.exp()
    cond_entropy = -(c * log_c).sum() / n
    joint = joint_histogram(c, groups, num_groups) / n            # p_tk
    p_cluster = joint.sum(0)                                       # p_k
    p_group = torch.bincount(groups.long(), minlength=num_groups).to(acc) / n  # p_t = n_t / N
    l_clu = _xlogy_safe(p_cluster, p_cluster).sum() + cond_entropy
    log_ratio = (torch.log(joint.clamp_min(LOG_EPS)) - torch.log(p_group.clamp_min(LOG_EPS))[:, None]
                 - torch.log(p_cluster.clamp_min(LOG_EPS))[None, :])
    l_fair = torch.where(joint > 0, joint * log_ratio, torch.zeros_like(joint)).sum()
    return l_clu.to(logits.dtype), l_fair.to(logits.dtype)


def fcmi_loss(logits: torch.Tensor, groups: torch.Tensor, num_groups: int,
              alpha: float = 0.04, beta: float = 0.2) -> torch.Tensor:
    """alpha * L_clu + beta * L_fair  (docs/math.md §3)."""
    l_clu, l_fair = fcmi_terms(logits, groups, num_groups)
    return alpha * l_clu + beta * l_fair


def fcmi_loss_from_embeddings(h: torch.Tensor, centers: torch.Tensor, groups: torch.Tensor,
                              num_groups: int, tau: float = 0.1, alpha: float = 0.04,
                              beta: float = 0.2) -> torch.Tensor:
    """docs/math.md §1.2 followed by docs/math.md §3 (the reference materialises the N x K logits)."""
    return fcmi_loss(cosine_logits(h, centers, tau), groups, num_groups, alpha, beta)


# --------------------------------------------------------------------------- 4. DFC
@torch.no_grad()
def dec_target(q: torch.Tensor) -> torch.Tensor:
    """p_ik = (q_ik^2 / f_k) / sum_k' (q_ik'^2 / f_k'), f_k = sum_i q_ik  (docs/math.md §4; no gradient)."""
    acc = _acc_dtype(q.dtype)
    qa = q.to(acc)
    weight = qa * qa / qa.sum(0).clamp_min(LOG_EPS)
    return (weight / weight.sum(1, keepdim=True).clamp_min(LOG_EPS)).to(q.dtype)


def kl_div(target: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) = (1/N) sum_ik p_ik log(p_ik / q_ik)  (docs/math.md §4, batch mean)."""
    acc = _acc_dtype(q.dtype)
    p = target.to(acc)
    qa = q.to(acc)
    terms = _xlogy_safe(p, p) - p * torch.log(qa.clamp_min(LOG_EPS))
    return (terms.sum() / q.shape[0]).to(q.dtype)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (QR's backward returns a
    column-major gradient; callers, like every other op's, get a row-major one)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def batch_centroids(q: torch.Tensor, z: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """Batch centroid estimate of eq. 12, M = (P^T P)^-1 P^T Z (docs/math.md §4), by ridge least squares.

    Returns M = argmin_M ||P M - Z||^2 + lam ||M||^2 = (P^T P + lam I)^-1 P^T Z with
    lam = ridge * trace(P^T P) / K (P = q, N x K; Z = z, N x d; K x d out, in z's dtype).

    Why this form: P^T P is singular whenever a cluster gets no mass in the batch, two clusters
    get the same assignments, or N < K, and in float32 rounding makes it indefinite, so a plain
    Cholesky solve of the normal equations crashes (`linalg.cholesky ... not positive-definite`).
    Here the ridge-augmented system [P; sqrt(lam) I] M = [Z; 0] is solved by a reduced QR in
    float64 (whatever the input dtype): that matrix has full column rank for any lam > 0
    (its smallest singular value is >= sqrt(lam)), so R is invertible and the solve never fails,
    never forms P^T P (the condition number is that of P, not its square) and needs no host
    sync. A cluster with no mass gets a centroid shrunk to 0 instead of an arbitrary one. On
    well-posed systems (P of full column rank) M differs from the exact solve by a relative
    O(lam / sigma_min(P)^2); pass a tiny ridge (e.g. 1e-12) to get the exact solve to float64
    rounding. trace(P^T P) = sum p_ik^2 >= N / K for rows on the simplex, so lam > 0; it is
    floored at LOG_EPS for arbitrary input. Differentiable in q and z (QR and triangular solves);
    lam is part of the function (its gradient flows too). Non-finite input gives non-finite M
    (which the trainers' loss check reports) rather than an exception."""
    p = _ContiguousGrad.apply(q).to(torch.float64)
    k = p.shape[1]
    lam = ridge * (p * p).sum().clamp_min(LOG_EPS) / k
    eye = torch.eye(k, dtype=torch.float64, device=p.device)
    design = torch.cat([p, lam.sqrt() * eye])
    rhs = torch.cat([z.to(torch.float64), z.new_zeros(k, z.shape[1], dtype=torch.float64)])
    basis, upper = torch.linalg.qr(design)
    return torch.linalg.solve_triangular(upper, basis.t() @ rhs, upper=True).to(z.dtype)


def fairoids(z: torch.Tensor, groups: torch.Tensor, num_groups: int,
             previous: torch.Tensor | None = None):
    """pi_t = mean of z_i over g_i = t (docs/math.md §4). Returns (fairoids, present) where `present`
    marks groups seen in this batch; absent groups keep `previous` (or zeros)."""
    acc = _acc_dtype(z.dtype)
    sums = torch.zeros(num_groups, z.shape[1], dtype=acc, device=z.device)
    sums = sums.index_add(0, groups.long(), z.to(acc))
    counts = torch.bincount(groups.long(), minlength=num_groups).to(acc)
    present = counts > 0
    means = sums / counts.clamp_min(1.0)[:, None]
    if previous is not None:
        means = torch.where(present[:, None], means, previous.to(acc))
    return means.to(z.dtype), present


def fairness_matrix(centroids: torch.Tensor, group_centroids: torch.Tensor, alpha: float = 1.0,
                    present: torch.Tensor | None = None) -> torch.Tensor:
    """phi_kt = Student-t kernel between mu_k and pi_t normalised over t (docs/math.md §4). Absent groups
    (present = False) get phi = 0 and are left out of the normalisation."""
    dist = squared_distances(centroids, group_centroids)
    log_w = -(alpha + 1.0) / 2.0 * torch.log1p(dist / alpha)
    if present is not None:
        log_w = log_w.masked_fill(~present[None, :], float("-inf"))
    return torch.softmax(log_w, dim=1)


@torch.no_grad()
def fairoid_target(phi: torch.Tensor, beta: float = 1000.0, eps: float = 1e-12,
                   present: torch.Tensor | None = None) -> torch.Tensor:
    """psi_kt = (phi_hat_kt / f_t) / sum_t' (phi_hat_kt' / f_t'), phi_hat = (phi + eps)^(1/beta),
    f_t = sum_k phi_kt (docs/math.md §4; no gradient)."""
    phi_hat = (phi + eps).pow(1.0 / beta)
    f_group = phi.sum(0).clamp_min(LOG_EPS)
    weight = phi_hat / f_group[None, :]
    if present is not None:
        weight = weight * present[None, :].to(weight.dtype)
    return weight / weight.sum(1, keepdim=True).clamp_min(LOG_EPS)


def fairoid_loss(psi: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """L_fr = KL(Psi || Phi) = (1/K) sum_kt psi_kt log(psi_kt / phi_kt)  (docs/math.md §4)."""
    terms = _xlogy_safe(psi, psi) - psi * torch.log(phi.clamp_min(LOG_EPS))
    return terms.sum() / phi.shape[0]


def dfc_loss(q: torch.Tensor, z: torch.Tensor, groups: torch.Tensor, num_groups: int,
             gamma: float = 1.0, alpha: float = 1.0, beta: float = 1000.0,
             target: torch.Tensor | None = None, previous_fairoids: torch.Tensor | None = None):
    """L = KL(P||Q) + gamma KL(Psi||Phi) (docs/math.md §4). Returns (loss, l_cl, l_fr, fairoids)."""
    if target is None:
        target = dec_target(q)
    l_cl = kl_div(target, q)
    centroids = batch_centroids(q, z)
    group_centroids, present = fairoids(z, groups, num_groups, previous_fairoids)
    phi = fairness_matrix(centroids, group_centroids, alpha, present)
    psi = fairoid_target(phi, beta, present=present)
    l_fr = fairoid_loss(psi, phi).to(l_cl.dtype)
    return l_cl + gamma * l_fr, l_cl, l_fr, group_centroids.detach()
