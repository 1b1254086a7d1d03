"""Triton kernel of the k-means assignment step: fused squared distance + argmin, no N x K
matrix in memory (distances live in [BLOCK_N, BLOCK_K] register tiles)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fairkernels.ops import torch_kernels
from fairkernels.triton import _common as cm


@triton.jit
def _kmeans_assign_kernel(
    X_ptr,            # points [N, D]
    X_row_stride,
    C_ptr,            # centers [K, D] contiguous, X's dtype
    LABEL_ptr,        # out: [N] int64
    DIST_ptr,         # out: [N] acc, min_k d_ik
    N, K, D,
    num_row_tiles,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """label_i = argmin_k d_ik (lowest k on ties), d_ik = max(|x_i|^2 + |c_k|^2 - 2 x_i.c_k, 0)."""
    pid = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    for tile in range(pid, num_row_tiles, tl.num_programs(0)):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = offs_n < N
        rows = offs_n.to(tl.int64)
        x = tl.load(X_ptr + rows[:, None] * X_row_stride + offs_d[None, :],
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0).to(ACC)
        x_sq = tl.sum(x * x, axis=1)
        x_dot = x.to(DOT)
        best_dist = tl.full([BLOCK_N], float("inf"), dtype=ACC)
        best_label = tl.zeros([BLOCK_N], dtype=tl.int64)
        for k_start in range(0, K, BLOCK_K):
            offs_k = k_start + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            centers = tl.load(C_ptr + offs_k.to(tl.int64)[:, None] * D + offs_d[None, :],
                              mask=k_mask[:, None] & d_mask[None, :], other=0.0)
            centers_acc = centers.to(ACC)
            dots = tl.dot(x_dot, tl.trans(centers.to(DOT)), input_precision="ieee").to(ACC)
            dist = x_sq[:, None] + tl.sum(centers_acc * centers_acc, axis=1)[None, :] - 2.0 * dots
            dist = tl.where(k_mask[None, :], tl.maximum(dist, 0.0), float("inf"))
            tile_min = tl.min(dist, axis=1)
            tile_label = tl.min(tl.where(dist == tile_min[:, None], offs_k[None, :], K), axis=1).to(tl.int64)
            better = tile_min < best_dist  # strict: an earlier tile wins ties
            best_label = tl.where(better, tile_label, best_label)
            best_dist = tl.where(better, tile_min, best_dist)
        tl.store(LABEL_ptr + rows, best_label, mask=row_mask)
        tl.store(DIST_ptr + rows, best_dist, mask=row_mask)


@torch.library.custom_op("fairkernels::triton_kmeans_assign", mutates_args=())
def kmeans_assign(x: torch.Tensor, centers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (labels [N] int64, min_sq_dist [N] acc). Feature dims above _common.MAX_BLOCK_D use
    the plain-torch kernel."""
    if x.shape[1] > cm.MAX_BLOCK_D:
        return torch_kernels.kmeans_assign(x, centers)
    x = x.contiguous()
    num_rows, dim = x.shape
    num_cols = centers.shape[0]
    blk_d = cm.block_d(dim)
    blk_k = cm.block_k(num_cols)
    blk_n = max(cm.MIN_DOT, min(128, cm.TILE_ELEMENTS // max(blk_k, blk_d)))
    tiles = triton.cdiv(num_rows, blk_n)
    labels = torch.empty(num_rows, dtype=torch.int64, device=x.device)
    dists = torch.empty(num_rows, dtype=cm.acc_dtype(x.dtype), device=x.device)
    _kmeans_assign_kernel[(cm.num_programs(tiles, x.device),)](
        x, x.stride(0), centers.to(x.dtype).contiguous(), labels, dists, num_rows, num_cols, dim, tiles,
        ACC=cm.tl_acc(x.dtype), DOT=cm.tl_dot_dtype(x.dtype, x.device), BLOCK_N=blk_n, BLOCK_K=blk_k, BLOCK_D=blk_d)
    return labels, dists


@kmeans_assign.register_fake
def _(x, centers):
    return (x.new_empty(x.shape[0], dtype=torch.int64),
            x.new_empty(x.shape[0], dtype=cm.acc_dtype(x.dtype)))
