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


@triton.jit(do_not_specialize=["N", "num_row_tiles"])
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
    REG_JOINT: tl.constexpr,      # K <= BLOCK_K and T <= BLOCK_T: joint in registers, flushed once
    ATOMIC: tl.constexpr,
):
    """J_tk = sum_{i: g_i = t} w_i P_ik  (docs/math.md §2.1)."""
    JOINT_slot = cm.slot(JOINT_ptr, T * K, ATOMIC)
    joint = tl.zeros([BLOCK_T, BLOCK_K], dtype=ACC)
    for tile in range(tl.program_id(0), num_row_tiles, tl.num_programs(0)):
        rows, row_mask = cm.row_tile(tile, N, BLOCK_N)
        groups = tl.load(G_ptr + rows, mask=row_mask, other=0)
        if HAS_WEIGHTS:
            weights = tl.load(W_ptr + rows, mask=row_mask, other=0.0).to(ACC)
        for k_start in range(0, K, BLOCK_K):
            offs_k, k_mask = cm.col_tile(k_start, K, BLOCK_K)
            values = cm.load_rows(P_ptr + rows[:, None] * P_row_stride, offs_k, row_mask, k_mask, 0.0, ACC)
            if HAS_WEIGHTS:
                values = values * weights[:, None]
            if REG_JOINT:
                onehot, offs_t = cm.group_onehot(groups, row_mask, 0, BLOCK_T)
                joint = tl.dot(onehot.to(ACC), values, joint, input_precision="ieee", out_dtype=ACC)
            else:
                cm.add_joint_tile(JOINT_slot, values, groups, row_mask, offs_k, k_mask, K, T, BLOCK_T, ATOMIC)
    if REG_JOINT:
        cm.flush_joint(JOINT_slot, joint, K, T, BLOCK_T, BLOCK_K, ATOMIC)


@triton.jit(do_not_specialize=["N", "num_row_tiles"])
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
    for tile in range(tl.program_id(0), num_row_tiles, tl.num_programs(0)):
        rows, row_mask = cm.row_tile(tile, N, BLOCK_N)
        groups = tl.load(G_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        for k_start in range(0, K, BLOCK_K):
            offs_k = k_start + tl.arange(0, BLOCK_K)
            mask = row_mask[:, None] & (offs_k < K)[None, :]
            grad = tl.load(GJ_ptr + groups[:, None] * K + offs_k[None, :], mask=mask, other=0.0)
            if HAS_WEIGHTS:
                grad = grad * tl.load(W_ptr + rows, mask=row_mask, other=0.0).to(grad.dtype)[:, None]
            tl.store(GRAD_ptr + rows[:, None] * K + offs_k[None, :], grad, mask=mask)


@torch.library.custom_op("fairkernels::triton_histogram_fwd", mutates_args=())
def histogram_fwd(probs: torch.Tensor, groups: torch.Tensor, weights: Optional[torch.Tensor],
                  num_groups: int, deterministic: bool = False) -> torch.Tensor:
    """-> joint [T, K] acc."""
    probs, groups = probs.contiguous(), groups.contiguous()
    acc = cm.acc_dtype(probs.dtype)
    num_rows, num_cols = probs.shape
    cfg = cm.row_config(num_cols, probs.dtype)
    tiles = triton.cdiv(num_rows, cfg.block_n)
    programs = cm.num_programs(tiles, probs.device, num_groups * num_cols, deterministic)
    joint = torch.zeros(cm.partial_slots(programs, deterministic), num_groups, num_cols, dtype=acc,
                        device=probs.device)
    has_weights = weights is not None
    weights = weights.contiguous() if has_weights else probs
    cm.launch(_histogram_fwd_kernel, programs, probs, probs.stride(0), groups, weights, joint,
              num_rows, num_cols, num_groups, tiles, HAS_WEIGHTS=has_weights, ACC=cm.tl_acc(probs.dtype),
              BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_T=cm.BLOCK_T,
              REG_JOINT=cfg.single and num_groups <= cm.BLOCK_T, ATOMIC=not deterministic,
              num_warps=cm.float64_warps(cfg.num_warps, probs.dtype))
    return joint.sum(0)


@histogram_fwd.register_fake
def _(probs, groups, weights, num_groups, deterministic=False):
    return probs.new_empty(num_groups, probs.shape[1], dtype=cm.acc_dtype(probs.dtype))


@torch.library.custom_op("fairkernels::triton_histogram_bwd", mutates_args=())
def histogram_bwd(grad_joint: torch.Tensor, groups: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """-> grad_probs [N, K] in grad_joint's dtype."""
    grad_joint, groups = grad_joint.contiguous(), groups.contiguous()
    num_rows, num_cols = groups.shape[0], grad_joint.shape[1]
    cfg = cm.row_config(num_cols, grad_joint.dtype)
    tiles = triton.cdiv(num_rows, cfg.block_n)
    grad = torch.empty(num_rows, num_cols, dtype=grad_joint.dtype, device=grad_joint.device)
    has_weights = weights is not None
    cm.launch(_histogram_bwd_kernel, cm.num_programs(tiles, grad.device), grad_joint, groups,
              weights.contiguous() if has_weights else grad_joint, grad, num_rows, num_cols, tiles,
              HAS_WEIGHTS=has_weights, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps)
    return grad


@histogram_bwd.register_fake
def _(grad_joint, groups, weights):
    return grad_joint.new_empty(groups.shape[0], grad_joint.shape[1])
