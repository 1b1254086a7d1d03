"""Triton kernel of the k-means assignment step: fused squared distance + argmin, no N x K
matrix in memory (distances live in [BLOCK_N, BLOCK_K] register tiles)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fairkernels.ops import torch_kernels
from fairkernels.triton import _common as cm


@triton.jit(do_not_specialize=["N", "num_row_tiles"])
def _kmeans_assign_kernel(
    X_ptr,            # points [N, D]
    X_row_stride,
    MEAN_ptr,         # [D] acc: the centres' mean m
    C_ptr,            # centres minus m [K, D] contiguous, X's dtype
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
    """label_i = argmin_k d_ik (lowest k on ties), d_ik = max(|x'_i|^2 + |c'_k|^2 - 2 x'_i.c'_k, 0)
    with x' = x - m, c' = c - m: centring by the centres' mean keeps the expansion from
    cancelling when the data lie far from the origin."""
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    mean = tl.load(MEAN_ptr + offs_d, mask=d_mask, other=0.0)
    for tile in range(tl.program_id(0), num_row_tiles, tl.num_programs(0)):
        rows, row_mask = cm.row_tile(tile, N, BLOCK_N)
        x = cm.load_rows(X_ptr + rows[:, None] * X_row_stride, offs_d, row_mask, d_mask, 0.0, ACC)
        x = tl.where(d_mask[None, :], x - mean[None, :], 0.0)
        x_sq = tl.sum(x * x, axis=1)
        x_dot = x.to(DOT)
        best_dist = tl.full([BLOCK_N], float("inf"), dtype=ACC)
        best_label = tl.zeros([BLOCK_N], dtype=tl.int32)  # widened at the store: fewer registers
        for k_start in range(0, K, BLOCK_K):
            offs_k, k_mask = cm.col_tile(k_start, K, BLOCK_K)
            centers = cm.load_rows(C_ptr + offs_k.to(tl.int64)[:, None] * D, offs_d, k_mask, d_mask, 0.0, ACC)
            dots = tl.dot(x_dot, tl.trans(centers.to(DOT)), input_precision="ieee").to(ACC)
            dist = x_sq[:, None] + tl.sum(centers * centers, axis=1)[None, :] - 2.0 * dots
            dist = tl.where(k_mask[None, :], tl.maximum(dist, 0.0), float("inf"))
            tile_min = tl.min(dist, axis=1)
            tile_label = tl.min(tl.where(dist == tile_min[:, None], offs_k[None, :], K), axis=1)
            better = tile_min < best_dist  # strict: an earlier tile wins ties
            best_label = tl.where(better, tile_label, best_label)
            best_dist = tl.where(better, tile_min, best_dist)
        tl.store(LABEL_ptr + rows, best_label.to(tl.int64), mask=row_mask)
        tl.store(DIST_ptr + rows, best_dist, mask=row_mask)


@torch.library.custom_op("fairkernels::triton_kmeans_assign", mutates_args=())
def kmeans_assign(x: torch.Tensor, centers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (labels [N] int64, min_sq_dist [N] acc). Feature dims above _common.max_block_d use
    the plain-torch kernel."""
    if x.shape[1] > cm.max_block_d(x.dtype):
        return torch_kernels.kmeans_assign(x, centers)
    x = x.contiguous()
    num_rows, dim = x.shape
    num_cols = centers.shape[0]
    acc = cm.acc_dtype(x.dtype)
    # warps: half dot_config's for one K tile, twice for the K-tiled loop, where dot_config's
    # spilled a few bytes (benchmarks/kernel_report.py at D = 128)
    cfg = cm.dot_config(num_cols, dim, x.dtype)
    tiles = triton.cdiv(num_rows, cfg.block_n)
    mean = centers.to(acc).mean(0)
    labels = torch.empty(num_rows, dtype=torch.int64, device=x.device)
    dists = torch.empty(num_rows, dtype=acc, device=x.device)
    cm.launch(_kmeans_assign_kernel, cm.num_programs(tiles, x.device), x, x.stride(0), mean,
              (centers.to(acc) - mean).to(x.dtype).contiguous(), labels, dists, num_rows, num_cols, dim, tiles,
              ACC=cm.tl_acc(x.dtype), DOT=cm.tl_dot_dtype(x.dtype, x.device), BLOCK_N=cfg.block_n,
              BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d,
              num_warps=max(4, cfg.num_warps // 2) if cfg.single else min(cm.MAX_WARPS, 2 * cfg.num_warps))
    return labels, dists


@kmeans_assign.register_fake
def _(x, centers):
    return (x.new_empty(x.shape[0], dtype=torch.int64),
            x.new_empty(x.shape[0], dtype=cm.acc_dtype(x.dtype)))
