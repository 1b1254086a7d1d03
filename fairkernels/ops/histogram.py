"""Group x cluster joint histogram (docs/math.md §2.1) and mutual information I(G;C) (docs/math.md §2.2)."""
from __future__ import annotations

import torch

from fairkernels import _backend, _checks, reference
from fairkernels.ops._dispatch import kernels


def _check_values(probs, weights):
    """The value checks of joint_histogram (docs/math.md §7): finite weights, finite non-negative probs."""
    if weights is not None:
        _checks.check_finite(weights, "weights")
    _checks.check_finite(probs, "probs")
    _checks.check_nonnegative(probs, "probs")


class JointHistogramFunction(torch.autograd.Function):
    """fused_check: the backend's histogram_fwd_checked finds bad values in the pass that builds
    the table (the cpu kernels); only when it flags some are the inputs scanned to name them."""

    @staticmethod
    def forward(ctx, probs, groups, weights, num_groups, backend, deterministic, fused_check=False):
        k = kernels(backend)
        if fused_check:
            joint, flags = k.histogram_fwd_checked(probs, groups, weights, num_groups, deterministic)
            if bool(flags.any()):
                _check_values(probs, weights)
        else:
            joint = k.histogram_fwd(probs, groups, weights, num_groups, deterministic)
        ctx.save_for_backward(probs, groups, weights)
        ctx.backend = backend
        return joint

    @staticmethod
    def backward(ctx, grad_joint):
        probs, groups, weights = ctx.saved_tensors
        grad_probs = grad_weights = None
        if ctx.needs_input_grad[0]:
            grad_probs = kernels(ctx.backend).histogram_bwd(grad_joint.contiguous(), groups, weights)
            grad_probs = grad_probs.to(probs.dtype)
        if ctx.needs_input_grad[2]:
            # dL/dw_i = sum_k dL/dJ_{g_i k} P_ik (rarely needed; plain torch is fine here)
            grad_weights = (grad_joint[groups.long()] * probs.to(grad_joint.dtype)).sum(1).to(weights.dtype)
        return grad_probs, None, grad_weights, None, None, None, None


def joint_histogram(probs, groups, num_groups=None, weights=None, *, backend="auto", deterministic=False,
                    check_inputs=True):
    """J_tk = sum_{i: g_i = t} w_i P_ik (docs/math.md §2.1), a T x K float32 table (float64 for float64
    probs). Differentiable in probs (and weights). The cpu backend is deterministic; Triton
    is with deterministic=True.

    check_inputs: reject group ids outside [0, num_groups), non-finite weights and non-finite or
    negative probs. On the cpu backend the kernel checks them in the pass that builds the table."""
    _checks.check_matrix(probs, "probs")
    num_groups = _checks.check_groups(groups, probs.shape[0], probs, num_groups, check_values=False)
    _checks.check_weights(weights, probs.shape[0], probs)
    chosen = _backend.choose(backend, probs.device, probs.dtype, "histogram")
    fused_check = _checks.fused_checks(chosen, check_inputs)
    if check_inputs and not fused_check:
        _checks.check_group_values(groups, num_groups)
        _check_values(probs, weights)
    if chosen == "reference":
        return reference.joint_histogram(probs, groups, num_groups, weights)
    return JointHistogramFunction.apply(probs.contiguous(), groups.contiguous(),
                                        None if weights is None else weights.contiguous(), num_groups, chosen,
                                        bool(deterministic), fused_check)


def mutual_information(joint, *, check_inputs=True):
    """I(G;C) of a non-negative T x K joint table (docs/math.md §2.2), normalised internally.

    0 log 0 = 0 in the value; the gradient uses eps-floored logs, so it is finite for any
    non-negative table with a positive sum. O(T K): one implementation serves every backend."""
    _checks.check_matrix(joint, "joint")
    if check_inputs and not _checks.tracing():
        _checks.check_finite(joint, "joint")
        if bool((joint < 0).any()):
            raise ValueError("joint must be non-negative")
        if not bool(joint.sum() > 0):
            raise ValueError("joint must have a positive sum")
    return reference.mutual_information(joint)
