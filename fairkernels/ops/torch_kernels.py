"""The kernel interface, written in plain PyTorch.

Every backend exposes these functions with the same names, positional signatures and output
dtypes: the C++/CUDA extension as torch.ops.fairkernels.<name> (schemas in csrc/ops.cpp) and
the Triton kernels as fairkernels.triton.<name>. The autograd.Functions in fairkernels.ops call
them through `fairkernels.ops._dispatch.kernels(backend)`, so one backward formula serves all
backends. "acc" below is float64 for float64 inputs and float32 otherwise (docs/math.md §7).

These bodies materialise N x K temporaries: they are the executable specification of the
interface (and the "reference" backend's kernels under torch.distributed), not a fast path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fairkernels.reference import NORM_EPS, _acc_dtype, squared_distances


# --------------------------------------------------------------------------- fcmi (docs/math.md §3)
def fcmi_fwd(logits, groups, num_groups: int, deterministic: bool = False):
    """-> (lse[N] acc, joint[T,K] acc = sum_{i in t} c_ik, ent_sum[] acc = sum_ik c_ik log c_ik)."""
    x = logits.to(_acc_dtype(logits.dtype))
    lse = torch.logsumexp(x, dim=1)
    log_c = x - lse[:, None]
    c = log_c.exp()
    joint = torch.zeros(num_groups, x.shape[1], dtype=x.dtype, device=x.device)
    joint.index_add_(0, groups.long(), c)
    return lse, joint, (c * log_c).sum()


def fcmi_bwd(logits, groups, lse, table, logc_coef, deterministic: bool = False):
    """grad_ik = c_ik (G_ik - sum_k' c_ik' G_ik') with G_ik = table[g_i, k] - logc_coef * log c_ik."""
    x = logits.to(lse.dtype)
    log_c = x - lse[:, None]
    c = log_c.exp()
    g = table[groups.long()] - logc_coef * log_c
    return (c * (g - (c * g).sum(1, keepdim=True))).to(logits.dtype)


# --------------------------------------------------------------------------- histogram (docs/math.md §2.1)
def histogram_fwd(probs, groups, weights, num_groups: int, deterministic: bool = False):
    """-> joint[T,K] acc, J_tk = sum_{g_i = t} w_i P_ik."""
    rows = probs.to(_acc_dtype(probs.dtype))
    if weights is not None:
        rows = rows * weights.to(rows.dtype)[:, None]
    joint = torch.zeros(num_groups, probs.shape[1], dtype=rows.dtype, device=probs.device)
    return joint.index_add_(0, groups.long(), rows)


def histogram_fwd_checked(probs, groups, weights, num_groups: int, deterministic: bool = False):
    """Optional (a backend may omit it): histogram_fwd plus its input check, flags[3] int64 =
    (probs hold +-inf/NaN, probs hold a negative entry, weights hold +-inf/NaN). The cpu kernel
    finds them in the pass that builds the table; this body spells out what it computes."""
    flags = torch.stack([~torch.isfinite(probs).all(), (probs < 0).any(),
                         torch.zeros((), dtype=torch.bool, device=probs.device) if weights is None
                         else ~torch.isfinite(weights).all()]).long()
    return histogram_fwd(probs, groups, weights, num_groups, deterministic), flags


def histogram_bwd(grad_joint, groups, weights):
    """-> grad_probs[N,K] (grad_joint's dtype): dL/dP_ik = w_i dL/dJ_{g_i k}."""
    grad = grad_joint[groups.long()]
    if weights is not None:
        grad = grad * weights.to(grad.dtype)[:, None]
    return grad


# --------------------------------------------------------------------------- Student-t (docs/math.md §1.1)
def _sq_dist(z, centers):
    """Plain expansion (the k-means kernels' distance, ties resolved on the same values)."""
    acc = _acc_dtype(z.dtype)
    za, ca = z.to(acc), centers.to(acc)
    return ((za * za).sum(1, keepdim=True) + (ca * ca).sum(1) - 2.0 * za @ ca.t()).clamp_min(0.0)


def _student_t_dist(z, centers):
    """Centred expansion (reference.squared_distances): accurate in float32 at large norms."""
    acc = _acc_dtype(z.dtype)
    return squared_distances(z.to(acc), centers.to(acc))


def student_t_fwd(z, centers, alpha: float):
    """-> q[N,K] in z's dtype."""
    log_w = -(alpha + 1.0) / 2.0 * torch.log1p(_student_t_dist(z, centers) / alpha)
    return torch.softmax(log_w, dim=1).to(z.dtype)


def student_t_bwd(grad_q, q, z, centers, alpha: float):
    """-> (grad_z[N,d], grad_centers[K,d]) by the docs/math.md §1.1 backward (two matrix products)."""
    acc = _acc_dtype(z.dtype)
    qa, ga = q.to(acc), grad_q.to(acc)
    s = qa * (ga - (qa * ga).sum(1, keepdim=True))
    coef = s * (-(alpha + 1.0) / 2.0) / (alpha + _student_t_dist(z, centers))
    # the gradients are shift-invariant too: centre by the centres' mean as the distances do
    za, ca = z.to(acc), centers.to(acc)
    shift = ca.mean(0, keepdim=True)
    za, ca = za - shift, ca - shift
    grad_z = 2.0 * (coef.sum(1, keepdim=True) * za - coef @ ca)
    grad_centers = -2.0 * (coef.t() @ za - coef.sum(0)[:, None] * ca)
    return grad_z.to(z.dtype), grad_centers.to(centers.dtype)


# --------------------------------------------------------------------------- cosine (docs/math.md §1.2)
def normalize_backward(x, x_unit, grad_unit):
    """Gradient through x / max(||x||, eps) given the unit vectors and dL/d(unit)."""
    norm = x.norm(dim=1, keepdim=True)
    radial = (x_unit * grad_unit).sum(1, keepdim=True) * x_unit
    radial = torch.where(norm > NORM_EPS, radial, torch.zeros_like(radial))
    return (grad_unit - radial) / norm.clamp_min(NORM_EPS)


def cosine_fwd(h, centers, tau: float):
    """-> c[N,K] in h's dtype."""
    acc = _acc_dtype(h.dtype)
    hu = F.normalize(h.to(acc), dim=1, eps=NORM_EPS)
    cu = F.normalize(centers.to(acc), dim=1, eps=NORM_EPS)
    return torch.softmax(hu @ cu.t() / tau, dim=1).to(h.dtype)


def cosine_bwd(grad_c, c, h, centers, tau: float):
    """-> (grad_h[N,d], grad_centers[K,d])."""
    acc = _acc_dtype(h.dtype)
    ca, ga = c.to(acc), grad_c.to(acc)
    grad_s = ca * (ga - (ca * ga).sum(1, keepdim=True)) / tau
    ha, ua = h.to(acc), centers.to(acc)
    hu = F.normalize(ha, dim=1, eps=NORM_EPS)
    uu = F.normalize(ua, dim=1, eps=NORM_EPS)
    grad_h = normalize_backward(ha, hu, grad_s @ uu)
    grad_centers = normalize_backward(ua, uu, grad_s.t() @ hu)
    return grad_h.to(h.dtype), grad_centers.to(centers.dtype)


# --------------------------------------------------------------------------- k-means
def kmeans_assign(x, centers):
    """-> (labels[N] int64, min_sq_dist[N] acc): nearest center by squared Euclidean distance."""
    dist = _sq_dist(x, centers)
    min_dist, labels = dist.min(1)
    return labels, min_dist


# --------------------------------------------------------------------------- DFC clustering loss (docs/math.md §4)
def dfc_step(z, centers, groups, target, previous, num_groups: int, alpha: float, beta: float, gamma: float,
             ridge: float, weights_from_q: bool):
    """-> (loss, l_cl = KL(P||Q), l_fr = KL(Psi||Phi) (0-d, z's dtype), q[B,K], fairoids[T,d], grad_z,
    grad_centers), loss = l_cl + gamma * l_fr summed in float64.

    Q: Student-t of z to centers ([K, d], or [T, K, d] with row i using centers[g_i]); the
    fairness term is reference.batch_centroids (fitted to P, or Q when weights_from_q) ->
    fairoids -> fairness_matrix -> fairoid_target -> fairoid_loss; the gradients are those of
    loss, by autograd through that composition, in float64. gamma = 0 skips the fairness term
    (l_fr = 0)."""
    from fairkernels import reference
    with torch.enable_grad():
        z64 = z.detach().double().requires_grad_(True)
        c64 = centers.detach().double().requires_grad_(True)
        g = groups.long()
        own = c64[g] if c64.dim() == 3 else c64[None]                    # B x K x d or 1 x K x d
        dist = ((z64[:, None, :] - own) ** 2).sum(2)
        q = torch.softmax(-(alpha + 1.0) / 2.0 * torch.log1p(dist / alpha), dim=1)
        p = target.detach().double()
        kl = reference.kl_div(p, q)
        fair = torch.zeros((), dtype=torch.float64)
        pis, present = reference.fairoids(z64, g, num_groups, None if previous is None else previous.double())
        group_centroids = pis.detach()
        if gamma != 0.0:
            centroids = reference.batch_centroids(q if weights_from_q else p, z64, ridge)
            phi = reference.fairness_matrix(centroids, pis, alpha, present)
            fair = reference.fairoid_loss(reference.fairoid_target(phi, beta, present=present), phi)
        loss = kl + gamma * fair
        grad_z, grad_c = torch.autograd.grad(loss, [z64, c64])
    return (loss.detach().to(z.dtype), kl.detach().to(z.dtype), fair.detach().to(z.dtype), q.detach().to(z.dtype),
            group_centroids.to(z.dtype), grad_z.to(z.dtype), grad_c.to(centers.dtype))


# --------------------------------------------------------------------------- balancing offsets (docs/math.md §8)
MAX_NEWTON_STEP = 50.0     # no offset moves further in one Newton step (its merit test follows)


def _newton_steps(sums, outer, residual, counts):
    """-> (d [T, K], usable [T]): each group's Newton step on log q_t(b_t) = log p (see
    group_offsets). H = (diag(sums) - outer) / n is the Hessian of the dual, singular along 1; in
    y = sqrt(q) d the system H~ y = -sqrt(q) r has H~ = D H D with null vector u = sqrt(q) and
    entries in [-1, 1], so the part of the right-hand side along u (an unreachable shift) is
    dropped and H~ + u u^T / |u|^2 factorised. A pivot <= 1e-14 or a non-finite step is not usable."""
    K = sums.shape[1]
    n = counts.clamp_min(1.0)
    root = torch.sqrt((sums / n[:, None]).clamp_min(1e-200))
    u_norm = root.square().sum(1, keepdim=True).sqrt()
    rhs = root * residual
    along = (rhs * root).sum(1, keepdim=True) / u_norm
    rhs = -(rhs - along * root / u_norm)
    eye = torch.eye(K, dtype=sums.dtype, device=sums.device)
    hessian = (torch.diag_embed(sums) - outer) / n[:, None, None]
    scale = root[:, :, None] * root[:, None, :]
    system = hessian / scale + scale / u_norm[:, :, None].square() + 1e-12 * eye
    factor, info = torch.linalg.cholesky_ex(system)
    pivots = torch.diagonal(factor, dim1=1, dim2=2).square()
    y = torch.cholesky_solve(rhs[:, :, None], factor).squeeze(2)
    d = y / root
    usable = (info == 0) & (pivots > 1e-14).all(1) & torch.isfinite(d).all(1)
    return d.clamp(-MAX_NEWTON_STEP, MAX_NEWTON_STEP), usable


def group_offsets(logits, groups, num_groups: int, max_iter: int = 200, tol: float = 1e-6, process_group=None,
                  init=None):
    """-> b[T,K] (logits' dtype): offsets that give every group's mean softmax(logits_i + b_{g_i})
    the whole set's mean softmax(logits_i) p, i.e. the root of log q_t(b_t) = log p (the fixed
    point of the Sinkhorn step b_t <- b_t + log p - log q_t); groups with no rows get 0 (their
    start). Each group takes Newton steps (_newton_steps) with a backtracking line search on
    |log q_t - log p|^2: a step that does not lower it is halved, down to an eighth, then
    replaced by the Sinkhorn step from where it started. A group stops moving once
    max_k |log q_tk - log p_k| <= tol; max_iter counts passes over the rows. process_group:
    sums all-reduced across it (the trainers under DDP; not part of the kernel interface).
    init: offsets [T, K] to start from (zeros when None)."""
    from fairkernels.distributed import all_reduce_
    T, K = num_groups, logits.shape[1]
    groups = groups.long()
    L = logits.double()
    counts = all_reduce_(torch.bincount(groups, minlength=T).double(), process_group)
    total = all_reduce_(torch.softmax(L, 1).sum(0), process_group)
    log_p = torch.log(total / counts.sum().clamp_min(1)).clamp_min(-80.0)
    b = torch.zeros(T, K, dtype=torch.float64, device=L.device) if init is None else init.double().clone()
    member = F.one_hot(groups, T).double()
    done = counts <= 0
    after_newton = torch.zeros(T, dtype=torch.bool, device=L.device)
    start, start_residual, start_step = b.clone(), torch.zeros_like(b), torch.zeros_like(b)
    scale = torch.ones(T, dtype=torch.float64, device=L.device)
    start_merit = torch.full((T,), float("inf"), dtype=torch.float64, device=L.device)
    for _ in range(max_iter):
        soft = torch.softmax(L + b[groups], 1)
        sums = all_reduce_(torch.zeros(T, K, dtype=torch.float64, device=L.device).index_add_(0, groups, soft),
                           process_group)
        outer = all_reduce_(torch.einsum("it,ik,il->tkl", member, soft, soft), process_group)
        residual = torch.log(sums / counts[:, None].clamp_min(1.0)).clamp_min(-80.0) - log_p
        finite = torch.isfinite(residual).all(1)
        merit = torch.where(finite, residual.square().sum(1), float("inf"))
        largest = torch.where(finite, residual.abs().amax(1), float("inf"))
        # A step that did not lower |r|^2 is halved from its start, down to an eighth, then
        # replaced by the Sinkhorn step from there.
        worse = ~done & after_newton & ~(merit < start_merit)
        scale = torch.where(worse, 0.5 * scale, scale)
        retry = worse & (scale >= 0.125)
        b = torch.where(retry[:, None], start + scale[:, None] * start_step, b)
        b = torch.where((worse & ~retry)[:, None], start - start_residual, b)
        after_newton = torch.where(worse, retry, after_newton)
        done = done | (~worse & (largest <= tol))
        active = ~done & ~worse
        if not bool((active | worse).any()):             # one host read a pass (4-10 passes)
            break
        start_merit = torch.where(active, merit, start_merit)
        start = torch.where(active[:, None], b, start)
        start_residual = torch.where(active[:, None], residual, start_residual)
        scale = torch.where(active, 1.0, scale)
        d, usable = _newton_steps(sums, outer, torch.where(active[:, None], residual, 0.0), counts)
        start_step = torch.where((active & usable)[:, None], d, start_step)
        b = torch.where(active[:, None], b + torch.where(usable[:, None], d, -residual), b)
        after_newton = torch.where(active, usable, after_newton)
    return b.to(logits.dtype)


def dec_batch_target(q, groups, running, offsets, momentum: float, balance: bool, num_groups: int,
                     max_iter: int = 200, tol: float = 1e-6):
    """-> (target[B,K] q's dtype, frequency[K] acc, offsets[T,K] float64): the DFC trainer's per-batch DEC target
    (docs/math.md §4). f = momentum * running + (1 - momentum) * (column sums of q / their
    total), or the batch's alone when running is None; p_ik = (q_ik^2 / f_k) normalised over k;
    with balance, p <- softmax(log p + c_{g_i}) with c = group_offsets(log p) iterated from offsets
    (the previous batch's; zeros when None), and returned (zeros without balance)."""
    qa = q.double()
    columns = qa.sum(0)
    frequency = columns / columns.sum().clamp_min(1e-12)
    if running is not None:
        frequency = momentum * running.double() + (1.0 - momentum) * frequency
    weight = qa * qa / frequency.clamp_min(1e-12)
    target = weight / weight.sum(1, keepdim=True).clamp_min(1e-12)
    reached = torch.zeros(num_groups, q.shape[1], dtype=torch.float64, device=q.device)
    if balance:
        log_p = torch.log(target.clamp_min(1e-12))
        reached = group_offsets(log_p, groups, num_groups, max_iter, tol, init=offsets)
        target = torch.softmax(log_p + reached[groups.long()], dim=1)
    return target.to(q.dtype), frequency.to(_acc_dtype(q.dtype)), reached
