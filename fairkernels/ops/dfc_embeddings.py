"""The DFC clustering loss of a batch straight from the embeddings (docs/math.md §4 and §8):
Student-t assignments Q to the centroids, KL(P || Q) and gamma KL(Psi || Phi), in one call.

This is what the DFC trainer's clustering step computes. On CPU (backend "cpu", the default
there) it is one C++ kernel that returns the value and both gradients at once
(csrc/cpu/dfc_step.cpp), behind a C++ autograd node (csrc/cpu/dfc_loss.cpp): at DFC's batch
of 256 the composition of tensor ops costs more than a narrow encoder's own step, in dispatch
rather than arithmetic. Elsewhere it is the composition
of the public ops (the Student-t kernel of the chosen backend, kl_div and the fused
fairoid_term), and with backend="reference" the reference's ops throughout.
"""
from __future__ import annotations

import torch

from fairkernels import _backend, _checks, reference
from fairkernels.ops.assign import student_t_assign
from fairkernels.ops.dfc import dec_target, kl_div
from fairkernels.ops.fairoid import fairoid_term, group_means

CENTROIDS_FROM = ("target", "q")
RIDGE = 1e-6      # eq. 12 ridge: lam = RIDGE * trace(W^T W) / K (docs/math.md §8)


def own_group_products(z, centers, groups) -> torch.Tensor:
    """<z_i, c_{g_i, k}> (B x K) for per-group centers [T, K, d]: one B x (T K) product, then each
    row's own group's K columns (no loop over groups, no host sync)."""
    T, K, d = centers.shape
    products = (z @ centers.reshape(T * K, d).t()).view(-1, T, K)
    return products[torch.arange(products.shape[0], device=products.device), groups]


def own_group_student_t_logits(z, centers, groups, alpha: float) -> torch.Tensor:
    """-(alpha + 1) / 2 log(1 + |z_i - mu_{g_i,k}|^2 / alpha) (B x K) for per-group centroids
    [T, K, d]; its row softmax is Q (docs/math.md §1.1 and §8). Differentiable in z and centers."""
    cross = own_group_products(z, centers, groups)
    squared = ((z * z).sum(1, keepdim=True) - 2.0 * cross + (centers * centers).sum(2)[groups]).clamp_min(0.0)
    return -(alpha + 1.0) / 2.0 * torch.log1p(squared / alpha)


def _composed(z, centers, groups, num_groups, gamma, alpha, beta, target, previous, weights_from_q, ridge,
              backend):
    if centers.dim() == 3:
        q = torch.softmax(own_group_student_t_logits(z, centers, groups, alpha), dim=1)
    elif backend == "reference":
        q = reference.student_t_assign(z, centers, alpha)
    else:
        q = student_t_assign(z, centers, alpha, backend=backend, check_inputs=False)
    l_cl = kl_div(target, q, backend=backend, check_inputs=False)
    if gamma == 0.0:
        fairoids, _ = group_means(z.detach(), groups, num_groups, previous)
        return l_cl, l_cl, torch.zeros((), dtype=l_cl.dtype, device=z.device), fairoids, q.detach()
    weights = q if weights_from_q else target
    if backend == "reference":
        centroids = reference.batch_centroids(weights, z, ridge)
        fairoids, present = reference.fairoids(z, groups, num_groups, previous)
        phi = reference.fairness_matrix(centroids, fairoids, alpha, present)
        l_fr = reference.fairoid_loss(reference.fairoid_target(phi, beta, present=present), phi)
        fairoids = fairoids.detach()
    else:
        l_fr, fairoids = fairoid_term(weights, z, groups, num_groups, alpha, beta, previous, ridge,
                                      check_inputs=False)
    l_fr = l_fr.to(l_cl.dtype)
    return l_cl + gamma * l_fr, l_cl, l_fr, fairoids, q.detach()


def dfc_loss_from_embeddings(z, centers, groups, num_groups=None, gamma=1.0, alpha=1.0, beta=1000.0, target=None,
                             previous_fairoids=None, *, centroids_from="target", ridge=RIDGE, backend="auto",
                             check_inputs=True):
    """L = KL(P||Q) + gamma KL(Psi||Phi) of docs/math.md §4 from the embeddings
    -> (loss, l_cl, l_fr, fairoids [T, d], q [B, K]).

    z: B x d embeddings; centers: [K, d] shared Student-t centroids or [T, K, d] per-group ones
    (row i uses centers[groups[i]], docs/math.md §8); both get gradients. target: the DEC target
    P of these rows (a constant; None computes it from this batch's Q). centroids_from: "target"
    fits the eq. 12 batch centroids to P, as the paper does, "q" to the soft Q (then the fairness
    term's gradient also flows through Q). previous_fairoids: fairoids kept for groups absent
    from the batch. gamma = 0 is DEC (no fairness term; l_fr = 0). q is returned detached (the
    trainer builds the next DEC target from it). Same value and gradients as
    student_t_assign -> kl_div -> dfc_loss's fairness term (float64 inside on CPU)."""
    _checks.check_matrix(z, "z")
    _checks.check_tensor(centers, "centers", 3 if isinstance(centers, torch.Tensor) and centers.dim() == 3 else 2)
    if centers.shape[-2] < 1:
        raise ValueError(f"centers must hold at least one centroid, got shape {tuple(centers.shape)}")
    if centers.shape[-1] != z.shape[1]:
        raise ValueError(f"centers have {centers.shape[-1]} columns but z has {z.shape[1]}")
    _checks.check_same_device("z", z, "centers", centers)
    num_groups = _checks.check_groups(groups, z.shape[0], z, num_groups, check_inputs)
    if centers.dim() == 3 and centers.shape[0] != num_groups:
        raise ValueError(f"per-group centers must have num_groups={num_groups} rows, got {centers.shape[0]}")
    K = centers.shape[-2]
    gamma = _checks.check_real(gamma, "gamma")
    alpha = _checks.check_positive(alpha, "alpha")
    beta = _checks.check_positive(beta, "beta")
    ridge = _checks.check_positive(ridge, "ridge")
    if centroids_from not in CENTROIDS_FROM:
        raise ValueError(f"centroids_from must be one of {CENTROIDS_FROM}, got {centroids_from!r}")
    if previous_fairoids is not None and tuple(previous_fairoids.shape) != (num_groups, z.shape[1]):
        raise ValueError(f"previous_fairoids must have shape {(num_groups, z.shape[1])}, "
                         f"got {tuple(previous_fairoids.shape)}")
    if check_inputs:
        _checks.check_finite(z, "z")
        _checks.check_finite(centers, "centers")
    groups = groups.long()
    if target is None:
        with torch.no_grad():
            q = torch.softmax(own_group_student_t_logits(z, centers, groups, alpha), dim=1) if centers.dim() == 3 else \
                student_t_assign(z, centers, alpha, backend=backend, check_inputs=False)
            target = dec_target(q, backend=backend, check_inputs=False)
    else:
        _checks.check_matrix(target, "target")
        if tuple(target.shape) != (z.shape[0], K):
            raise ValueError(f"target must have shape {(z.shape[0], K)}, got {tuple(target.shape)}")
        _checks.check_same_device("z", z, "target", target)
        if check_inputs:
            _checks.check_finite(target, "target")
    target = target.detach()
    return dfc_loss_unchecked(z, centers, groups, num_groups, gamma, alpha, beta, target, previous_fairoids,
                              centroids_from == "q", ridge, backend)


def dfc_loss_kernel(backend: str, device: torch.device, dtype: torch.dtype):
    """The C++ op dfc_loss_unchecked calls for embeddings and centroids of this device and dtype
    (None where it composes tensor ops instead), for a caller that resolves it once and calls it
    every step: op(z, centers, groups, target, previous_fairoids, num_groups, alpha, beta, gamma,
    ridge, weights_from_q) -> (loss, l_cl, l_fr, q, fairoids), the arguments as for
    dfc_loss_unchecked (any strides: the kernel reads them as they are). In a training loop the
    per-call backend choice and contiguity checks ran 20-50 us a step on a 2-core CPU (Python
    that is cold there, about 2 us warm), more than a tenth of the loss itself."""
    if _backend.choose(backend, device, dtype, "dfc_embeddings") == "cpu" and dtype in _backend.CPU_DTYPES:
        return torch.ops.fairkernels.dfc_loss.default
    return None


def dfc_loss_unchecked(z, centers, groups, num_groups: int, gamma: float, alpha: float, beta: float, target,
                       previous_fairoids, weights_from_q: bool, ridge: float, backend: str):
    """dfc_loss_from_embeddings without its argument checks, for a caller that has validated
    them once (the DFC trainer, every step): groups int64, target [B, K] given and detached,
    previous_fairoids [T, d] or None, num_groups an int. Same outputs."""
    chosen = _backend.choose(backend, z.device, z.dtype, "dfc_embeddings")
    if chosen == "cpu" and centers.dtype in _backend.CPU_DTYPES:
        # dfc_step returns the value and both gradients; its autograd node (csrc/cpu/dfc_loss.cpp)
        # only scales them, in C++, with no Python autograd.Function around it.
        loss, l_cl, l_fr, q, fairoids = torch.ops.fairkernels.dfc_loss(
            z.contiguous(), centers.contiguous(), groups, target.contiguous(), previous_fairoids, num_groups, alpha,
            beta, gamma, ridge, weights_from_q)
        return loss, l_cl, l_fr, fairoids, q
    return _composed(z, centers, groups, num_groups, gamma, alpha, beta, target, previous_fairoids, weights_from_q,
                     ridge, backend)
