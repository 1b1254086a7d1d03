"""Triton kernels of the group x cluster joint histogram (docs/math.md §2.1).

Forward: each program reduces its row tiles per group with a one-hot matmul before touching
memory (_common.add_joint_tile), so the table sees one update per (group, cluster) per tile,
not one global atomic per element; deterministic=True keeps a private T x K slot per program
(P x T x K floats) reduced in a fixed order. Backward: a gather, dL/dP_ik = w_i dL/dJ_{g_i k}.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fairkernels.triton import _common as cm


@triton.jit
def _histogram_fwd_kernel(
    P_ptr,            # probs [N, K]
    P_row_stride,
    G_ptr,            # groups [N], int32 or int64
    W_ptr,            # weights [N] (read only when HAS_WEIGHTS)
    JOINT_ptr,        # out: [slots, T, K] acc
    N, K, T,
    num_row_tiles,
    HAS_WEIGHTS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    """J_tk = sum_{i: g_i = t} w_i P_ik  (docs/math.md §2.1)."""
    pid = tl.program_id(0)
    if ATOMIC:  # one table shared by all programs
        JOINT_slot = JOINT_ptr
    else:  # this program's private slot
        JOINT_slot = JOINT_ptr + pid.to(tl.int64) * T * K
    for tile in range(pid, num_row_tiles, tl.num_programs(0)):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = offs_n < N
        rows = offs_n.to(tl.int64)
        groups = tl.load(G_ptr + rows, mask=row_mask, other=0)
        if HAS_WEIGHTS:
            weights = tl.load(W_ptr + rows, mask=row_mask, other=0.0).to(ACC)
        for k_start in range(0, K, BLOCK_K):
            offs_k = k_start + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            values = tl.load(P_ptr + rows[:, None] * P_row_stride + offs_k[None, :],
                             mask=row_mask[:, None] & k_mask[None, :], other=0.0).to(ACC)
            if HAS_WEIGHTS:
                values = values * weights[:, None]
            cm.add_joint_tile(JOINT_slot, values, groups, row_mask, offs_k, k_mask, K, T, BLOCK_T, ATOMIC)


@triton.jit
def _histogram_bwd_kernel(
    GJ_ptr,           # dL/dJ [T, K] contiguous
    G_ptr,            # groups [N]
    W_ptr,            # weights [N] (HAS_WEIGHTS)
    GRAD_ptr,         # out: [N, K] contiguous, GJ's dtype
    N, K,
    num_row_tiles,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dL/dP_ik = w_i dL/dJ_{g_i k}  (docs/math.md §2.1)."""
    pid = tl.program_id(0)
    for tile in range(pid, num_row_tiles, tl.num_programs(0)):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = offs_n < N
        rows = offs_n.to(tl.int64)
        groups = tl.load(G_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        for k_start in range(0, K, BLOCK_K):
            offs_k = k_start + tl.arange(0, BLOCK_K)
            mask = row_mask[:, None] & (offs_k < K)[None, :]
            grad = tl.load(GJ_ptr + groups[:, None] * K + offs_k[None, :], mask=mask, other=0.0)
            if HAS_WEIGHTS:
                grad = grad * tl.load(W_ptr + rows, mask=row_mask, other=0.0).to(grad.dtype)[:, None]
            tl.store(GRAD_ptr + rows[:, None] * K + offs_k[None, :], grad, mask=mask)


def _row_tiles(num_rows, num_cols):
    blk_k = cm.block_k(num_cols)
    blk_n = cm.block_n(blk_k)
    return blk_n, blk_k, triton.cdiv(num_rows, blk_n)


@torch.library.custom_op("fairkernels::triton_histogram_fwd", mutates_args=())
def histogram_fwd(probs: torch.Tensor, groups: torch.Tensor, weights: Optional[torch.Tensor],
                  num_groups: int, deterministic: bool = False) -> torch.Tensor:
    """-> joint [T, K] acc."""
    probs, groups = probs.contiguous(), groups.contiguous()
    acc = cm.acc_dtype(probs.dtype)
    num_rows, num_cols = probs.shape
    blk_n, blk_k, tiles = _row_tiles(num_rows, num_cols)
    programs = cm.num_programs(tiles, probs.device, num_groups * num_cols, deterministic)
    joint = torch.zeros(cm.partial_slots(programs, deterministic), num_groups, num_cols, dtype=acc,
                        device=probs.device)
    has_weights = weights is not None
    weights = weights.contiguous() if has_weights else probs
    _histogram_fwd_kernel[(programs,)](
        probs, probs.stride(0), groups, weights, joint, num_rows, num_cols, num_groups, tiles,
        HAS_WEIGHTS=has_weights, ACC=cm.tl_acc(probs.dtype), BLOCK_N=blk_n, BLOCK_K=blk_k,
        BLOCK_T=cm.BLOCK_T, ATOMIC=not deterministic)
    return joint.sum(0)


@histogram_fwd.register_fake
def _(probs, groups, weights, num_groups, deterministic=False):
    return probs.new_empty(num_groups, probs.shape[1], dtype=cm.acc_dtype(probs.dtype))


@torch.library.custom_op("fairkernels::triton_histogram_bwd", mutates_args=())
def histogram_bwd(grad_joint: torch.Tensor, groups: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """-> grad_probs [N, K] in grad_joint's dtype."""
    grad_joint, groups = grad_joint.contiguous(), groups.contiguous()
    num_rows, num_cols = groups.shape[0], grad_joint.shape[1]
    blk_n, blk_k, tiles = _row_tiles(num_rows, num_cols)
    grad = torch.empty(num_rows, num_cols, dtype=grad_joint.dtype, device=grad_joint.device)
    has_weights = weights is not None
    _histogram_bwd_kernel[(cm.num_programs(tiles, grad.device),)](
        grad_joint, groups, weights.contiguous() if has_weights else grad_joint, grad, num_rows, num_cols, tiles,
        HAS_WEIGHTS=has_weights, BLOCK_N=blk_n, BLOCK_K=blk_k)
    return grad


@histogram_bwd.register_fake
def _(grad_joint, groups, weights):
    return grad_joint.new_empty(groups.shape[0], grad_joint.shape[1])
