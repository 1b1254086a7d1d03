"""Triton kernels of the DFC assignment losses (docs/math.md §4): the DEC target and KL(P || Q).

Column sums f_k and the KL sum are accumulated per program into private slots and reduced in a
fixed order, so both ops are deterministic. kl_div_bwd is elementwise.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fairkernels.triton import _common as cm

_ROWS = ["N", "num_row_tiles"]


@triton.jit
def _row_tile_loads(Q_ptr, tile, N, K, k_start, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One [BLOCK_N, BLOCK_K] tile of a contiguous [N, K] matrix: (values, row ptrs, rows, masks)."""
    rows, row_mask = cm.row_tile(tile, N, BLOCK_N)
    offs_k, k_mask = cm.col_tile(k_start, K, BLOCK_K)
    ROW_ptrs = Q_ptr + rows[:, None] * K
    return cm.load_rows(ROW_ptrs, offs_k, row_mask, k_mask, 0.0, ACC), offs_k, k_mask, row_mask, rows


@triton.jit(do_not_specialize=_ROWS)
def _dec_target_colsum_kernel(
    Q_ptr,            # q [N, K] contiguous
    COLSUM_ptr,       # out: [P, K] acc, per-program sum_i q_ik
    N, K,
    num_row_tiles,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """f_k = sum_i q_ik  (docs/math.md §4), one partial row per program (private slot: deterministic)."""
    COLSUM_slot = cm.slot(COLSUM_ptr, K, False)
    for tile in range(tl.program_id(0), num_row_tiles, tl.num_programs(0)):
        for k_start in range(0, K, BLOCK_K):
            q, offs_k, k_mask, row_mask, rows = _row_tile_loads(Q_ptr, tile, N, K, k_start, ACC, BLOCK_N, BLOCK_K)
            cm.add_to_table(COLSUM_slot + offs_k, tl.sum(q, axis=0), k_mask, False)


@triton.jit(do_not_specialize=_ROWS)
def _dec_target_fwd_kernel(
    Q_ptr,            # q [N, K] contiguous
    INV_F_ptr,        # [K] acc: 1 / max(f_k, eps)
    P_ptr,            # out: target [N, K], q's dtype
    N, K,
    num_row_tiles,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """p_ik = w_ik / max(sum_k' w_ik', eps),  w_ik = q_ik^2 / max(f_k, eps)  (docs/math.md §4)."""
    for tile in range(tl.program_id(0), num_row_tiles, tl.num_programs(0)):
        row_sum = tl.zeros([BLOCK_N], dtype=ACC)
        for k_start in range(0, K, BLOCK_K):
            q, offs_k, k_mask, row_mask, rows = _row_tile_loads(Q_ptr, tile, N, K, k_start, ACC, BLOCK_N, BLOCK_K)
            inv_f = tl.load(INV_F_ptr + offs_k, mask=k_mask, other=0.0)
            row_sum += tl.sum(q * q * inv_f[None, :], axis=1)
        inv_row = 1.0 / tl.maximum(row_sum, cm.eps_of(ACC))
        for k_start in range(0, K, BLOCK_K):
            q, offs_k, k_mask, row_mask, rows = _row_tile_loads(Q_ptr, tile, N, K, k_start, ACC, BLOCK_N, BLOCK_K)
            inv_f = tl.load(INV_F_ptr + offs_k, mask=k_mask, other=0.0)
            cm.store_rows(P_ptr + rows[:, None] * K, offs_k, row_mask, k_mask,
                          q * q * inv_f[None, :] * inv_row[:, None])


@triton.jit(do_not_specialize=_ROWS)
def _kl_div_fwd_kernel(
    T_ptr,            # target p [N, K] contiguous
    Q_ptr,            # q [N, K] contiguous
    SUM_ptr,          # out: [P] acc, per-program sum of p log p - p log max(q, eps)
    N, K,
    num_row_tiles,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """sum_ik p_ik log(p_ik / q_ik) with 0 log 0 = 0 and q floored at eps (docs/math.md §4)."""
    total = tl.zeros([BLOCK_N], dtype=ACC)
    eps = cm.eps_of(ACC)
    for tile in range(tl.program_id(0), num_row_tiles, tl.num_programs(0)):
        for k_start in range(0, K, BLOCK_K):
            p, offs_k, k_mask, row_mask, rows = _row_tile_loads(T_ptr, tile, N, K, k_start, ACC, BLOCK_N, BLOCK_K)
            q = cm.load_rows(Q_ptr + rows[:, None] * K, offs_k, row_mask, k_mask, 1.0, ACC)
            terms = tl.where(p > 0, p * tl.log(tl.maximum(p, eps)), 0.0) - p * tl.log(tl.maximum(q, eps))
            total += tl.sum(terms, axis=1)
    tl.store(SUM_ptr + tl.program_id(0), tl.sum(total))


@triton.jit(do_not_specialize=["numel"])
def _kl_div_bwd_kernel(
    T_ptr,            # target p [numel] contiguous
    Q_ptr,            # q [numel] contiguous
    SCALE_ptr,        # 0-dim acc: grad_out / N
    GRAD_ptr,         # out: [numel] q's dtype
    numel,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """dL/dq_ik = -(grad_out / N) p_ik / q_ik where q_ik >= eps, else 0 (the clamp's gradient,
    as reference.kl_div under autograd)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    scale = tl.load(SCALE_ptr).to(ACC)
    p = tl.load(T_ptr + offs, mask=mask, other=0.0).to(ACC)
    q = tl.load(Q_ptr + offs, mask=mask, other=1.0).to(ACC)
    eps = cm.eps_of(ACC)
    grad = tl.where(q >= eps, -scale * p / tl.where(q >= eps, q, 1.0), 0.0)
    tl.store(GRAD_ptr + offs, grad.to(GRAD_ptr.dtype.element_ty), mask=mask)


def _row_tiles(q):
    cfg = cm.row_config(q.shape[1], q.dtype)
    tiles = triton.cdiv(q.shape[0], cfg.block_n)
    programs = cm.num_programs(tiles, q.device, q.shape[1], deterministic=True)
    return dict(BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps), tiles, programs


@torch.library.custom_op("fairkernels::triton_dec_target", mutates_args=())
def dec_target(q: torch.Tensor) -> torch.Tensor:
    """-> p [N, K] in q's dtype (docs/math.md §4; no gradient)."""
    q = q.contiguous()
    acc = cm.acc_dtype(q.dtype)
    num_rows, num_cols = q.shape
    blocks, tiles, programs = _row_tiles(q)
    colsum = torch.zeros(programs, num_cols, dtype=acc, device=q.device)
    cm.launch(_dec_target_colsum_kernel, programs, q, colsum, num_rows, num_cols, tiles, ACC=cm.tl_acc(q.dtype), **blocks)
    inv_f = 1.0 / colsum.sum(0).clamp_min(cm.LOG_EPS)
    target = torch.empty_like(q)
    cm.launch(_dec_target_fwd_kernel, programs, q, inv_f, target, num_rows, num_cols, tiles, ACC=cm.tl_acc(q.dtype), **blocks)
    return target


@dec_target.register_fake
def _(q):
    return torch.empty_like(q)


@torch.library.custom_op("fairkernels::triton_kl_div_fwd", mutates_args=())
def kl_div_fwd(target: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """-> KL(P || Q) = (1/N) sum_ik p_ik log(p_ik / q_ik), 0-dim in q's dtype."""
    target, q = target.contiguous(), q.contiguous()
    acc = cm.acc_dtype(q.dtype)
    blocks, tiles, programs = _row_tiles(q)
    sums = torch.zeros(programs, dtype=acc, device=q.device)
    cm.launch(_kl_div_fwd_kernel, programs, target, q, sums, q.shape[0], q.shape[1], tiles, ACC=cm.tl_acc(q.dtype), **blocks)
    return (sums.sum() / q.shape[0]).to(q.dtype)


@kl_div_fwd.register_fake
def _(target, q):
    return q.new_empty(())


@torch.library.custom_op("fairkernels::triton_kl_div_bwd", mutates_args=())
def kl_div_bwd(grad_out: torch.Tensor, target: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """-> dL/dq [N, K] in q's dtype."""
    target, q = target.contiguous(), q.contiguous()
    acc = cm.acc_dtype(q.dtype)
    scale = (grad_out.to(acc) / q.shape[0]).reshape(())
    grad = torch.empty_like(q)
    block = 4096
    cm.launch(_kl_div_bwd_kernel, triton.cdiv(q.numel(), block), target, q, scale, grad, q.numel(),
                                                         ACC=cm.tl_acc(q.dtype), BLOCK=block)
    return grad


@kl_div_bwd.register_fake
def _(grad_out, target, q):
    return torch.empty_like(q)
