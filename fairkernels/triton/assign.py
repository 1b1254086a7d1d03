"""Triton kernels of the soft assignments: Student-t (docs/math.md §1.1) and cosine softmax (docs/math.md §1.2).

One forward and one backward kernel serve both kernels (constexpr STUDENT_T): the dot products
come from tl.dot on [BLOCK_N, BLOCK_D] x [BLOCK_D, BLOCK_K] register tiles, and everything after
them (distance, kernel, softmax over K; the backward epilogue) is fused. Center gradients are
summed per program into private slots and reduced in a fixed order: deterministic, P x K x D
extra floats. Feature dims above _common.MAX_BLOCK_D fall back to the plain-torch kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fairkernels.ops import torch_kernels
from fairkernels.triton import _common as cm
from fairkernels.triton.fcmi import _normalize_bwd_rows, _online_lse_update, _unit_rows


@triton.jit
def _prepare_rows(X_ptr, X_row_stride, rows, row_mask, D, STUDENT_T: tl.constexpr, ACC: tl.constexpr,
                  DOT: tl.constexpr, BLOCK_D: tl.constexpr):
    """Student-t: (z, ||z||^2, 1, True); cosine: (h_unit, 0, 1/max(||h||, eps), ||h|| > eps)."""
    if STUDENT_T:
        offs_d = tl.arange(0, BLOCK_D)
        x = tl.load(X_ptr + rows[:, None] * X_row_stride + offs_d[None, :],
                    mask=row_mask[:, None] & (offs_d < D)[None, :], other=0.0).to(ACC)
        x_sq = tl.sum(x * x, axis=1)
        return x, x_sq, tl.full(x_sq.shape, 1.0, ACC), x_sq == x_sq
    else:
        x, inv_norm, nonzero = _unit_rows(X_ptr, X_row_stride, rows, row_mask, D, ACC, BLOCK_D)
        return x, inv_norm * 0.0, inv_norm, nonzero


@triton.jit
def _scores_tile(x_dot, x_sq, C_ptr, offs_k, k_mask, D, param,
                 STUDENT_T: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    """Student-t: log w_ik = -(a+1)/2 log1p(d_ik / a), d_ik = max(|z|^2 + |mu|^2 - 2 z.mu, 0);
    cosine: x_ik = <h_unit, u_unit> * (1/tau). Returns (scores, d_ik or 0, centers tile)."""
    offs_d = tl.arange(0, BLOCK_D)
    centers = tl.load(C_ptr + offs_k.to(tl.int64)[:, None] * D + offs_d[None, :],
                      mask=k_mask[:, None] & (offs_d < D)[None, :], other=0.0).to(x_dot.dtype)
    dots = tl.dot(x_dot, tl.trans(centers), input_precision="ieee").to(ACC)
    if STUDENT_T:
        centers_acc = centers.to(ACC)
        c_sq = tl.sum(centers_acc * centers_acc, axis=1)
        dist = tl.maximum(x_sq[:, None] + c_sq[None, :] - 2.0 * dots, 0.0)
        scores = -(param + 1.0) * 0.5 * cm.log1p_pos(dist / param)
    else:
        dist = dots * 0.0
        scores = dots * param
    return scores, dist, centers


@triton.jit
def _soft_assign_fwd_kernel(
    X_ptr,            # z (Student-t) or h (cosine) [N, D]
    X_row_stride,
    C_ptr,            # centers [K, D] contiguous (cosine: unit rows), X's dtype
    PARAM_ptr,        # [1] acc: alpha (Student-t) or 1 / tau (cosine)
    Q_ptr,            # out: [N, K] X's dtype
    Q_row_stride,
    N, K, D,
    num_row_tiles,
    STUDENT_T: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_K_TILE: tl.constexpr,
):
    """q_ik = softmax_k(scores_ik), scores as _scores_tile (docs/math.md §1.1 / 1.2)."""
    pid = tl.program_id(0)
    param = tl.load(PARAM_ptr).to(ACC)
    for tile in range(pid, num_row_tiles, tl.num_programs(0)):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = offs_n < N
        rows = offs_n.to(tl.int64)
        x, x_sq, inv_norm, nonzero = _prepare_rows(X_ptr, X_row_stride, rows, row_mask, D, STUDENT_T, ACC,
                                                   DOT, BLOCK_D)
        x_dot = x.to(DOT)
        Q_rows = Q_ptr + rows[:, None] * Q_row_stride
        if SINGLE_K_TILE:
            offs_k = tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            scores, dist, centers = _scores_tile(x_dot, x_sq, C_ptr, offs_k, k_mask, D, param, STUDENT_T,
                                                 ACC, BLOCK_D)
            scores = tl.where(k_mask[None, :], scores, float("-inf"))
            weights = tl.exp(scores - tl.max(scores, axis=1)[:, None])
            q = weights / tl.sum(weights, axis=1)[:, None]
            tl.store(Q_rows + offs_k[None, :], q.to(Q_ptr.dtype.element_ty),
                     mask=row_mask[:, None] & k_mask[None, :])
        else:
            row_max = tl.full([BLOCK_N], float("-inf"), dtype=ACC)
            sum_exp = tl.zeros([BLOCK_N], dtype=ACC)
            for k_start in range(0, K, BLOCK_K):
                offs_k = k_start + tl.arange(0, BLOCK_K)
                k_mask = offs_k < K
                scores, dist, centers = _scores_tile(x_dot, x_sq, C_ptr, offs_k, k_mask, D, param,
                                                     STUDENT_T, ACC, BLOCK_D)
                scores = tl.where(k_mask[None, :], scores, float("-inf"))
                row_max, sum_exp = _online_lse_update(row_max, sum_exp, scores)
            lse = row_max + tl.log(sum_exp)
            for k_start in range(0, K, BLOCK_K):
                offs_k = k_start + tl.arange(0, BLOCK_K)
                k_mask = offs_k < K
                scores, dist, centers = _scores_tile(x_dot, x_sq, C_ptr, offs_k, k_mask, D, param,
                                                     STUDENT_T, ACC, BLOCK_D)
                q = tl.exp(scores - lse[:, None])
                tl.store(Q_rows + offs_k[None, :], q.to(Q_ptr.dtype.element_ty),
                         mask=row_mask[:, None] & k_mask[None, :])


@triton.jit
def _soft_assign_bwd_kernel(
    GQ_ptr,           # dL/dq [N, K] contiguous
    Q_ptr,            # q [N, K] contiguous (forward output)
    X_ptr,            # z or h [N, D]
    X_row_stride,
    C_ptr,            # centers [K, D] (cosine: unit rows), X's dtype
    PARAM_ptr,        # [1] acc: alpha or 1 / tau
    GRAD_X_ptr,       # out: [N, D] X's dtype
    GRAD_X_row_stride,
    GRAD_C_ptr,       # out: [P, K, D] acc, per-program sum_i coef_ik x_i
    COLSUM_ptr,       # out: [P, K] acc, per-program sum_i coef_ik (Student-t)
    N, K, D,
    num_row_tiles,
    STUDENT_T: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """S_ik = q_ik (G_ik - sum_k' q_ik' G_ik'). Student-t (docs/math.md §1.1): coef = S (-(a+1)/2)/(a+d),
    dL/dz = 2 (sum_k coef) z - 2 coef @ mu, slots get coef^T z and colsum(coef).
    Cosine (docs/math.md §1.2): coef = S / tau, dL/dh = normalize_bwd(coef @ u_unit), slots get coef^T h_unit."""
    pid = tl.program_id(0)
    param = tl.load(PARAM_ptr).to(ACC)
    GRAD_C_slot = GRAD_C_ptr + pid.to(tl.int64) * K * D
    COLSUM_slot = COLSUM_ptr + pid.to(tl.int64) * K
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    for tile in range(pid, num_row_tiles, tl.num_programs(0)):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = offs_n < N
        rows = offs_n.to(tl.int64)
        x, x_sq, inv_norm, nonzero = _prepare_rows(X_ptr, X_row_stride, rows, row_mask, D, STUDENT_T, ACC,
                                                   DOT, BLOCK_D)
        x_dot = x.to(DOT)
        row_dot = tl.zeros([BLOCK_N], dtype=ACC)
        for k_start in range(0, K, BLOCK_K):
            offs_k = k_start + tl.arange(0, BLOCK_K)
            mask = row_mask[:, None] & (offs_k < K)[None, :]
            ptrs = rows[:, None] * K + offs_k[None, :]
            q = tl.load(Q_ptr + ptrs, mask=mask, other=0.0).to(ACC)
            gq = tl.load(GQ_ptr + ptrs, mask=mask, other=0.0).to(ACC)
            row_dot += tl.sum(q * gq, axis=1)
        coef_rowsum = tl.zeros([BLOCK_N], dtype=ACC)
        grad_x = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
        for k_start in range(0, K, BLOCK_K):
            offs_k = k_start + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            mask = row_mask[:, None] & k_mask[None, :]
            ptrs = rows[:, None] * K + offs_k[None, :]
            q = tl.load(Q_ptr + ptrs, mask=mask, other=0.0).to(ACC)
            gq = tl.load(GQ_ptr + ptrs, mask=mask, other=0.0).to(ACC)
            scores, dist, centers = _scores_tile(x_dot, x_sq, C_ptr, offs_k, k_mask, D, param, STUDENT_T,
                                                 ACC, BLOCK_D)
            if STUDENT_T:
                coef = q * (gq - row_dot[:, None]) * (-(param + 1.0) * 0.5) / (param + dist)
            else:
                coef = q * (gq - row_dot[:, None]) * param
            coef = tl.where(mask, coef, 0.0)
            coef_dot = coef.to(DOT)
            grad_x += tl.dot(coef_dot, centers, input_precision="ieee").to(ACC)
            coef_rowsum += tl.sum(coef, axis=1)
            center_ptrs = GRAD_C_slot + offs_k.to(tl.int64)[:, None] * D + offs_d[None, :]
            center_mask = k_mask[:, None] & d_mask[None, :]
            grad_c = tl.dot(tl.trans(coef_dot), x_dot, input_precision="ieee").to(ACC)
            tl.store(center_ptrs, tl.load(center_ptrs, mask=center_mask, other=0.0) + grad_c, mask=center_mask)
            tl.store(COLSUM_slot + offs_k, tl.load(COLSUM_slot + offs_k, mask=k_mask, other=0.0)
                     + tl.sum(coef, axis=0), mask=k_mask)
        if STUDENT_T:
            grad = 2.0 * (coef_rowsum[:, None] * x - grad_x)
        else:
            grad = _normalize_bwd_rows(x, inv_norm, nonzero, grad_x)
        tl.store(GRAD_X_ptr + rows[:, None] * GRAD_X_row_stride + offs_d[None, :],
                 grad.to(GRAD_X_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


# --------------------------------------------------------------------------- host launchers
def _launch_shape(x, centers, partial_size=0):
    num_rows, dim = x.shape
    num_cols = centers.shape[0]
    blk_d = cm.block_d(dim)
    blk_k = cm.block_k(num_cols)
    blk_n = max(cm.MIN_DOT, min(128, cm.TILE_ELEMENTS // max(blk_k, blk_d)))
    tiles = triton.cdiv(num_rows, blk_n)
    programs = cm.num_programs(tiles, x.device, partial_size, deterministic=partial_size > 0)
    return blk_n, blk_k, blk_d, num_cols <= blk_k, tiles, programs


def _assign_fwd(x, centers_in, param, student_t):
    acc = cm.acc_dtype(x.dtype)
    x = x.contiguous()
    num_rows, num_cols = x.shape[0], centers_in.shape[0]
    blk_n, blk_k, blk_d, single, tiles, programs = _launch_shape(x, centers_in)
    q = torch.empty(num_rows, num_cols, dtype=x.dtype, device=x.device)
    params = torch.tensor([param], dtype=acc, device=x.device)
    _soft_assign_fwd_kernel[(programs,)](
        x, x.stride(0), centers_in.contiguous(), params, q, q.stride(0), num_rows, num_cols, x.shape[1], tiles,
        STUDENT_T=student_t, ACC=cm.tl_acc(x.dtype), DOT=cm.tl_dot_dtype(x.dtype, x.device), BLOCK_N=blk_n,
        BLOCK_K=blk_k, BLOCK_D=blk_d, SINGLE_K_TILE=single)
    return q


def _assign_bwd(grad_q, q, x, centers_in, param, student_t):
    """-> (dL/dx, sum_i coef_ik x_i [K, D] acc, sum_i coef_ik [K] acc)."""
    acc = cm.acc_dtype(x.dtype)
    x = x.contiguous()
    num_rows, dim = x.shape
    num_cols = centers_in.shape[0]
    blk_n, blk_k, blk_d, single, tiles, programs = _launch_shape(x, centers_in, num_cols * (dim + 1))
    params = torch.tensor([param], dtype=acc, device=x.device)
    grad_x = torch.empty_like(x)
    grad_c = torch.zeros(programs, num_cols, dim, dtype=acc, device=x.device)
    colsum = torch.zeros(programs, num_cols, dtype=acc, device=x.device)
    _soft_assign_bwd_kernel[(programs,)](
        grad_q.contiguous(), q.contiguous(), x, x.stride(0), centers_in.contiguous(), params, grad_x,
        grad_x.stride(0), grad_c, colsum, num_rows, num_cols, dim, tiles,
        STUDENT_T=student_t, ACC=cm.tl_acc(x.dtype), DOT=cm.tl_dot_dtype(x.dtype, x.device), BLOCK_N=blk_n,
        BLOCK_K=blk_k, BLOCK_D=blk_d)
    return grad_x, grad_c.sum(0), colsum.sum(0)


@torch.library.custom_op("fairkernels::triton_student_t_fwd", mutates_args=())
def student_t_fwd(z: torch.Tensor, centers: torch.Tensor, alpha: float) -> torch.Tensor:
    """-> q [N, K] in z's dtype (docs/math.md §1.1)."""
    if z.shape[1] > cm.MAX_BLOCK_D:
        return torch_kernels.student_t_fwd(z, centers, alpha)
    return _assign_fwd(z, centers, alpha, True)


@student_t_fwd.register_fake
def _(z, centers, alpha):
    return z.new_empty(z.shape[0], centers.shape[0])


@torch.library.custom_op("fairkernels::triton_student_t_bwd", mutates_args=())
def student_t_bwd(grad_q: torch.Tensor, q: torch.Tensor, z: torch.Tensor, centers: torch.Tensor,
                  alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (grad_z, grad_centers) by docs/math.md §1.1: dL/dmu_k = -2 (sum_i coef_ik z_i - colsum_k mu_k)."""
    if z.shape[1] > cm.MAX_BLOCK_D:
        return torch_kernels.student_t_bwd(grad_q, q, z, centers, alpha)
    grad_z, coef_z, colsum = _assign_bwd(grad_q, q, z, centers, alpha, True)
    grad_centers = -2.0 * (coef_z - colsum[:, None] * centers.to(coef_z.dtype))
    return grad_z, grad_centers.to(centers.dtype)


@student_t_bwd.register_fake
def _(grad_q, q, z, centers, alpha):
    return torch.empty_like(z), torch.empty_like(centers)


def _unit(x, acc):
    return F.normalize(x.to(acc), dim=1, eps=cm.NORM_EPS)


@torch.library.custom_op("fairkernels::triton_cosine_fwd", mutates_args=())
def cosine_fwd(h: torch.Tensor, centers: torch.Tensor, tau: float) -> torch.Tensor:
    """-> c [N, K] in h's dtype (docs/math.md §1.2); centers normalised on the host (O(K d)), h in-kernel."""
    if h.shape[1] > cm.MAX_BLOCK_D:
        return torch_kernels.cosine_fwd(h, centers, tau)
    units = _unit(centers, cm.acc_dtype(h.dtype)).to(h.dtype)
    return _assign_fwd(h, units, 1.0 / tau, False)


@cosine_fwd.register_fake
def _(h, centers, tau):
    return h.new_empty(h.shape[0], centers.shape[0])


@torch.library.custom_op("fairkernels::triton_cosine_bwd", mutates_args=())
def cosine_bwd(grad_c: torch.Tensor, c: torch.Tensor, h: torch.Tensor, centers: torch.Tensor,
               tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (grad_h, grad_centers) (docs/math.md §1.2), the center gradient chained through u / ||u|| on the host."""
    if h.shape[1] > cm.MAX_BLOCK_D:
        return torch_kernels.cosine_bwd(grad_c, c, h, centers, tau)
    acc = cm.acc_dtype(h.dtype)
    units_acc = _unit(centers, acc)
    grad_h, grad_units, _ = _assign_bwd(grad_c, c, h, units_acc.to(h.dtype), 1.0 / tau, False)
    grad_centers = torch_kernels.normalize_backward(centers.to(acc), units_acc, grad_units)
    return grad_h, grad_centers.to(centers.dtype)


@cosine_bwd.register_fake
def _(grad_c, c, h, centers, tau):
    return torch.empty_like(h), torch.empty_like(centers)
