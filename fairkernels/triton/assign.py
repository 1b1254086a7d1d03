"""Triton kernels of the soft assignments: Student-t (docs/math.md §1.1) and cosine softmax (docs/math.md §1.2).

One forward and one backward kernel serve both kernels (constexpr STUDENT_T); everything after
the scores (kernel, softmax over K; the backward epilogue) is fused, and the centres are read in
[BLOCK_K, BLOCK_D] tiles (_common.dot_config) so K never bounds shared memory.

Student-t accuracy: the expansion |z|^2 + |mu|^2 - 2 z.mu cancels in float32 when the points lie
far from the origin (6.5e-3 relative at norm ~300). Here z and mu are first centred by the
centres' mean m (z - m in registers, mu - m on the host; distances are unchanged), and in
float32/float64 the squared distances are direct differences sum_d (z_d - mu_d)^2, so q stays
within a few ulps of float64 at any norm. float16/bfloat16 use the expansion of the centred
values on tensor cores (their own rounding, 4e-3 for bfloat16, dominates its error).
The gradients use the centred values too: dL/dz_i = 2 (sum_k c_ik z'_i - sum_k c_ik mu'_k).

Center gradients are summed per program into private slots and reduced in a fixed order:
deterministic, P x K x (D + 1) extra floats. Feature dims above _common.max_block_d fall back to
the plain-torch kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fairkernels.ops import torch_kernels
from fairkernels.triton import _common as cm

# N and the tile count change with every batch; K is not specialised either (its 16-divisibility
# only changed ptxas's register choices: K = 4096 spilled where K = 300 did not).
_ROWS = ["N", "num_row_tiles", "K"]


@triton.jit
def _prepare_rows(X_ptr, X_row_stride, MEAN_ptr, rows, row_mask, D, STUDENT_T: tl.constexpr,
                  ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    """Student-t: (z - m, |z - m|^2, 1, True); cosine: (h_unit, 0, 1/max(||h||, eps), ||h|| > eps)."""
    if STUDENT_T:
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        x = tl.load(X_ptr + rows[:, None] * X_row_stride + offs_d[None, :],
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0).to(ACC)
        x = tl.where(d_mask[None, :], x - tl.load(MEAN_ptr + offs_d, mask=d_mask, other=0.0)[None, :], 0.0)
        x_sq = tl.sum(x * x, axis=1)
        return x, x_sq, tl.full(x_sq.shape, 1.0, ACC), x_sq == x_sq
    else:
        x, inv_norm, nonzero = cm.unit_rows(X_ptr, X_row_stride, rows, row_mask, D, ACC, BLOCK_D)
        return x, inv_norm * 0.0, inv_norm, nonzero


@triton.jit
def _direct_sq_dist(X_ptr, X_row_stride, MEAN_ptr, CT_ptr, rows, row_mask, offs_k, k_mask, K, D,
                    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """d_ik = sum_d ((z_id - m_d) - mu'_kd)^2 by direct differences, one feature at a time
    (CT_ptr: centred centres transposed, [D, K], so each feature's K values are contiguous)."""
    dist = tl.zeros([BLOCK_N, BLOCK_K], dtype=ACC)
    for d in range(0, D):
        z_d = tl.load(X_ptr + rows * X_row_stride + d, mask=row_mask, other=0.0).to(ACC) - tl.load(MEAN_ptr + d)
        mu_d = tl.load(CT_ptr + d * K + offs_k, mask=k_mask, other=0.0)
        diff = z_d[:, None] - mu_d[None, :]
        dist += diff * diff
    return dist


@triton.jit
def _scores_tile(x_dot, x_sq, X_ptr, X_row_stride, MEAN_ptr, C_ptr, CT_ptr, rows, row_mask, offs_k,
                 k_mask, K, D, param, STUDENT_T: tl.constexpr, DIRECT: tl.constexpr, ACC: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Student-t: log w_ik = -(a+1)/2 log1p(d_ik / a) (d_ik direct, or the centred expansion);
    cosine: x_ik = <h_unit, u_unit> * (1/tau). Returns (scores, d_ik or 0, centres tile)."""
    offs_d = tl.arange(0, BLOCK_D)
    centers = tl.load(C_ptr + offs_k.to(tl.int64)[:, None] * D + offs_d[None, :],
                      mask=k_mask[:, None] & (offs_d < D)[None, :], other=0.0).to(x_dot.dtype)
    if STUDENT_T:
        if DIRECT:
            dist = _direct_sq_dist(X_ptr, X_row_stride, MEAN_ptr, CT_ptr, rows, row_mask, offs_k, k_mask, K, D,
                                   ACC, BLOCK_N, BLOCK_K)
        else:
            dots = tl.dot(x_dot, tl.trans(centers), input_precision="ieee").to(ACC)
            centers_acc = centers.to(ACC)
            c_sq = tl.sum(centers_acc * centers_acc, axis=1)
            dist = tl.maximum(x_sq[:, None] + c_sq[None, :] - 2.0 * dots, 0.0)
        scores = -(param + 1.0) * 0.5 * cm.log1p_pos(dist / param)
    else:
        dist = tl.zeros([BLOCK_N, BLOCK_K], dtype=ACC)
        scores = tl.dot(x_dot, tl.trans(centers), input_precision="ieee").to(ACC) * param
    return scores, dist, centers


@triton.jit(do_not_specialize=_ROWS)
def _soft_assign_fwd_kernel(
    X_ptr,            # z (Student-t) or h (cosine) [N, D]
    X_row_stride,
    MEAN_ptr,         # [D] acc: the centres' mean m (Student-t)
    C_ptr,            # centres [K, D] contiguous (Student-t: mu - m; cosine: unit rows), operand dtype
    CT_ptr,           # [D, K] acc: (mu - m)^T (Student-t, DIRECT)
    param: "fp64",    # alpha (Student-t) or 1 / tau (cosine)
    Q_ptr,            # out: [N, K] X's dtype
    Q_row_stride,
    N, K, D,
    num_row_tiles,
    STUDENT_T: tl.constexpr,
    DIRECT: tl.constexpr,         # Student-t distances by direct differences (fp32 / fp64)
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_K_TILE: tl.constexpr,
):
    """q_ik = softmax_k(scores_ik), scores as _scores_tile (docs/math.md §1.1 / 1.2)."""
    param_acc = tl.full((), param, ACC)
    for tile in range(tl.program_id(0), num_row_tiles, tl.num_programs(0)):
        rows, row_mask = cm.row_tile(tile, N, BLOCK_N)
        x, x_sq, inv_norm, nonzero = _prepare_rows(X_ptr, X_row_stride, MEAN_ptr, rows, row_mask, D, STUDENT_T,
                                                   ACC, BLOCK_D)
        x_dot = x.to(DOT)
        Q_rows = Q_ptr + rows[:, None] * Q_row_stride
        if SINGLE_K_TILE:
            offs_k, k_mask = cm.col_tile(0, K, BLOCK_K)
            scores, dist, centers = _scores_tile(x_dot, x_sq, X_ptr, X_row_stride, MEAN_ptr, C_ptr, CT_ptr, rows,
                                                 row_mask, offs_k, k_mask, K, D, param_acc, STUDENT_T, DIRECT,
                                                 ACC, BLOCK_N, BLOCK_K, BLOCK_D)
            scores = tl.where(k_mask[None, :], scores, float("-inf"))
            weights = tl.exp(scores - tl.max(scores, axis=1)[:, None])
            cm.store_rows(Q_rows, offs_k, row_mask, k_mask, weights / tl.sum(weights, axis=1)[:, None])
        else:
            row_max = tl.full([BLOCK_N], float("-inf"), dtype=ACC)
            sum_exp = tl.zeros([BLOCK_N], dtype=ACC)
            for k_start in range(0, K, BLOCK_K):
                offs_k, k_mask = cm.col_tile(k_start, K, BLOCK_K)
                scores, dist, centers = _scores_tile(x_dot, x_sq, X_ptr, X_row_stride, MEAN_ptr, C_ptr, CT_ptr,
                                                     rows, row_mask, offs_k, k_mask, K, D, param_acc, STUDENT_T,
                                                     DIRECT, ACC, BLOCK_N, BLOCK_K, BLOCK_D)
                row_max, sum_exp = cm.online_lse_update(row_max, sum_exp,
                                                        tl.where(k_mask[None, :], scores, float("-inf")))
            lse = row_max + tl.log(sum_exp)
            for k_start in range(0, K, BLOCK_K):
                offs_k, k_mask = cm.col_tile(k_start, K, BLOCK_K)
                scores, dist, centers = _scores_tile(x_dot, x_sq, X_ptr, X_row_stride, MEAN_ptr, C_ptr, CT_ptr,
                                                     rows, row_mask, offs_k, k_mask, K, D, param_acc, STUDENT_T,
                                                     DIRECT, ACC, BLOCK_N, BLOCK_K, BLOCK_D)
                cm.store_rows(Q_rows, offs_k, row_mask, k_mask, tl.exp(scores - lse[:, None]))


@triton.jit
def _add_centre_sums(GRAD_C_slot, COLSUM_slot, grad_c, colsum, offs_k, k_mask, D, BLOCK_D: tl.constexpr):
    """This program's private slots += (coef^T x [BLOCK_K, BLOCK_D], colsum(coef) [BLOCK_K])."""
    offs_d = tl.arange(0, BLOCK_D)
    cm.add_to_table(GRAD_C_slot + offs_k.to(tl.int64)[:, None] * D + offs_d[None, :], grad_c,
                    k_mask[:, None] & (offs_d < D)[None, :], False)
    cm.add_to_table(COLSUM_slot + offs_k, colsum, k_mask, False)


@triton.jit(do_not_specialize=_ROWS)
def _soft_assign_bwd_kernel(
    GQ_ptr,           # dL/dq [N, K] contiguous
    Q_ptr,            # q [N, K] contiguous (forward output)
    X_ptr,            # z or h [N, D]
    X_row_stride,
    MEAN_ptr,         # [D] acc: the centres' mean (Student-t)
    C_ptr,            # centres [K, D] (Student-t: mu - m; cosine: unit rows), operand dtype
    CT_ptr,           # [D, K] acc: (mu - m)^T (Student-t, DIRECT)
    param: "fp64",    # alpha or 1 / tau
    GRAD_X_ptr,       # out: [N, D] X's dtype
    GRAD_X_row_stride,
    GRAD_C_ptr,       # out: [P, K, D] acc, per-program sum_i coef_ik x_i
    COLSUM_ptr,       # out: [P, K] acc, per-program sum_i coef_ik (Student-t)
    N, K, D,
    num_row_tiles,
    STUDENT_T: tl.constexpr,
    DIRECT: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_K_TILE: tl.constexpr,  # K <= BLOCK_K: the centre sums stay in registers, flushed once
):
    """S_ik = q_ik (G_ik - sum_k' q_ik' G_ik'). Student-t (docs/math.md §1.1): coef = S (-(a+1)/2)/(a+d),
    dL/dz = 2 (sum_k coef) z' - 2 coef @ mu', slots get coef^T z' and colsum(coef) (z', mu'
    centred by m). Cosine (docs/math.md §1.2): coef = S / tau, dL/dh = normalize_bwd(coef @ u_unit),
    slots get coef^T h_unit."""
    param_acc = tl.full((), param, ACC)
    GRAD_C_slot = GRAD_C_ptr + tl.program_id(0).to(tl.int64) * K * D
    COLSUM_slot = COLSUM_ptr + tl.program_id(0).to(tl.int64) * K
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    grad_c_acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=ACC)
    colsum_acc = tl.zeros([BLOCK_K], dtype=ACC)
    for tile in range(tl.program_id(0), num_row_tiles, tl.num_programs(0)):
        rows, row_mask = cm.row_tile(tile, N, BLOCK_N)
        x, x_sq, inv_norm, nonzero = _prepare_rows(X_ptr, X_row_stride, MEAN_ptr, rows, row_mask, D, STUDENT_T,
                                                   ACC, BLOCK_D)
        x_dot = x.to(DOT)
        row_dot = tl.zeros([BLOCK_N], dtype=ACC)
        for k_start in range(0, K, BLOCK_K):
            offs_k, k_mask = cm.col_tile(k_start, K, BLOCK_K)
            q = cm.load_rows(Q_ptr + rows[:, None] * K, offs_k, row_mask, k_mask, 0.0, ACC)
            gq = cm.load_rows(GQ_ptr + rows[:, None] * K, offs_k, row_mask, k_mask, 0.0, ACC)
            row_dot += tl.sum(q * gq, axis=1)
        coef_rowsum = tl.zeros([BLOCK_N], dtype=ACC)
        grad_x = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
        for k_start in range(0, K, BLOCK_K):
            offs_k, k_mask = cm.col_tile(k_start, K, BLOCK_K)
            mask = row_mask[:, None] & k_mask[None, :]
            q = cm.load_rows(Q_ptr + rows[:, None] * K, offs_k, row_mask, k_mask, 0.0, ACC)
            gq = cm.load_rows(GQ_ptr + rows[:, None] * K, offs_k, row_mask, k_mask, 0.0, ACC)
            scores, dist, centers = _scores_tile(x_dot, x_sq, X_ptr, X_row_stride, MEAN_ptr, C_ptr, CT_ptr, rows,
                                                 row_mask, offs_k, k_mask, K, D, param_acc, STUDENT_T, DIRECT,
                                                 ACC, BLOCK_N, BLOCK_K, BLOCK_D)
            if STUDENT_T:
                coef = q * (gq - row_dot[:, None]) * (-(param_acc + 1.0) * 0.5) / (param_acc + dist)
            else:
                coef = q * (gq - row_dot[:, None]) * param_acc
            coef = tl.where(mask, coef, 0.0)
            coef_dot = coef.to(DOT)
            grad_x += tl.dot(coef_dot, centers, input_precision="ieee").to(ACC)
            coef_rowsum += tl.sum(coef, axis=1)
            grad_c = tl.dot(tl.trans(coef_dot), x_dot, input_precision="ieee").to(ACC)
            if SINGLE_K_TILE:
                grad_c_acc += grad_c
                colsum_acc += tl.sum(coef, axis=0)
            else:
                _add_centre_sums(GRAD_C_slot, COLSUM_slot, grad_c, tl.sum(coef, axis=0), offs_k, k_mask, D, BLOCK_D)
        if STUDENT_T:
            grad = 2.0 * (coef_rowsum[:, None] * x - grad_x)
        else:
            grad = cm.normalize_bwd_rows(x, inv_norm, nonzero, grad_x)
        tl.store(GRAD_X_ptr + rows[:, None] * GRAD_X_row_stride + offs_d[None, :],
                 grad.to(GRAD_X_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])
    if SINGLE_K_TILE:
        offs_k, k_mask = cm.col_tile(0, K, BLOCK_K)
        _add_centre_sums(GRAD_C_slot, COLSUM_slot, grad_c_acc, colsum_acc, offs_k, k_mask, D, BLOCK_D)


# --------------------------------------------------------------------------- host launchers
def _centred(centers, acc, student_t, operand_dtype):
    """(mean [D] acc, centres operand [K, D], centred centres^T [D, K] acc) of the kernels."""
    centers_acc = centers.to(acc)
    if not student_t:
        return centers_acc.new_zeros(1), centers.to(operand_dtype).contiguous(), centers_acc.new_zeros(1)
    mean = centers_acc.mean(0)
    shifted = centers_acc - mean
    return mean.contiguous(), shifted.to(operand_dtype).contiguous(), shifted.t().contiguous()


# The backward's widest tiles, by operand kind: fp32 / fp64 dots run on FMA units ("ieee"), and an
# FMA dot keeps each thread's slice of the whole reduction dimension (BLOCK_K for coef @ centres,
# BLOCK_N for coef^T @ x) in registers; bf16 dots use tensor-core fragments.
_BWD_MAX_BLOCK_FMA = 32
_BWD_MAX_BLOCK_K_MMA = 64


def _bwd_config(cfg, num_cols, dtype, student_t):
    """Block sizes and num_warps of the backward, which holds x, its gradient, q, dL/dq and the
    centre tile at once. From benchmarks/kernel_report.py (sm_90, maxnreg = the block's register
    budget): narrower K (and, for FMA dots, N) tiles than the forward; twice the forward's warps,
    except where 16 warps' 128 registers spill: the K-tiled Student-t loop (its direct-difference
    distances), single-tile rows of D >= 64 under FMA dots, and float64 (there at most 8 warps,
    with up to 255 registers)."""
    fma = dtype in (torch.float32, torch.float64)
    blk_k = min(cfg.block_k, _BWD_MAX_BLOCK_FMA if fma else _BWD_MAX_BLOCK_K_MMA)
    blk_n = min(cfg.block_n, _BWD_MAX_BLOCK_FMA) if fma else cfg.block_n
    single = num_cols <= blk_k
    if (student_t and not single) or (fma and single and cfg.block_d >= 64) or dtype == torch.float64:
        warps = cm.float64_warps(cfg.num_warps, dtype)
    else:
        warps = min(cm.MAX_WARPS, 2 * cfg.num_warps)
    return cfg._replace(block_n=blk_n, block_k=blk_k, num_warps=warps, single=single)


def _launch_args(x, centers, student_t, backward=False):
    cfg = cm.dot_config(centers.shape[0], x.shape[1], x.dtype)
    if backward:
        cfg = _bwd_config(cfg, centers.shape[0], x.dtype, student_t)
    tiles = triton.cdiv(x.shape[0], cfg.block_n)
    programs = cm.num_programs(tiles, x.device, centers.shape[0] * (x.shape[1] + 1) if backward else 0,
                               deterministic=backward)
    meta = dict(STUDENT_T=student_t, DIRECT=student_t and x.dtype in (torch.float32, torch.float64),
                ACC=cm.tl_acc(x.dtype), DOT=cm.tl_dot_dtype(x.dtype, x.device), BLOCK_N=cfg.block_n,
                BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps,
                maxnreg=cm.register_budget(cfg.num_warps))
    return cfg, tiles, programs, meta


def _assign_fwd(x, centers_in, param, student_t):
    acc = cm.acc_dtype(x.dtype)
    x = x.contiguous()
    num_rows, num_cols = x.shape[0], centers_in.shape[0]
    cfg, tiles, programs, meta = _launch_args(x, centers_in, student_t)
    mean, centers, centers_t = _centred(centers_in, acc, student_t, x.dtype)
    q = torch.empty(num_rows, num_cols, dtype=x.dtype, device=x.device)
    cm.launch(_soft_assign_fwd_kernel, programs, x, x.stride(0), mean, centers, centers_t, float(param), q,
              q.stride(0), num_rows, num_cols, x.shape[1], tiles, SINGLE_K_TILE=cfg.single, **meta)
    return q


def _assign_bwd(grad_q, q, x, centers_in, param, student_t):
    """-> (dL/dx, sum_i coef_ik x'_i [K, D] acc, sum_i coef_ik [K] acc, centred centres or None)."""
    acc = cm.acc_dtype(x.dtype)
    x = x.contiguous()
    num_rows, dim = x.shape
    num_cols = centers_in.shape[0]
    cfg, tiles, programs, meta = _launch_args(x, centers_in, student_t, backward=True)
    mean, centers, centers_t = _centred(centers_in, acc, student_t, x.dtype)
    grad_x = torch.empty_like(x)
    grad_c = torch.zeros(programs, num_cols, dim, dtype=acc, device=x.device)
    colsum = torch.zeros(programs, num_cols, dtype=acc, device=x.device)
    cm.launch(_soft_assign_bwd_kernel, programs, grad_q.contiguous(), q.contiguous(), x, x.stride(0), mean,
              centers, centers_t, float(param), grad_x, grad_x.stride(0), grad_c, colsum,
              num_rows, num_cols, dim, tiles, SINGLE_K_TILE=cfg.single, **meta)
    return grad_x, grad_c.sum(0), colsum.sum(0), centers_in.to(acc) - mean if student_t else None


@torch.library.custom_op("fairkernels::triton_student_t_fwd", mutates_args=())
def student_t_fwd(z: torch.Tensor, centers: torch.Tensor, alpha: float) -> torch.Tensor:
    """-> q [N, K] in z's dtype (docs/math.md §1.1)."""
    if z.shape[1] > cm.max_block_d(z.dtype):
        return torch_kernels.student_t_fwd(z, centers, alpha)
    return _assign_fwd(z, centers, alpha, True)


@student_t_fwd.register_fake
def _(z, centers, alpha):
    return z.new_empty(z.shape[0], centers.shape[0])


@torch.library.custom_op("fairkernels::triton_student_t_bwd", mutates_args=())
def student_t_bwd(grad_q: torch.Tensor, q: torch.Tensor, z: torch.Tensor, centers: torch.Tensor,
                  alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (grad_z, grad_centers) by docs/math.md §1.1: dL/dmu_k = -2 (sum_i coef_ik z'_i - colsum_k mu'_k)."""
    if z.shape[1] > cm.max_block_d(z.dtype):
        return torch_kernels.student_t_bwd(grad_q, q, z, centers, alpha)
    grad_z, coef_z, colsum, shifted = _assign_bwd(grad_q, q, z, centers, alpha, True)
    grad_centers = -2.0 * (coef_z - colsum[:, None] * shifted)
    return grad_z, grad_centers.to(centers.dtype)


@student_t_bwd.register_fake
def _(grad_q, q, z, centers, alpha):
    return (torch.empty_like(z, memory_format=torch.contiguous_format),
            torch.empty_like(centers, memory_format=torch.contiguous_format))


def _unit(x, acc):
    return F.normalize(x.to(acc), dim=1, eps=cm.NORM_EPS)


@torch.library.custom_op("fairkernels::triton_cosine_fwd", mutates_args=())
def cosine_fwd(h: torch.Tensor, centers: torch.Tensor, tau: float) -> torch.Tensor:
    """-> c [N, K] in h's dtype (docs/math.md §1.2); centers normalised on the host (O(K d)), h in-kernel."""
    if h.shape[1] > cm.max_block_d(h.dtype):
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
    if h.shape[1] > cm.max_block_d(h.dtype):
        return torch_kernels.cosine_bwd(grad_c, c, h, centers, tau)
    acc = cm.acc_dtype(h.dtype)
    units_acc = _unit(centers, acc)
    grad_h, grad_units, _, _ = _assign_bwd(grad_c, c, h, units_acc.to(h.dtype), 1.0 / tau, False)
    grad_centers = cm.normalize_backward(centers.to(acc), units_acc, grad_units)
    return grad_h, grad_centers.to(centers.dtype)


@cosine_bwd.register_fake
def _(grad_c, c, h, centers, tau):
    return (torch.empty_like(h, memory_format=torch.contiguous_format),
            torch.empty_like(centers, memory_format=torch.contiguous_format))
