"""FCMI loss (docs/math.md §3, 6): fcmi_terms, fcmi_loss, fcmi_loss_from_embeddings.

The fused path never holds an N x K intermediate: the forward kernel reads the logits once and
returns the row logsumexp (N floats) plus the sufficient statistics (joint T x K, entropy sum);
the small T x K algebra below turns them into the losses; the backward kernel reads the logits
once more and writes the gradient. With a process group the statistics are all-reduced, so the
loss and gradient equal those of the single-process op on the concatenated batch (docs/math.md §6).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fairkernels import _backend, _checks, reference
from fairkernels.ops._dispatch import kernels
from fairkernels.ops.torch_kernels import normalize_backward
from fairkernels.reference import LOG_EPS, NORM_EPS

# Rows per chunk in the chunked embedding path (CPU / reference backends): bounds the
# chunk x K logits tile to ~16 MB of float32 whatever N is.
EMBEDDING_CHUNK_ELEMENTS = 1 << 22


def _all_reduce(tensor: torch.Tensor, process_group) -> torch.Tensor:
    import torch.distributed as dist
    if process_group is not None:
        dist.all_reduce(tensor, group=None if process_group is True else process_group)
    return tensor


def _losses_from_statistics(joint, ent_sum, num_rows: float, process_group):
    """T x K algebra of docs/math.md §3 on (possibly all-reduced) statistics.

    The group sizes are the joint's row sums (each row's soft assignment sums to one, so
    sum_k J_tk = n_t): the forward kernel's own pass counts them, with no extra pass over the
    groups, and p_t is then exactly the marginal of p_tk, so I(G; C) >= 0 also in rounding.

    Returns l_clu, l_fair (acc dtype), and what the backward needs: log p_k, log p_tk, N (a
    Python float, or a 0-dim tensor when N is the all-reduced global batch size)."""
    num_groups, num_clusters = joint.shape
    if process_group is not None:
        # new_full fills on the device (no host-to-device copy, no sync)
        packed = torch.cat([joint.reshape(-1), ent_sum.reshape(1), joint.new_full((1,), num_rows)])
        packed = _all_reduce(packed, process_group)
        joint = packed[: num_groups * num_clusters].view(num_groups, num_clusters)
        ent_sum, num_rows = packed[-2], packed[-1]
    p_joint = joint / num_rows                               # p_tk
    p_cluster = p_joint.sum(0)                               # p_k
    p_group = p_joint.sum(1)                                 # p_t = n_t / N
    log_p_joint = torch.log(p_joint.clamp_min(LOG_EPS))
    log_p_cluster = torch.log(p_cluster.clamp_min(LOG_EPS))
    log_p_group = torch.log(p_group.clamp_min(LOG_EPS))
    neg_entropy = torch.where(p_cluster > 0, p_cluster * log_p_cluster, torch.zeros_like(p_cluster)).sum()
    l_clu = neg_entropy - ent_sum / num_rows                 # -H(C) + H(C|X)
    mi_terms = p_joint * (log_p_joint - log_p_group[:, None] - log_p_cluster[None, :])
    l_fair = torch.where(p_joint > 0, mi_terms, torch.zeros_like(mi_terms)).sum()
    return l_clu, l_fair, log_p_cluster, log_p_joint, num_rows


def _gradient_table(grad_clu, grad_fair, log_p_cluster, log_p_joint, num_rows):
    """docs/math.md §3: G_ik = table[g_i, k] - logc_coef * log c_ik, with alpha, beta the upstream grads."""
    table = (grad_clu * log_p_cluster[None, :] + grad_fair * (log_p_joint - log_p_cluster[None, :])) / num_rows
    return table.contiguous(), (grad_clu / num_rows).reshape(())


def _raise_if_not_finite(ent_sum, named_inputs):
    """The fused input check of the cpu kernels: ent_sum is NaN when an input value is +-inf or
    NaN (csrc/cpu/kernels.h). Reading it costs nothing on CPU; only then are the inputs scanned,
    to name the one at fault."""
    if not bool(torch.isfinite(ent_sum)):
        for name, tensor in named_inputs:
            _checks.check_finite(tensor, name)


class FcmiFunction(torch.autograd.Function):
    """(logits, groups) -> (L_clu, L_fair) through the backend's fcmi_fwd / fcmi_bwd kernels.

    fused_check: the backend's kernel flags non-finite logits (see _raise_if_not_finite)."""

    @staticmethod
    def forward(ctx, logits, groups, num_groups, backend, deterministic, process_group, fused_check=False):
        k = kernels(backend)
        lse, joint, ent_sum = k.fcmi_fwd(logits, groups, num_groups, deterministic)
        if fused_check:
            _raise_if_not_finite(ent_sum, (("logits", logits),))
        l_clu, l_fair, log_p_cluster, log_p_joint, num_rows = _losses_from_statistics(
            joint, ent_sum, float(logits.shape[0]), process_group)
        ctx.save_for_backward(logits, groups, lse, log_p_cluster, log_p_joint)
        ctx.num_rows, ctx.backend, ctx.deterministic = num_rows, backend, deterministic
        return l_clu.to(logits.dtype), l_fair.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_clu, grad_fair):
        logits, groups, lse, log_p_cluster, log_p_joint = ctx.saved_tensors
        acc = lse.dtype
        table, logc_coef = _gradient_table(grad_clu.to(acc), grad_fair.to(acc), log_p_cluster,
                                           log_p_joint, ctx.num_rows)
        grad = kernels(ctx.backend).fcmi_bwd(logits, groups, lse, table, logc_coef, ctx.deterministic)
        return grad, None, None, None, None, None, None


def _embedding_chunks(num_rows, num_clusters):
    step = max(1, EMBEDDING_CHUNK_ELEMENTS // max(num_clusters, 1))
    return [(start, min(start + step, num_rows)) for start in range(0, num_rows, step)]


class FcmiEmbeddingFunction(torch.autograd.Function):
    """(h, centers, groups) -> (L_clu, L_fair) with cosine logits (docs/math.md §1.2 + 3).

    Uses the backend's fused fcmi_emb_fwd/_bwd when it has them (Triton: logits live in
    registers only); otherwise it streams row chunks through fcmi_fwd/_bwd, recomputing each
    chunk's logits in the backward, so extra memory is O(chunk K + N + T K + K d)."""

    @staticmethod
    def forward(ctx, h, centers, groups, num_groups, tau, backend, deterministic, process_group,
                fused_check=False):
        k = kernels(backend)
        if hasattr(k, "fcmi_emb_fwd"):
            lse, joint, ent_sum = k.fcmi_emb_fwd(h, centers, groups, num_groups, tau, deterministic)
        else:
            lse, joint, ent_sum = _chunked_emb_fwd(k, h, centers, groups, num_groups, tau, deterministic)
        if fused_check:
            _raise_if_not_finite(ent_sum, (("h", h), ("centers", centers)))
        l_clu, l_fair, log_p_cluster, log_p_joint, num_rows = _losses_from_statistics(
            joint, ent_sum, float(h.shape[0]), process_group)
        ctx.save_for_backward(h, centers, groups, lse, log_p_cluster, log_p_joint)
        ctx.num_rows, ctx.tau, ctx.backend, ctx.deterministic = num_rows, tau, backend, deterministic
        return l_clu.to(h.dtype), l_fair.to(h.dtype)

    @staticmethod
    def backward(ctx, grad_clu, grad_fair):
        h, centers, groups, lse, log_p_cluster, log_p_joint = ctx.saved_tensors
        acc = lse.dtype
        table, logc_coef = _gradient_table(grad_clu.to(acc), grad_fair.to(acc), log_p_cluster,
                                           log_p_joint, ctx.num_rows)
        k = kernels(ctx.backend)
        if hasattr(k, "fcmi_emb_bwd"):
            grad_h, grad_centers = k.fcmi_emb_bwd(h, centers, groups, lse, table, logc_coef, ctx.tau,
                                                  ctx.deterministic)
        else:
            grad_h, grad_centers = _chunked_emb_bwd(k, h, centers, groups, lse, table, logc_coef,
                                                    ctx.tau, ctx.deterministic)
        return grad_h, grad_centers, None, None, None, None, None, None, None


def _unit_rows(x, acc):
    return F.normalize(x.to(acc), dim=1, eps=NORM_EPS)


def _chunked_emb_fwd(k, h, centers, groups, num_groups, tau, deterministic):
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    centers_unit = _unit_rows(centers, acc)
    lse = torch.empty(h.shape[0], dtype=acc, device=h.device)
    joint = torch.zeros(num_groups, centers.shape[0], dtype=acc, device=h.device)
    ent_sum = torch.zeros((), dtype=acc, device=h.device)
    for start, stop in _embedding_chunks(h.shape[0], centers.shape[0]):
        logits = _unit_rows(h[start:stop], acc) @ centers_unit.t() / tau
        chunk_lse, chunk_joint, chunk_ent = k.fcmi_fwd(logits, groups[start:stop], num_groups, deterministic)
        lse[start:stop] = chunk_lse
        joint += chunk_joint
        ent_sum += chunk_ent
    return lse, joint, ent_sum


def _chunked_emb_bwd(k, h, centers, groups, lse, table, logc_coef, tau, deterministic):
    acc = lse.dtype
    centers_acc = centers.to(acc)
    centers_unit = _unit_rows(centers, acc)
    grad_h = torch.empty_like(h)
    grad_centers_unit = torch.zeros_like(centers_unit)
    for start, stop in _embedding_chunks(h.shape[0], centers.shape[0]):
        h_chunk = h[start:stop].to(acc)
        h_unit = _unit_rows(h_chunk, acc)
        logits = h_unit @ centers_unit.t() / tau
        grad_s = k.fcmi_bwd(logits, groups[start:stop], lse[start:stop], table, logc_coef,
                            deterministic) / tau
        grad_h[start:stop] = normalize_backward(h_chunk, h_unit, grad_s @ centers_unit).to(h.dtype)
        grad_centers_unit += grad_s.t() @ h_unit
    grad_centers = normalize_backward(centers_acc, centers_unit, grad_centers_unit)
    return grad_h, grad_centers.to(centers.dtype)


# --------------------------------------------------------------------------- public API
def _validate_logits(logits, groups, num_groups, backend, check_inputs):
    """Checks, backend choice -> (num_groups, chosen backend, fused_check)."""
    _checks.check_matrix(logits, "logits")
    num_groups = _checks.check_groups(groups, logits.shape[0], logits, num_groups, check_values=False)
    chosen = _backend.choose(backend, logits.device, logits.dtype, "fcmi")
    fused_check = _checks.fused_checks(chosen, check_inputs)
    if check_inputs and not fused_check:
        _checks.check_group_values(groups, num_groups)
        _checks.check_finite(logits, "logits")
    return num_groups, chosen, fused_check


def fcmi_terms(logits, groups, num_groups=None, *, backend="auto", deterministic=False,
               process_group=None, check_inputs=True):
    """(L_clu, L_fair) of FCMI (docs/math.md §3) for logits (N x K) and protected groups (N,).

    L_clu = -H(C) + H(C|X) and L_fair = I(G;C), with c = softmax(logits). Both are 0-dim
    tensors in the logits' dtype. num_groups=None infers max(groups) + 1 (a device sync).
    process_group (a torch.distributed group, or True for the default group) all-reduces the
    sufficient statistics so every rank gets the loss of the global batch (docs/math.md §6).
    The cpu backend is always deterministic; Triton is with deterministic=True.
    check_inputs: reject non-finite logits and group ids outside [0, num_groups). On the cpu
    backend the kernels do this inside their first pass (no extra pass over the data).
    """
    num_groups, chosen, fused_check = _validate_logits(logits, groups, num_groups, backend, check_inputs)
    if chosen == "reference" and process_group is None:
        return reference.fcmi_terms(logits, groups, num_groups)
    return FcmiFunction.apply(logits.contiguous(), groups.contiguous(), num_groups, chosen,
                              bool(deterministic), process_group, fused_check)


def fcmi_loss(logits, groups, num_groups=None, alpha=0.04, beta=0.2, *, backend="auto",
              deterministic=False, process_group=None, check_inputs=True):
    """alpha * L_clu + beta * L_fair (docs/math.md §3) as a 0-dim tensor; see fcmi_terms.

    Example:
        >>> loss = fairkernels.fcmi_loss(logits, groups)
        >>> loss.backward()
    """
    alpha = _checks.check_real(alpha, "alpha")
    beta = _checks.check_real(beta, "beta")
    l_clu, l_fair = fcmi_terms(logits, groups, num_groups, backend=backend, deterministic=deterministic,
                               process_group=process_group, check_inputs=check_inputs)
    return alpha * l_clu + beta * l_fair


def fcmi_terms_from_embeddings(h, centers, groups, num_groups=None, tau=0.1, *, backend="auto",
                               deterministic=False, process_group=None, check_inputs=True):
    """(L_clu, L_fair) with logits = cos(h, centers) / tau, never materialising N x K."""
    _checks.check_matrix(h, "h")
    _checks.check_matrix(centers, "centers")
    if centers.shape[1] != h.shape[1]:
        raise ValueError(f"centers has {centers.shape[1]} columns but h has {h.shape[1]}")
    if centers.dtype != h.dtype:
        raise TypeError(f"centers has dtype {centers.dtype} but h has {h.dtype}")
    _checks.check_same_device("h", h, "centers", centers)
    tau = _checks.check_positive(tau, "tau")
    num_groups = _checks.check_groups(groups, h.shape[0], h, num_groups, check_values=False)
    chosen = _backend.choose(backend, h.device, h.dtype, "fcmi_embeddings")
    fused_check = _checks.fused_checks(chosen, check_inputs)
    if check_inputs and not fused_check:
        _checks.check_group_values(groups, num_groups)
        _checks.check_finite(h, "h")
        _checks.check_finite(centers, "centers")
    if chosen == "reference" and process_group is None:
        return reference.fcmi_terms(reference.cosine_logits(h, centers, tau), groups, num_groups)
    return FcmiEmbeddingFunction.apply(h.contiguous(), centers.contiguous(), groups.contiguous(), num_groups,
                                       tau, chosen, bool(deterministic), process_group, fused_check)


def fcmi_loss_from_embeddings(h, centers, groups, num_groups=None, tau=0.1, alpha=0.04, beta=0.2, *,
                              backend="auto", deterministic=False, process_group=None, check_inputs=True):
    """alpha * L_clu + beta * L_fair with c = softmax(cos(h, centers) / tau) (docs/math.md §1.2 + 3).

    Extra memory is O(N + T K + K d): the N x K logits are never materialised (the fused
    Triton kernel keeps them in registers; the CPU path streams row chunks)."""
    alpha = _checks.check_real(alpha, "alpha")
    beta = _checks.check_real(beta, "beta")
    l_clu, l_fair = fcmi_terms_from_embeddings(h, centers, groups, num_groups, tau, backend=backend,
                                               deterministic=deterministic, process_group=process_group,
                                               check_inputs=check_inputs)
    return alpha * l_clu + beta * l_fair
