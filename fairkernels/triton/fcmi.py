"""Triton kernels of the fused FCMI loss (docs/math.md §3): from logits, and from embeddings with cosine
logits (docs/math.md §1.2 + 3) that live in registers only.

Forward: one read of the logits (or of h), per row the logsumexp, and the sufficient statistics
sum_{i in t} c_ik (T x K) and sum_ik c_ik log c_ik. Backward: recompute c from the saved lse and
write dL/dlogits_ik = c_ik (G_ik - sum_k' c_ik' G_ik'), G_ik = table[g_i, k] - logc_coef log c_ik.
With K > BLOCK_K a second pass over the row is needed (logsumexp / row sum first).

deterministic=False adds the statistics with atomics (run-to-run order varies on GPU);
deterministic=True gives each program a private T x K slot reduced afterwards in a fixed order,
costing P x T x K accumulation floats (P capped by _common.PARTIAL_BUDGET).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fairkernels.triton import _common as cm


@triton.jit
def _fcmi_tile_stats(x, lse, groups, row_mask, offs_k, k_mask, JOINT_slot, K, T,
                     BLOCK_T: tl.constexpr, ATOMIC: tl.constexpr):
    """Adds one [BLOCK_N, BLOCK_K] tile of c = exp(x - lse) to the joint; returns the tile's
    per-row sum of c log c (0 log 0 = 0: log c is finite, c may underflow to 0)."""
    mask = row_mask[:, None] & k_mask[None, :]
    log_c = tl.where(mask, x - lse[:, None], 0.0)
    c = tl.where(mask, tl.exp(log_c), 0.0)
    cm.add_joint_tile(JOINT_slot, c, groups, row_mask, offs_k, k_mask, K, T, BLOCK_T, ATOMIC)
    return tl.sum(tl.where(mask, c * log_c, 0.0), axis=1)


@triton.jit
def _online_lse_update(row_max, sum_exp, x):
    """Online logsumexp: fold one tile x (masked entries -inf) into (row_max, sum_exp)."""
    new_max = tl.maximum(row_max, tl.max(x, axis=1))
    sum_exp = sum_exp * tl.exp(row_max - new_max) + tl.sum(tl.exp(x - new_max[:, None]), axis=1)
    return new_max, sum_exp


@triton.jit
def _fcmi_fwd_kernel(
    X_ptr,            # logits [N, K], any float dtype
    X_row_stride,     # elements between consecutive rows of X
    G_ptr,            # groups [N], int32 or int64
    LSE_ptr,          # out: logsumexp [N], acc dtype
    JOINT_ptr,        # out: [slots, T, K] acc, slot = pid (deterministic) or 0 (atomic)
    ENT_ptr,          # out: [slots] acc, sum of c log c
    N, K, T,
    num_row_tiles,    # cdiv(N, BLOCK_N)
    ACC: tl.constexpr,            # tl.float32 or tl.float64
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    SINGLE_K_TILE: tl.constexpr,  # K <= BLOCK_K: one read of the row
    ATOMIC: tl.constexpr,
):
    """lse_i = log sum_k exp(x_ik); J_tk = sum_{g_i = t} c_ik; E = sum_ik c_ik log c_ik, with
    log c_ik = x_ik - lse_i (docs/math.md §3)."""
    pid = tl.program_id(0)
    if ATOMIC:  # one table shared by all programs
        JOINT_slot = JOINT_ptr
    else:  # this program's private slot
        JOINT_slot = JOINT_ptr + pid.to(tl.int64) * T * K
    ent_rows = tl.zeros([BLOCK_N], dtype=ACC)
    for tile in range(pid, num_row_tiles, tl.num_programs(0)):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = offs_n < N
        rows = offs_n.to(tl.int64)  # 64-bit: rows * stride can pass 2^31
        groups = tl.load(G_ptr + rows, mask=row_mask, other=0)
        X_rows = X_ptr + rows[:, None] * X_row_stride
        if SINGLE_K_TILE:
            offs_k = tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x = tl.load(X_rows + offs_k[None, :], mask=row_mask[:, None] & k_mask[None, :],
                        other=float("-inf")).to(ACC)
            x = tl.where(row_mask[:, None], x, 0.0)
            row_max = tl.max(x, axis=1)
            lse = row_max + tl.log(tl.sum(tl.exp(x - row_max[:, None]), axis=1))
            ent_rows += _fcmi_tile_stats(x, lse, groups, row_mask, offs_k, k_mask, JOINT_slot, K, T,
                                         BLOCK_T, ATOMIC)
        else:
            row_max = tl.full([BLOCK_N], float("-inf"), dtype=ACC)
            sum_exp = tl.zeros([BLOCK_N], dtype=ACC)
            for k_start in range(0, K, BLOCK_K):
                offs_k = k_start + tl.arange(0, BLOCK_K)
                k_mask = offs_k < K
                x = tl.load(X_rows + offs_k[None, :], mask=row_mask[:, None] & k_mask[None, :],
                            other=float("-inf")).to(ACC)
                x = tl.where(row_mask[:, None], x, 0.0)
                row_max, sum_exp = _online_lse_update(row_max, sum_exp, x)
            lse = row_max + tl.log(sum_exp)
            for k_start in range(0, K, BLOCK_K):
                offs_k = k_start + tl.arange(0, BLOCK_K)
                k_mask = offs_k < K
                x = tl.load(X_rows + offs_k[None, :], mask=row_mask[:, None] & k_mask[None, :],
                            other=0.0).to(ACC)
                ent_rows += _fcmi_tile_stats(x, lse, groups, row_mask, offs_k, k_mask, JOINT_slot, K, T,
                                             BLOCK_T, ATOMIC)
        tl.store(LSE_ptr + rows, lse, mask=row_mask)
    if ATOMIC:
        tl.atomic_add(ENT_ptr, tl.sum(ent_rows))
    else:
        tl.store(ENT_ptr + pid, tl.sum(ent_rows))


@triton.jit
def _fcmi_row_gradient(x, lse, groups, offs_k, mask, TABLE_ptr, K, logc_coef):
    """c and G_ik = table[g_i, k] - logc_coef * log c_ik for one tile (zero where masked)."""
    log_c = tl.where(mask, x - lse[:, None], 0.0)
    c = tl.where(mask, tl.exp(log_c), 0.0)
    table = tl.load(TABLE_ptr + groups.to(tl.int64)[:, None] * K + offs_k[None, :], mask=mask, other=0.0)
    return c, tl.where(mask, table - logc_coef * log_c, 0.0)


@triton.jit
def _fcmi_bwd_kernel(
    X_ptr,            # logits [N, K]
    X_row_stride,
    G_ptr,            # groups [N]
    LSE_ptr,          # logsumexp [N] acc (saved by the forward)
    TABLE_ptr,        # [T, K] acc, see module docstring
    COEF_ptr,         # 0-dim acc: logc_coef (loaded here: no host sync)
    GRAD_ptr,         # out: [N, K] in the logits' dtype
    GRAD_row_stride,
    N, K,
    num_row_tiles,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SINGLE_K_TILE: tl.constexpr,
):
    """dL/dx_ik = c_ik (G_ik - sum_k' c_ik' G_ik'),  G_ik = table[g_i,k] - coef (x_ik - lse_i)."""
    pid = tl.program_id(0)
    logc_coef = tl.load(COEF_ptr).to(ACC)
    for tile in range(pid, num_row_tiles, tl.num_programs(0)):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = offs_n < N
        rows = offs_n.to(tl.int64)
        groups = tl.load(G_ptr + rows, mask=row_mask, other=0)
        lse = tl.load(LSE_ptr + rows, mask=row_mask, other=0.0)
        X_rows = X_ptr + rows[:, None] * X_row_stride
        GRAD_rows = GRAD_ptr + rows[:, None] * GRAD_row_stride
        if SINGLE_K_TILE:
            offs_k = tl.arange(0, BLOCK_K)
            mask = row_mask[:, None] & (offs_k < K)[None, :]
            x = tl.load(X_rows + offs_k[None, :], mask=mask, other=0.0).to(ACC)
            c, grad_c = _fcmi_row_gradient(x, lse, groups, offs_k, mask, TABLE_ptr, K, logc_coef)
            row_dot = tl.sum(c * grad_c, axis=1)
            grad = c * (grad_c - row_dot[:, None])
            tl.store(GRAD_rows + offs_k[None, :], grad.to(GRAD_ptr.dtype.element_ty), mask=mask)
        else:
            row_dot = tl.zeros([BLOCK_N], dtype=ACC)
            for k_start in range(0, K, BLOCK_K):
                offs_k = k_start + tl.arange(0, BLOCK_K)
                mask = row_mask[:, None] & (offs_k < K)[None, :]
                x = tl.load(X_rows + offs_k[None, :], mask=mask, other=0.0).to(ACC)
                c, grad_c = _fcmi_row_gradient(x, lse, groups, offs_k, mask, TABLE_ptr, K, logc_coef)
                row_dot += tl.sum(c * grad_c, axis=1)
            for k_start in range(0, K, BLOCK_K):
                offs_k = k_start + tl.arange(0, BLOCK_K)
                mask = row_mask[:, None] & (offs_k < K)[None, :]
                x = tl.load(X_rows + offs_k[None, :], mask=mask, other=0.0).to(ACC)
                c, grad_c = _fcmi_row_gradient(x, lse, groups, offs_k, mask, TABLE_ptr, K, logc_coef)
                grad = c * (grad_c - row_dot[:, None])
                tl.store(GRAD_rows + offs_k[None, :], grad.to(GRAD_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- from embeddings
@triton.jit
def _unit_rows(H_ptr, H_row_stride, rows, row_mask, D, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    """Loads [BLOCK_N, BLOCK_D] rows of h and returns (h, h / max(||h||, eps), 1 / max(||h||, eps),
    ||h|| > eps) in the acc dtype (docs/math.md §1.2, as F.normalize)."""
    offs_d = tl.arange(0, BLOCK_D)
    h = tl.load(H_ptr + rows[:, None] * H_row_stride + offs_d[None, :],
                mask=row_mask[:, None] & (offs_d < D)[None, :], other=0.0).to(ACC)
    norm = tl.sqrt(tl.sum(h * h, axis=1))
    eps = cm.eps_of(ACC)
    inv_norm = 1.0 / tl.maximum(norm, eps)
    return h * inv_norm[:, None], inv_norm, norm > eps


@triton.jit
def _cosine_logits_tile(h_unit_dot, U_ptr, offs_k, k_mask, D, inv_tau,
                        ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    """logits[i, k] = <h_unit_i, u_unit_k> / tau for one K tile, and the [BLOCK_K, BLOCK_D]
    tile of unit centers (operand dtype) for reuse in the backward."""
    offs_d = tl.arange(0, BLOCK_D)
    u = tl.load(U_ptr + offs_k.to(tl.int64)[:, None] * D + offs_d[None, :],
                mask=k_mask[:, None] & (offs_d < D)[None, :], other=0.0).to(h_unit_dot.dtype)
    dots = tl.dot(h_unit_dot, tl.trans(u), input_precision="ieee").to(ACC)
    return dots * inv_tau, u


@triton.jit
def _fcmi_emb_fwd_kernel(
    H_ptr,            # embeddings [N, D]
    H_row_stride,
    U_ptr,            # unit centers [K, D] contiguous, operand dtype
    G_ptr,            # groups [N]
    PARAM_ptr,        # [1] acc: 1 / tau
    LSE_ptr,          # out: [N] acc
    JOINT_ptr,        # out: [slots, T, K] acc
    ENT_ptr,          # out: [slots] acc
    N, K, D, T,
    num_row_tiles,
    ACC: tl.constexpr,
    DOT: tl.constexpr,            # tl.dot operand dtype
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    SINGLE_K_TILE: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    """As _fcmi_fwd_kernel with x_ik = cos(h_i, u_k) / tau computed by tl.dot in registers
    (docs/math.md §1.2 + 3); the N x K logits never reach memory."""
    pid = tl.program_id(0)
    inv_tau = tl.load(PARAM_ptr).to(ACC)
    if ATOMIC:  # one table shared by all programs
        JOINT_slot = JOINT_ptr
    else:  # this program's private slot
        JOINT_slot = JOINT_ptr + pid.to(tl.int64) * T * K
    ent_rows = tl.zeros([BLOCK_N], dtype=ACC)
    for tile in range(pid, num_row_tiles, tl.num_programs(0)):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = offs_n < N
        rows = offs_n.to(tl.int64)
        groups = tl.load(G_ptr + rows, mask=row_mask, other=0)
        h_unit, inv_norm, nonzero = _unit_rows(H_ptr, H_row_stride, rows, row_mask, D, ACC, BLOCK_D)
        h_unit_dot = h_unit.to(DOT)
        if SINGLE_K_TILE:
            offs_k = tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x, u = _cosine_logits_tile(h_unit_dot, U_ptr, offs_k, k_mask, D, inv_tau, ACC, BLOCK_D)
            x = tl.where(k_mask[None, :], x, float("-inf"))
            row_max = tl.max(x, axis=1)
            lse = row_max + tl.log(tl.sum(tl.exp(x - row_max[:, None]), axis=1))
            ent_rows += _fcmi_tile_stats(x, lse, groups, row_mask, offs_k, k_mask, JOINT_slot, K, T,
                                         BLOCK_T, ATOMIC)
        else:
            row_max = tl.full([BLOCK_N], float("-inf"), dtype=ACC)
            sum_exp = tl.zeros([BLOCK_N], dtype=ACC)
            for k_start in range(0, K, BLOCK_K):
                offs_k = k_start + tl.arange(0, BLOCK_K)
                k_mask = offs_k < K
                x, u = _cosine_logits_tile(h_unit_dot, U_ptr, offs_k, k_mask, D, inv_tau, ACC, BLOCK_D)
                x = tl.where(k_mask[None, :], x, float("-inf"))
                row_max, sum_exp = _online_lse_update(row_max, sum_exp, x)
            lse = row_max + tl.log(sum_exp)
            for k_start in range(0, K, BLOCK_K):
                offs_k = k_start + tl.arange(0, BLOCK_K)
                k_mask = offs_k < K
                x, u = _cosine_logits_tile(h_unit_dot, U_ptr, offs_k, k_mask, D, inv_tau, ACC, BLOCK_D)
                x = tl.where(k_mask[None, :], x, 0.0)
                ent_rows += _fcmi_tile_stats(x, lse, groups, row_mask, offs_k, k_mask, JOINT_slot, K, T,
                                             BLOCK_T, ATOMIC)
        tl.store(LSE_ptr + rows, lse, mask=row_mask)
    if ATOMIC:
        tl.atomic_add(ENT_ptr, tl.sum(ent_rows))
    else:
        tl.store(ENT_ptr + pid, tl.sum(ent_rows))


@triton.jit
def _emb_grad_tile(grad_logits, h_unit_dot, u, offs_k, k_mask, D, GRAD_U_slot,
                   BLOCK_D: tl.constexpr, ATOMIC: tl.constexpr):
    """For one K tile of dL/dlogits (already / tau): returns its [BLOCK_N, BLOCK_D] contribution
    to dL/dh_unit = grad @ u_unit and adds grad^T @ h_unit into the dL/du_unit slot."""
    grad_dot = grad_logits.to(u.dtype)
    grad_h_unit = tl.dot(grad_dot, u, input_precision="ieee")
    grad_u_unit = tl.dot(tl.trans(grad_dot), h_unit_dot, input_precision="ieee")
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = GRAD_U_slot + offs_k.to(tl.int64)[:, None] * D + offs_d[None, :]
    mask = k_mask[:, None] & (offs_d < D)[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, grad_u_unit.to(GRAD_U_slot.dtype.element_ty), mask=mask)
    else:
        tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + grad_u_unit.to(GRAD_U_slot.dtype.element_ty),
                 mask=mask)
    return grad_h_unit


@triton.jit
def _normalize_bwd_rows(h_unit, inv_norm, nonzero, grad_unit):
    """dL/dh = (g - <h_unit, g> h_unit) / max(||h||, eps); the radial term is dropped where
    ||h|| <= eps (the clamp is active there), as torch_kernels.normalize_backward."""
    radial = tl.sum(h_unit * grad_unit, axis=1)
    radial = tl.where(nonzero, radial, 0.0)
    return (grad_unit - radial[:, None] * h_unit) * inv_norm[:, None]


@triton.jit
def _fcmi_emb_bwd_kernel(
    H_ptr,            # embeddings [N, D]
    H_row_stride,
    U_ptr,            # unit centers [K, D], operand dtype
    G_ptr,            # groups [N]
    LSE_ptr,          # [N] acc
    TABLE_ptr,        # [T, K] acc
    COEF_ptr,         # 0-dim acc: logc_coef
    PARAM_ptr,        # [1] acc: 1 / tau
    GRAD_H_ptr,       # out: [N, D] in h's dtype
    GRAD_H_row_stride,
    GRAD_U_ptr,       # out: [slots, K, D] acc, dL/du_unit partials
    N, K, D,
    num_row_tiles,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_K_TILE: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    """Recomputes x = cos(h, u)/tau, then dL/dx_ik = c_ik (G_ik - sum_k' c G) (docs/math.md §3) and
    chains it through x = h_unit u_unit^T / tau and the row normalisation of h (docs/math.md §1.2)."""
    pid = tl.program_id(0)
    logc_coef = tl.load(COEF_ptr).to(ACC)
    inv_tau = tl.load(PARAM_ptr).to(ACC)
    if ATOMIC:  # one table shared by all programs
        GRAD_U_slot = GRAD_U_ptr
    else:  # this program's private slot
        GRAD_U_slot = GRAD_U_ptr + pid.to(tl.int64) * K * D
    offs_d = tl.arange(0, BLOCK_D)
    for tile in range(pid, num_row_tiles, tl.num_programs(0)):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = offs_n < N
        rows = offs_n.to(tl.int64)
        groups = tl.load(G_ptr + rows, mask=row_mask, other=0)
        lse = tl.load(LSE_ptr + rows, mask=row_mask, other=0.0)
        h_unit, inv_norm, nonzero = _unit_rows(H_ptr, H_row_stride, rows, row_mask, D, ACC, BLOCK_D)
        h_unit_dot = h_unit.to(DOT)
        grad_h_unit = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
        if SINGLE_K_TILE:
            offs_k = tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            mask = row_mask[:, None] & k_mask[None, :]
            x, u = _cosine_logits_tile(h_unit_dot, U_ptr, offs_k, k_mask, D, inv_tau, ACC, BLOCK_D)
            c, grad_c = _fcmi_row_gradient(x, lse, groups, offs_k, mask, TABLE_ptr, K, logc_coef)
            row_dot = tl.sum(c * grad_c, axis=1)
            grad_x = c * (grad_c - row_dot[:, None]) * inv_tau
            grad_h_unit += _emb_grad_tile(grad_x, h_unit_dot, u, offs_k, k_mask, D, GRAD_U_slot,
                                          BLOCK_D, ATOMIC).to(ACC)
        else:
            row_dot = tl.zeros([BLOCK_N], dtype=ACC)
            for k_start in range(0, K, BLOCK_K):
                offs_k = k_start + tl.arange(0, BLOCK_K)
                k_mask = offs_k < K
                mask = row_mask[:, None] & k_mask[None, :]
                x, u = _cosine_logits_tile(h_unit_dot, U_ptr, offs_k, k_mask, D, inv_tau, ACC, BLOCK_D)
                c, grad_c = _fcmi_row_gradient(x, lse, groups, offs_k, mask, TABLE_ptr, K, logc_coef)
                row_dot += tl.sum(c * grad_c, axis=1)
            for k_start in range(0, K, BLOCK_K):
                offs_k = k_start + tl.arange(0, BLOCK_K)
                k_mask = offs_k < K
                mask = row_mask[:, None] & k_mask[None, :]
                x, u = _cosine_logits_tile(h_unit_dot, U_ptr, offs_k, k_mask, D, inv_tau, ACC, BLOCK_D)
                c, grad_c = _fcmi_row_gradient(x, lse, groups, offs_k, mask, TABLE_ptr, K, logc_coef)
                grad_x = c * (grad_c - row_dot[:, None]) * inv_tau
                grad_h_unit += _emb_grad_tile(grad_x, h_unit_dot, u, offs_k, k_mask, D, GRAD_U_slot,
                                              BLOCK_D, ATOMIC).to(ACC)
        grad_h = _normalize_bwd_rows(h_unit, inv_norm, nonzero, grad_h_unit)
        tl.store(GRAD_H_ptr + rows[:, None] * GRAD_H_row_stride + offs_d[None, :],
                 grad_h.to(GRAD_H_ptr.dtype.element_ty), mask=row_mask[:, None] & (offs_d < D)[None, :])


# --------------------------------------------------------------------------- host launchers
def _row_launch(num_rows, num_cols, device, partial_size=0, deterministic=False):
    """(BLOCK_N, BLOCK_K, single K tile?, number of row tiles, programs)."""
    blk_k = cm.block_k(num_cols)
    blk_n = cm.block_n(blk_k)
    tiles = triton.cdiv(num_rows, blk_n)
    programs = cm.num_programs(tiles, device, partial_size, deterministic)
    return blk_n, blk_k, num_cols <= blk_k, tiles, programs


@torch.library.custom_op("fairkernels::triton_fcmi_fwd", mutates_args=())
def fcmi_fwd(logits: torch.Tensor, groups: torch.Tensor, num_groups: int,
             deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (lse[N] acc, joint[T,K] acc, ent_sum[] acc); see _fcmi_fwd_kernel."""
    logits, groups = logits.contiguous(), groups.contiguous()
    num_rows, num_cols = logits.shape
    acc = cm.acc_dtype(logits.dtype)
    blk_n, blk_k, single, tiles, programs = _row_launch(num_rows, num_cols, logits.device,
                                                       num_groups * num_cols, deterministic)
    slots = cm.partial_slots(programs, deterministic)
    lse = torch.empty(num_rows, dtype=acc, device=logits.device)
    joint = torch.zeros(slots, num_groups, num_cols, dtype=acc, device=logits.device)
    ent = torch.zeros(slots, dtype=acc, device=logits.device)
    _fcmi_fwd_kernel[(programs,)](
        logits, logits.stride(0), groups, lse, joint, ent, num_rows, num_cols, num_groups, tiles,
        ACC=cm.tl_acc(logits.dtype), BLOCK_N=blk_n, BLOCK_K=blk_k, BLOCK_T=cm.BLOCK_T,
        SINGLE_K_TILE=single, ATOMIC=not deterministic)
    # fixed-order reduction of the per-program slots (a no-op view in atomic mode)
    return lse, joint.sum(0), ent.sum()


@fcmi_fwd.register_fake
def _(logits, groups, num_groups, deterministic=False):
    acc = cm.acc_dtype(logits.dtype)
    return (logits.new_empty(logits.shape[0], dtype=acc),
            logits.new_empty(num_groups, logits.shape[1], dtype=acc), logits.new_empty((), dtype=acc))


@torch.library.custom_op("fairkernels::triton_fcmi_bwd", mutates_args=())
def fcmi_bwd(logits: torch.Tensor, groups: torch.Tensor, lse: torch.Tensor, table: torch.Tensor,
             logc_coef: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
    """-> dL/dlogits [N, K] in the logits' dtype (row-local: deterministic in both modes)."""
    logits, groups = logits.contiguous(), groups.contiguous()
    acc = lse.dtype
    table = table.to(acc).contiguous()
    logc_coef = logc_coef.to(acc).reshape(())
    num_rows, num_cols = logits.shape
    blk_n, blk_k, single, tiles, programs = _row_launch(num_rows, num_cols, logits.device)
    grad = torch.empty_like(logits)
    _fcmi_bwd_kernel[(programs,)](
        logits, logits.stride(0), groups, lse, table, logc_coef, grad, grad.stride(0),
        num_rows, num_cols, tiles,
        ACC=cm.tl_acc(acc), BLOCK_N=blk_n, BLOCK_K=blk_k, SINGLE_K_TILE=single)
    return grad


@fcmi_bwd.register_fake
def _(logits, groups, lse, table, logc_coef, deterministic=False):
    return torch.empty_like(logits)


def _unit_centers(centers, acc):
    return torch.nn.functional.normalize(centers.to(acc), dim=1, eps=cm.NORM_EPS)


def _emb_launch(h, centers, partial_size, deterministic):
    num_rows, dim = h.shape
    num_cols = centers.shape[0]
    blk_d = cm.block_d(dim)
    blk_k = cm.block_k(num_cols)
    # the [BLOCK_N, BLOCK_D] rows of h and the [BLOCK_N, BLOCK_K] logits share the register tile
    blk_n = max(cm.MIN_DOT, min(128, cm.TILE_ELEMENTS // max(blk_k, blk_d)))
    tiles = triton.cdiv(num_rows, blk_n)
    programs = cm.num_programs(tiles, h.device, partial_size, deterministic)
    return blk_n, blk_k, blk_d, num_cols <= blk_k, tiles, programs


@torch.library.custom_op("fairkernels::triton_fcmi_emb_fwd", mutates_args=())
def fcmi_emb_fwd(h: torch.Tensor, centers: torch.Tensor, groups: torch.Tensor, num_groups: int,
                 tau: float, deterministic: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (lse[N], joint[T,K], ent_sum[]) of softmax(cos(h, centers) / tau), N x K never stored.

    Centers are normalised on the host (O(K d)); rows of h in the kernel. Feature dims above
    _common.MAX_BLOCK_D take the chunked path of fairkernels.ops.fcmi over fcmi_fwd."""
    h, centers, groups = h.contiguous(), centers.contiguous(), groups.contiguous()
    if h.shape[1] > cm.MAX_BLOCK_D:
        from fairkernels import triton as fk_triton
        from fairkernels.ops.fcmi import _chunked_emb_fwd
        return _chunked_emb_fwd(fk_triton, h, centers, groups, num_groups, tau, deterministic)
    acc = cm.acc_dtype(h.dtype)
    num_rows, dim = h.shape
    num_cols = centers.shape[0]
    blk_n, blk_k, blk_d, single, tiles, programs = _emb_launch(h, centers, num_groups * num_cols,
                                                               deterministic)
    slots = cm.partial_slots(programs, deterministic)
    units = _unit_centers(centers, acc).to(h.dtype).contiguous()
    params = torch.tensor([1.0 / tau], dtype=acc, device=h.device)
    lse = torch.empty(num_rows, dtype=acc, device=h.device)
    joint = torch.zeros(slots, num_groups, num_cols, dtype=acc, device=h.device)
    ent = torch.zeros(slots, dtype=acc, device=h.device)
    _fcmi_emb_fwd_kernel[(programs,)](
        h, h.stride(0), units, groups, params, lse, joint, ent, num_rows, num_cols, dim, num_groups,
        tiles, ACC=cm.tl_acc(h.dtype), DOT=cm.tl_dot_dtype(h.dtype, h.device), BLOCK_N=blk_n, BLOCK_K=blk_k,
        BLOCK_D=blk_d, BLOCK_T=cm.BLOCK_T, SINGLE_K_TILE=single, ATOMIC=not deterministic)
    return lse, joint.sum(0), ent.sum()


@fcmi_emb_fwd.register_fake
def _(h, centers, groups, num_groups, tau, deterministic=False):
    acc = cm.acc_dtype(h.dtype)
    return (h.new_empty(h.shape[0], dtype=acc), h.new_empty(num_groups, centers.shape[0], dtype=acc),
            h.new_empty((), dtype=acc))


@torch.library.custom_op("fairkernels::triton_fcmi_emb_bwd", mutates_args=())
def fcmi_emb_bwd(h: torch.Tensor, centers: torch.Tensor, groups: torch.Tensor, lse: torch.Tensor,
                 table: torch.Tensor, logc_coef: torch.Tensor, tau: float, deterministic: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (grad_h [N, D] h's dtype, grad_centers [K, D] centers' dtype). dL/du_unit is summed over
    rows with atomics, or per-program slots (deterministic; P x K x D floats), then chained
    through the center normalisation on the host."""
    from fairkernels.ops.torch_kernels import normalize_backward
    h, centers, groups = h.contiguous(), centers.contiguous(), groups.contiguous()
    acc = lse.dtype
    if h.shape[1] > cm.MAX_BLOCK_D:
        from fairkernels import triton as fk_triton
        from fairkernels.ops.fcmi import _chunked_emb_bwd
        return _chunked_emb_bwd(fk_triton, h, centers, groups, lse, table, logc_coef, tau, deterministic)
    num_rows, dim = h.shape
    num_cols = centers.shape[0]
    blk_n, blk_k, blk_d, single, tiles, programs = _emb_launch(h, centers, num_cols * dim, deterministic)
    slots = cm.partial_slots(programs, deterministic)
    centers_acc = centers.to(acc)
    units_acc = _unit_centers(centers, acc)
    units = units_acc.to(h.dtype).contiguous()
    params = torch.tensor([1.0 / tau], dtype=acc, device=h.device)
    grad_h = torch.empty_like(h)
    grad_units = torch.zeros(slots, num_cols, dim, dtype=acc, device=h.device)
    _fcmi_emb_bwd_kernel[(programs,)](
        h, h.stride(0), units, groups, lse, table.to(acc).contiguous(), logc_coef.to(acc).reshape(()),
        params, grad_h, grad_h.stride(0), grad_units, num_rows, num_cols, dim, tiles,
        ACC=cm.tl_acc(h.dtype), DOT=cm.tl_dot_dtype(h.dtype, h.device), BLOCK_N=blk_n, BLOCK_K=blk_k,
        BLOCK_D=blk_d, SINGLE_K_TILE=single, ATOMIC=not deterministic)
    grad_centers = normalize_backward(centers_acc, units_acc, grad_units.sum(0))
    return grad_h, grad_centers.to(centers.dtype)


@fcmi_emb_bwd.register_fake
def _(h, centers, groups, lse, table, logc_coef, tau, deterministic=False):
    return torch.empty_like(h), torch.empty_like(centers)
