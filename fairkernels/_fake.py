"""Fake (meta) implementations of every torch.ops.fairkernels operator (schemas: csrc/ops.cpp).

They give torch.compile / torch.export the output shapes and dtypes without running a kernel, so
a compiled function that calls the cpu/cuda backends traces as one opaque op per kernel
(fullgraph=True works). Imported by fairkernels._extension once the operators are registered.

Every output of the C++ kernels is a fresh contiguous tensor (inputs are made contiguous first),
so the fakes build contiguous outputs with new_empty; empty_like(input) would copy the strides
of a dense non-contiguous input (e.g. a transposed one) and disagree with the real op
(torch.library.opcheck checks this; tests/test_compile.py runs it on every op).
"""
from __future__ import annotations

import torch

from fairkernels.reference import _acc_dtype


def _register(name):
    return torch.library.register_fake(f"fairkernels::{name}")


@_register("fcmi_fwd")
def _fcmi_fwd(logits, groups, num_groups, deterministic):
    acc = _acc_dtype(logits.dtype)
    rows, num_clusters = logits.shape
    return (logits.new_empty((rows,), dtype=acc), logits.new_empty((num_groups, num_clusters), dtype=acc),
            logits.new_empty((), dtype=acc))


def _like(x):
    """A contiguous tensor of x's shape, dtype and device."""
    return x.new_empty(x.shape)


@_register("fcmi_bwd")
def _fcmi_bwd(logits, groups, lse, table, logc_coef, deterministic):
    return _like(logits)


@_register("fcmi_emb_fwd")
def _fcmi_emb_fwd(h, centers, groups, num_groups, tau, deterministic):
    acc = _acc_dtype(h.dtype)
    return (h.new_empty((h.shape[0],), dtype=acc), h.new_empty((num_groups, centers.shape[0]), dtype=acc),
            h.new_empty((), dtype=acc))


@_register("fcmi_emb_bwd")
def _fcmi_emb_bwd(h, centers, groups, lse, table, logc_coef, tau, deterministic):
    return _like(h), _like(centers)


@_register("histogram_fwd")
def _histogram_fwd(probs, groups, weights, num_groups, deterministic):
    return probs.new_empty((num_groups, probs.shape[1]), dtype=_acc_dtype(probs.dtype))


@_register("histogram_fwd_checked")
def _histogram_fwd_checked(probs, groups, weights, num_groups, deterministic):
    return _histogram_fwd(probs, groups, weights, num_groups, deterministic), probs.new_empty((3,), dtype=torch.long)


@_register("histogram_bwd")
def _histogram_bwd(grad_joint, groups, weights):
    return grad_joint.new_empty((groups.shape[0], grad_joint.shape[1]))


@_register("student_t_fwd")
def _student_t_fwd(z, centers, alpha):
    return z.new_empty((z.shape[0], centers.shape[0]))


@_register("student_t_bwd")
def _student_t_bwd(grad_q, q, z, centers, alpha):
    return _like(z), _like(centers)


@_register("cosine_fwd")
def _cosine_fwd(h, centers, tau):
    return h.new_empty((h.shape[0], centers.shape[0]))


@_register("cosine_bwd")
def _cosine_bwd(grad_c, c, h, centers, tau):
    return _like(h), _like(centers)


@_register("kmeans_assign")
def _kmeans_assign(x, centers):
    return x.new_empty((x.shape[0],), dtype=torch.long), x.new_empty((x.shape[0],), dtype=_acc_dtype(x.dtype))


@_register("kmeans_step")
def _kmeans_step(x, centers):
    rows, dims = x.shape
    num_clusters = centers.shape[0]
    return (x.new_empty((rows,), dtype=torch.long), x.new_empty((rows,), dtype=_acc_dtype(x.dtype)),
            x.new_empty((num_clusters, dims), dtype=torch.float64), x.new_empty((num_clusters,), dtype=torch.long))


@_register("dfc_step")
def _dfc_step(z, centers, groups, target, previous, num_groups, alpha, beta, gamma, ridge, weights_from_q):
    rows, dims = z.shape
    return (z.new_empty(()), z.new_empty(()), z.new_empty(()), z.new_empty((rows, target.shape[1])),
            z.new_empty((num_groups, dims)), _like(z), _like(centers))


@_register("group_offsets")
def _group_offsets(logits, groups, num_groups, max_iter, tol):
    return logits.new_empty((num_groups, logits.shape[1]))


@_register("dec_batch_target")
def _dec_batch_target(q, groups, running, offsets, momentum, balance, num_groups, max_iter, tol):
    return (q.new_empty(q.shape), q.new_empty((q.shape[1],), dtype=_acc_dtype(q.dtype)),
            q.new_empty((num_groups, q.shape[1]), dtype=torch.float64))


@_register("dec_batch_targets")
def _dec_batch_targets(q, groups, running, offsets, momentum, balance, num_groups, max_iter, tol):
    first = q[0]
    return (first.new_empty((sum(batch.shape[0] for batch in q), first.shape[1])),
            first.new_empty((first.shape[1],), dtype=_acc_dtype(first.dtype)),
            first.new_empty((num_groups, first.shape[1]), dtype=torch.float64))
