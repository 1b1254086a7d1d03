"""Triton kernels of the fused FCMI loss (docs/math.md §3): from logits, and from embeddings with cosine
logits (docs/math.md §1.2 + 3) that live in registers only.

Forward: one read of the logits (or of h), per row the logsumexp, and the sufficient statistics
sum_{i in t} c_ik (T x K) and sum_ik c_ik log c_ik. Each program keeps them in registers while
it walks its row tiles (T <= _common.BLOCK_T and K in one tile) and adds them to memory once at
its end. Backward: dL/dlogits_ik = c_ik (G_ik - sum_k' c_ik' G_ik'),
G_ik = table[g_i, k] - logc_coef log c_ik, with c recomputed from the row. When the row fits one
K tile the backward recomputes the row logsumexp too, so the forward writes no lse (it returns
an empty tensor that the backward ignores); otherwise the forward saves it (N floats) and both
kernels take a second pass over the row.

deterministic=False adds the statistics with relaxed atomics (one add per table entry per
program; run-to-run order varies on GPU); deterministic=True gives each program a private
T x K slot reduced afterwards in a fixed order, costing P x T x K accumulation floats (P capped
by _common.PARTIAL_BUDGET).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fairkernels.triton import _common as cm

# N and the row-tile count change with every batch size: never specialise on them.
_ROWS = ["N", "num_row_tiles"]


def _fcmi_max_registers(num_warps):
    """The loss from logits is a pure streaming kernel: 128 registers leave room for two 8-warp
    blocks per SM. At 16 warps 128 is the hardware cap already, and an explicit maxnreg there
    made ptxas spill in float64 (kernel_report.py), so it is left to ptxas."""
    return 128 if num_warps <= 8 else None


@triton.jit
def _log_c_tile(x, lse, mask):
    """log c = x - lse and c = exp(log c) of one tile, 0 where masked (0 log 0 = 0)."""
    log_c = tl.where(mask, x - lse[:, None], 0.0)
    return log_c, tl.where(mask, tl.exp(log_c), 0.0)


@triton.jit
def _shift_rows(x):
    """x - row max of a tile holding whole rows (masked entries -inf). c and log c depend only
    on x - lse; after the shift lse lies in [0, log K], so log c = x - lse keeps full precision
    whatever the logits' magnitude (at |x| ~ 1e4 in float32, an unshifted lse alone is off by
    ulp(1e4) ~ 1e-3 and the soft assignments by as much)."""
    return x - tl.max(x, axis=1)[:, None]


@triton.jit
def _shifted_lse(x):
    """Row logsumexp of a tile shifted by _shift_rows (its row max is 0)."""
    return tl.log(tl.sum(tl.exp(x), axis=1))


@triton.jit
def _fcmi_stats(x, lse, groups, row_mask, offs_k, k_mask, JOINT_slot, joint, K, T,
                BLOCK_T: tl.constexpr, REG_JOINT: tl.constexpr, ATOMIC: tl.constexpr):
    """Folds one tile of c = exp(x - lse) into the joint (the register accumulator `joint` when
    REG_JOINT, else straight into memory); returns (joint, per-row sum of c log c)."""
    mask = row_mask[:, None] & k_mask[None, :]
    log_c, c = _log_c_tile(x, lse, mask)
    if REG_JOINT:
        onehot, offs_t = cm.group_onehot(groups, row_mask, 0, BLOCK_T)
        joint = tl.dot(onehot.to(c.dtype), c, joint, input_precision="ieee", out_dtype=joint.dtype)
    else:
        cm.add_joint_tile(JOINT_slot, c, groups, row_mask, offs_k, k_mask, K, T, BLOCK_T, ATOMIC)
    return joint, tl.sum(c * log_c, axis=1)


@triton.jit
def _flush_stats(JOINT_slot, joint, ENT_ptr, ent_rows, K, T, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                 REG_JOINT: tl.constexpr, ATOMIC: tl.constexpr):
    """End of a forward program: its register joint (REG_JOINT) and entropy sum, added once."""
    if REG_JOINT:
        cm.flush_joint(JOINT_slot, joint, K, T, BLOCK_T, BLOCK_K, ATOMIC)
    cm.add_scalar(cm.slot(ENT_ptr, 1, ATOMIC), tl.sum(ent_rows), ATOMIC)


@triton.jit
def _row_logits_lse(X_rows, row_mask, K, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """Row logsumexp over K tiles of logits (online, docs/math.md §3)."""
    row_max = tl.full([BLOCK_N], float("-inf"), dtype=ACC)
    sum_exp = tl.zeros([BLOCK_N], dtype=ACC)
    for k_start in range(0, K, BLOCK_K):
        offs_k, k_mask = cm.col_tile(k_start, K, BLOCK_K)
        x = cm.load_rows(X_rows, offs_k, row_mask, k_mask, float("-inf"), ACC)
        row_max, sum_exp = cm.online_lse_update(row_max, sum_exp, tl.where(row_mask[:, None], x, 0.0))
    return row_max + tl.log(sum_exp)


@triton.jit(do_not_specialize=_ROWS)
def _fcmi_fwd_kernel(
    X_ptr,            # logits [N, K], any float dtype
    X_row_stride,     # elements between consecutive rows of X
    G_ptr,            # groups [N], int32 or int64
    LSE_ptr,          # out: logsumexp [N], acc dtype (written only when not SINGLE_K_TILE)
    JOINT_ptr,        # out: [slots, T, K] acc, slot = pid (deterministic) or 0 (atomic)
    ENT_ptr,          # out: [slots] acc, sum of c log c
    N, K, T,
    num_row_tiles,    # cdiv(N, BLOCK_N)
    ACC: tl.constexpr,            # tl.float32 or tl.float64
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    SINGLE_K_TILE: tl.constexpr,  # K <= BLOCK_K: one read of the row, lse recomputed in the bwd
    REG_JOINT: tl.constexpr,      # SINGLE_K_TILE and T <= BLOCK_T: joint in registers
    ATOMIC: tl.constexpr,
):
    """lse_i = log sum_k exp(x_ik); J_tk = sum_{g_i = t} c_ik; E = sum_ik c_ik log c_ik, with
    log c_ik = x_ik - lse_i (docs/math.md §3)."""
    JOINT_slot = cm.slot(JOINT_ptr, T * K, ATOMIC)
    joint = tl.zeros([BLOCK_T, BLOCK_K], dtype=ACC)
    ent_rows = tl.zeros([BLOCK_N], dtype=ACC)
    for tile in range(tl.program_id(0), num_row_tiles, tl.num_programs(0)):
        rows, row_mask = cm.row_tile(tile, N, BLOCK_N)
        groups = tl.load(G_ptr + rows, mask=row_mask, other=0)
        X_rows = X_ptr + rows[:, None] * X_row_stride
        if SINGLE_K_TILE:
            offs_k, k_mask = cm.col_tile(0, K, BLOCK_K)
            x = cm.load_rows(X_rows, offs_k, row_mask, k_mask, float("-inf"), ACC)
            x = _shift_rows(tl.where(row_mask[:, None], x, 0.0))
            joint, ent = _fcmi_stats(x, _shifted_lse(x), groups, row_mask, offs_k, k_mask, JOINT_slot,
                                     joint, K, T, BLOCK_T, REG_JOINT, ATOMIC)
            ent_rows += ent
        else:
            lse = _row_logits_lse(X_rows, row_mask, K, ACC, BLOCK_N, BLOCK_K)
            for k_start in range(0, K, BLOCK_K):
                offs_k, k_mask = cm.col_tile(k_start, K, BLOCK_K)
                x = cm.load_rows(X_rows, offs_k, row_mask, k_mask, 0.0, ACC)
                joint, ent = _fcmi_stats(x, lse, groups, row_mask, offs_k, k_mask, JOINT_slot, joint, K, T,
                                         BLOCK_T, False, ATOMIC)
                ent_rows += ent
            tl.store(LSE_ptr + rows, lse, mask=row_mask)
    _flush_stats(JOINT_slot, joint, ENT_ptr, ent_rows, K, T, BLOCK_T, BLOCK_K, REG_JOINT, ATOMIC)


@triton.jit
def _fcmi_row_gradient(x, lse, groups, offs_k, mask, TABLE_ptr, K, logc_coef):
    """c and G_ik = table[g_i, k] - logc_coef * log c_ik for one tile (zero where masked)."""
    log_c, c = _log_c_tile(x, lse, mask)
    table = tl.load(TABLE_ptr + groups.to(tl.int64)[:, None] * K + offs_k[None, :], mask=mask, other=0.0)
    return c, tl.where(mask, table - logc_coef * log_c, 0.0)


@triton.jit(do_not_specialize=_ROWS)
def _fcmi_bwd_kernel(
    X_ptr,            # logits [N, K]
    X_row_stride,
    G_ptr,            # groups [N]
    LSE_ptr,          # logsumexp [N] acc (saved by the forward; unused when SINGLE_K_TILE)
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
    logc_coef = tl.load(COEF_ptr).to(ACC)
    for tile in range(tl.program_id(0), num_row_tiles, tl.num_programs(0)):
        rows, row_mask = cm.row_tile(tile, N, BLOCK_N)
        groups = tl.load(G_ptr + rows, mask=row_mask, other=0)
        X_rows = X_ptr + rows[:, None] * X_row_stride
        GRAD_rows = GRAD_ptr + rows[:, None] * GRAD_row_stride
        if SINGLE_K_TILE:
            offs_k, k_mask = cm.col_tile(0, K, BLOCK_K)
            mask = row_mask[:, None] & k_mask[None, :]
            x = cm.load_rows(X_rows, offs_k, row_mask, k_mask, float("-inf"), ACC)
            x = _shift_rows(tl.where(row_mask[:, None], x, 0.0))
            c, grad_c = _fcmi_row_gradient(x, _shifted_lse(x), groups, offs_k, mask, TABLE_ptr, K, logc_coef)
            grad = c * (grad_c - tl.sum(c * grad_c, axis=1)[:, None])
            cm.store_rows(GRAD_rows, offs_k, row_mask, k_mask, grad)
        else:
            lse = tl.load(LSE_ptr + rows, mask=row_mask, other=0.0)
            row_dot = tl.zeros([BLOCK_N], dtype=ACC)
            for k_start in range(0, K, BLOCK_K):
                offs_k, k_mask = cm.col_tile(k_start, K, BLOCK_K)
                x = cm.load_rows(X_rows, offs_k, row_mask, k_mask, 0.0, ACC)
                c, grad_c = _fcmi_row_gradient(x, lse, groups, offs_k, row_mask[:, None] & k_mask[None, :],
                                               TABLE_ptr, K, logc_coef)
                row_dot += tl.sum(c * grad_c, axis=1)
            for k_start in range(0, K, BLOCK_K):
                offs_k, k_mask = cm.col_tile(k_start, K, BLOCK_K)
                x = cm.load_rows(X_rows, offs_k, row_mask, k_mask, 0.0, ACC)
                c, grad_c = _fcmi_row_gradient(x, lse, groups, offs_k, row_mask[:, None] & k_mask[None, :],
                                               TABLE_ptr, K, logc_coef)
                cm.store_rows(GRAD_rows, offs_k, row_mask, k_mask, c * (grad_c - row_dot[:, None]))


# --------------------------------------------------------------------------- from embeddings
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
def _emb_row_lse(h_unit_dot, U_ptr, K, D, inv_tau, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row logsumexp of cos(h, u) / tau over K tiles (online)."""
    row_max = tl.full([BLOCK_N], float("-inf"), dtype=ACC)
    sum_exp = tl.zeros([BLOCK_N], dtype=ACC)
    for k_start in range(0, K, BLOCK_K):
        offs_k, k_mask = cm.col_tile(k_start, K, BLOCK_K)
        x, u = _cosine_logits_tile(h_unit_dot, U_ptr, offs_k, k_mask, D, inv_tau, ACC, BLOCK_D)
        row_max, sum_exp = cm.online_lse_update(row_max, sum_exp, tl.where(k_mask[None, :], x, float("-inf")))
    return row_max + tl.log(sum_exp)


@triton.jit(do_not_specialize=_ROWS)
def _fcmi_emb_fwd_kernel(
    H_ptr,            # embeddings [N, D]
    H_row_stride,
    U_ptr,            # unit centers [K, D] contiguous, operand dtype
    G_ptr,            # groups [N]
    inv_tau: "fp64",  # 1 / tau
    LSE_ptr,          # out: [N] acc (written only when not SINGLE_K_TILE)
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
    REG_JOINT: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    """As _fcmi_fwd_kernel with x_ik = cos(h_i, u_k) / tau computed by tl.dot in registers
    (docs/math.md §1.2 + 3); the N x K logits never reach memory."""
    inv_tau_acc = tl.full((), inv_tau, ACC)
    JOINT_slot = cm.slot(JOINT_ptr, T * K, ATOMIC)
    joint = tl.zeros([BLOCK_T, BLOCK_K], dtype=ACC)
    ent_rows = tl.zeros([BLOCK_N], dtype=ACC)
    for tile in range(tl.program_id(0), num_row_tiles, tl.num_programs(0)):
        rows, row_mask = cm.row_tile(tile, N, BLOCK_N)
        groups = tl.load(G_ptr + rows, mask=row_mask, other=0)
        h_unit, inv_norm, nonzero = cm.unit_rows(H_ptr, H_row_stride, rows, row_mask, D, ACC, BLOCK_D)
        h_unit_dot = h_unit.to(DOT)
        if SINGLE_K_TILE:
            offs_k, k_mask = cm.col_tile(0, K, BLOCK_K)
            x, u = _cosine_logits_tile(h_unit_dot, U_ptr, offs_k, k_mask, D, inv_tau_acc, ACC, BLOCK_D)
            lse = cm.row_lse(tl.where(k_mask[None, :], x, float("-inf")))
            joint, ent = _fcmi_stats(x, lse, groups, row_mask, offs_k, k_mask, JOINT_slot, joint, K, T,
                                     BLOCK_T, REG_JOINT, ATOMIC)
            ent_rows += ent
        else:
            lse = _emb_row_lse(h_unit_dot, U_ptr, K, D, inv_tau_acc, ACC, BLOCK_N, BLOCK_K, BLOCK_D)
            for k_start in range(0, K, BLOCK_K):
                offs_k, k_mask = cm.col_tile(k_start, K, BLOCK_K)
                x, u = _cosine_logits_tile(h_unit_dot, U_ptr, offs_k, k_mask, D, inv_tau_acc, ACC, BLOCK_D)
                joint, ent = _fcmi_stats(x, lse, groups, row_mask, offs_k, k_mask, JOINT_slot, joint, K, T,
                                         BLOCK_T, False, ATOMIC)
                ent_rows += ent
            tl.store(LSE_ptr + rows, lse, mask=row_mask)
    _flush_stats(JOINT_slot, joint, ENT_ptr, ent_rows, K, T, BLOCK_T, BLOCK_K, REG_JOINT, ATOMIC)


@triton.jit
def _emb_grad_tile(grad_logits, h_unit_dot, u):
    """For one K tile of dL/dlogits (already / tau): its [BLOCK_N, BLOCK_D] contribution to
    dL/dh_unit = grad @ u_unit and its [BLOCK_K, BLOCK_D] contribution grad^T @ h_unit to
    dL/du_unit."""
    grad_dot = grad_logits.to(u.dtype)
    return (tl.dot(grad_dot, u, input_precision="ieee"),
            tl.dot(tl.trans(grad_dot), h_unit_dot, input_precision="ieee"))


@triton.jit
def _add_units_grad(GRAD_U_slot, grad_u, offs_k, k_mask, D, BLOCK_D: tl.constexpr, ATOMIC: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    cm.add_to_table(GRAD_U_slot + offs_k.to(tl.int64)[:, None] * D + offs_d[None, :],
                    grad_u.to(GRAD_U_slot.dtype.element_ty), k_mask[:, None] & (offs_d < D)[None, :], ATOMIC)


@triton.jit(do_not_specialize=_ROWS)
def _fcmi_emb_bwd_kernel(
    H_ptr,            # embeddings [N, D]
    H_row_stride,
    U_ptr,            # unit centers [K, D], operand dtype
    G_ptr,            # groups [N]
    LSE_ptr,          # [N] acc (unused when SINGLE_K_TILE)
    TABLE_ptr,        # [T, K] acc
    COEF_ptr,         # 0-dim acc: logc_coef
    inv_tau: "fp64",  # 1 / tau
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
    logc_coef = tl.load(COEF_ptr).to(ACC)
    inv_tau_acc = tl.full((), inv_tau, ACC)
    GRAD_U_slot = cm.slot(GRAD_U_ptr, K * D, ATOMIC)
    offs_d = tl.arange(0, BLOCK_D)
    grad_u_acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=ACC)  # SINGLE_K_TILE: this program's dL/du_unit
    for tile in range(tl.program_id(0), num_row_tiles, tl.num_programs(0)):
        rows, row_mask = cm.row_tile(tile, N, BLOCK_N)
        groups = tl.load(G_ptr + rows, mask=row_mask, other=0)
        h_unit, inv_norm, nonzero = cm.unit_rows(H_ptr, H_row_stride, rows, row_mask, D, ACC, BLOCK_D)
        h_unit_dot = h_unit.to(DOT)
        grad_h_unit = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
        if SINGLE_K_TILE:
            offs_k, k_mask = cm.col_tile(0, K, BLOCK_K)
            mask = row_mask[:, None] & k_mask[None, :]
            x, u = _cosine_logits_tile(h_unit_dot, U_ptr, offs_k, k_mask, D, inv_tau_acc, ACC, BLOCK_D)
            lse = cm.row_lse(tl.where(k_mask[None, :], x, float("-inf")))
            c, grad_c = _fcmi_row_gradient(x, lse, groups, offs_k, mask, TABLE_ptr, K, logc_coef)
            grad_x = c * (grad_c - tl.sum(c * grad_c, axis=1)[:, None]) * inv_tau_acc
            grad_h_tile, grad_u_tile = _emb_grad_tile(grad_x, h_unit_dot, u)
            grad_h_unit += grad_h_tile.to(ACC)
            grad_u_acc += grad_u_tile.to(ACC)  # flushed once per program, below
        else:
            lse = tl.load(LSE_ptr + rows, mask=row_mask, other=0.0)
            row_dot = tl.zeros([BLOCK_N], dtype=ACC)
            for k_start in range(0, K, BLOCK_K):
                offs_k, k_mask = cm.col_tile(k_start, K, BLOCK_K)
                x, u = _cosine_logits_tile(h_unit_dot, U_ptr, offs_k, k_mask, D, inv_tau_acc, ACC, BLOCK_D)
                c, grad_c = _fcmi_row_gradient(x, lse, groups, offs_k, row_mask[:, None] & k_mask[None, :],
                                               TABLE_ptr, K, logc_coef)
                row_dot += tl.sum(c * grad_c, axis=1)
            for k_start in range(0, K, BLOCK_K):
                offs_k, k_mask = cm.col_tile(k_start, K, BLOCK_K)
                x, u = _cosine_logits_tile(h_unit_dot, U_ptr, offs_k, k_mask, D, inv_tau_acc, ACC, BLOCK_D)
                c, grad_c = _fcmi_row_gradient(x, lse, groups, offs_k, row_mask[:, None] & k_mask[None, :],
                                               TABLE_ptr, K, logc_coef)
                grad_x = c * (grad_c - row_dot[:, None]) * inv_tau_acc
                grad_h_tile, grad_u_tile = _emb_grad_tile(grad_x, h_unit_dot, u)
                grad_h_unit += grad_h_tile.to(ACC)
                _add_units_grad(GRAD_U_slot, grad_u_tile, offs_k, k_mask, D, BLOCK_D, ATOMIC)
        grad_h = cm.normalize_bwd_rows(h_unit, inv_norm, nonzero, grad_h_unit)
        tl.store(GRAD_H_ptr + rows[:, None] * GRAD_H_row_stride + offs_d[None, :],
                 grad_h.to(GRAD_H_ptr.dtype.element_ty), mask=row_mask[:, None] & (offs_d < D)[None, :])
    if SINGLE_K_TILE:
        offs_k, k_mask = cm.col_tile(0, K, BLOCK_K)
        _add_units_grad(GRAD_U_slot, grad_u_acc, offs_k, k_mask, D, BLOCK_D, ATOMIC)


# --------------------------------------------------------------------------- host launchers
def _stats_buffers(num_rows, num_groups, num_cols, acc, device, slots, single):
    """lse (empty when the backward recomputes it), joint slots, entropy slots."""
    lse = torch.empty(0 if single else num_rows, dtype=acc, device=device)
    return (lse, torch.zeros(slots, num_groups, num_cols, dtype=acc, device=device),
            torch.zeros(slots, dtype=acc, device=device))


def _lse_rows(num_rows, num_cols, dtype, dim=None):
    """Rows of the lse the forward returns: 0 when the backward recomputes it (one K tile)."""
    cfg = cm.row_config(num_cols, dtype) if dim is None else cm.dot_config(num_cols, dim, dtype)
    return 0 if cfg.single else num_rows


def _fwd_warps(cfg, num_groups):
    """Twice row_config's warps for a one-tile row whose joint is not in registers (T > BLOCK_T,
    group tiles looped per row tile): with 8 warps at K = 100, ptxas spilled 20 bytes
    (benchmarks/kernel_report.py)."""
    if cfg.single and num_groups > cm.BLOCK_T:
        return min(cm.MAX_WARPS, 2 * cfg.num_warps)
    return cfg.num_warps


@torch.library.custom_op("fairkernels::triton_fcmi_fwd", mutates_args=())
def fcmi_fwd(logits: torch.Tensor, groups: torch.Tensor, num_groups: int,
             deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (lse [N] acc, or [0] when K fits one tile; joint [T, K] acc; ent_sum [] acc)."""
    logits, groups = logits.contiguous(), groups.contiguous()
    num_rows, num_cols = logits.shape
    cfg = cm.row_config(num_cols, logits.dtype)
    tiles = triton.cdiv(num_rows, cfg.block_n)
    programs = cm.num_programs(tiles, logits.device, num_groups * num_cols, deterministic)
    lse, joint, ent = _stats_buffers(num_rows, num_groups, num_cols, cm.acc_dtype(logits.dtype), logits.device,
                                     cm.partial_slots(programs, deterministic), cfg.single)
    warps = _fwd_warps(cfg, num_groups)
    cm.launch(_fcmi_fwd_kernel, programs, logits, logits.stride(0), groups, lse, joint, ent,
              num_rows, num_cols, num_groups, tiles,
              ACC=cm.tl_acc(logits.dtype), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_T=cm.BLOCK_T,
              SINGLE_K_TILE=cfg.single, REG_JOINT=cfg.single and num_groups <= cm.BLOCK_T,
              ATOMIC=not deterministic, num_warps=warps, maxnreg=_fcmi_max_registers(warps))
    # fixed-order reduction of the per-program slots (a no-op view in atomic mode)
    return lse, joint.sum(0), ent.sum()


@fcmi_fwd.register_fake
def _(logits, groups, num_groups, deterministic=False):
    acc = cm.acc_dtype(logits.dtype)
    return (logits.new_empty(_lse_rows(*logits.shape, logits.dtype), dtype=acc),
            logits.new_empty(num_groups, logits.shape[1], dtype=acc), logits.new_empty((), dtype=acc))


@torch.library.custom_op("fairkernels::triton_fcmi_bwd", mutates_args=())
def fcmi_bwd(logits: torch.Tensor, groups: torch.Tensor, lse: torch.Tensor, table: torch.Tensor,
             logc_coef: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
    """-> dL/dlogits [N, K] in the logits' dtype (row-local: deterministic in both modes).
    lse is the forward's (ignored, and may be empty, when K fits one tile)."""
    logits, groups = logits.contiguous(), groups.contiguous()
    acc = cm.acc_dtype(logits.dtype)
    num_rows, num_cols = logits.shape
    cfg = cm.row_config(num_cols, logits.dtype)
    tiles = triton.cdiv(num_rows, cfg.block_n)
    grad = torch.empty_like(logits)
    cm.launch(_fcmi_bwd_kernel, cm.num_programs(tiles, logits.device), logits, logits.stride(0), groups,
              lse.to(acc), table.to(acc).contiguous(), logc_coef.to(acc).reshape(()), grad, grad.stride(0),
              num_rows, num_cols, tiles,
              ACC=cm.tl_acc(logits.dtype), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SINGLE_K_TILE=cfg.single,
              num_warps=cfg.num_warps, maxnreg=_fcmi_max_registers(cfg.num_warps))
    return grad


@fcmi_bwd.register_fake
def _(logits, groups, lse, table, logc_coef, deterministic=False):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _unit_centers(centers, acc):
    return F.normalize(centers.to(acc), dim=1, eps=cm.NORM_EPS)


def _wide_logits(h, units, tau):
    """Row chunks of cos(h, u) / tau for feature dims above _common.max_block_d (bounded memory)."""
    step = max(1, (1 << 22) // units.shape[0])
    for start in range(0, h.shape[0], step):
        stop = min(start + step, h.shape[0])
        h_unit = F.normalize(h[start:stop].to(units.dtype), dim=1, eps=cm.NORM_EPS)
        yield start, stop, h_unit, h_unit @ units.t() / tau


@torch.library.custom_op("fairkernels::triton_fcmi_emb_fwd", mutates_args=())
def fcmi_emb_fwd(h: torch.Tensor, centers: torch.Tensor, groups: torch.Tensor, num_groups: int,
                 tau: float, deterministic: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (lse [N] or [0], joint [T, K], ent_sum []) of softmax(cos(h, centers) / tau); N x K
    never stored. Centers are normalised on the host (O(K d)), rows of h in the kernel. Feature
    dims above _common.max_block_d compute the logits in row chunks and run fcmi_fwd on each."""
    h, centers, groups = h.contiguous(), centers.contiguous(), groups.contiguous()
    acc = cm.acc_dtype(h.dtype)
    num_rows, dim = h.shape
    num_cols = centers.shape[0]
    if dim > cm.max_block_d(h.dtype):
        stats = [_raw_fcmi_fwd(logits, groups[a:b], num_groups, deterministic)
                 for a, b, _, logits in _wide_logits(h, _unit_centers(centers, acc), tau)]
        return (torch.cat([s[0] for s in stats]), torch.stack([s[1] for s in stats]).sum(0),
                torch.stack([s[2] for s in stats]).sum())
    cfg = cm.dot_config(num_cols, dim, h.dtype)
    tiles = triton.cdiv(num_rows, cfg.block_n)
    programs = cm.num_programs(tiles, h.device, num_groups * num_cols, deterministic)
    lse, joint, ent = _stats_buffers(num_rows, num_groups, num_cols, acc, h.device,
                                     cm.partial_slots(programs, deterministic), cfg.single)
    units = _unit_centers(centers, acc).to(h.dtype).contiguous()
    cm.launch(_fcmi_emb_fwd_kernel, programs, h, h.stride(0), units, groups, 1.0 / tau, lse, joint, ent,
              num_rows, num_cols, dim, num_groups, tiles,
              ACC=cm.tl_acc(h.dtype), DOT=cm.tl_dot_dtype(h.dtype, h.device), BLOCK_N=cfg.block_n,
              BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d, BLOCK_T=cm.BLOCK_T, SINGLE_K_TILE=cfg.single,
              REG_JOINT=cfg.single and num_groups <= cm.BLOCK_T, ATOMIC=not deterministic,
              num_warps=cfg.num_warps)
    return lse, joint.sum(0), ent.sum()


_raw_fcmi_fwd = fcmi_fwd._init_fn
_raw_fcmi_bwd = fcmi_bwd._init_fn


def _emb_lse_rows(h, centers):
    if h.shape[1] > cm.max_block_d(h.dtype):  # fcmi_fwd on float32/float64 logits of the row chunks
        return _lse_rows(h.shape[0], centers.shape[0], cm.acc_dtype(h.dtype))
    return _lse_rows(h.shape[0], centers.shape[0], h.dtype, h.shape[1])


@fcmi_emb_fwd.register_fake
def _(h, centers, groups, num_groups, tau, deterministic=False):
    acc = cm.acc_dtype(h.dtype)
    return (h.new_empty(_emb_lse_rows(h, centers), dtype=acc),
            h.new_empty(num_groups, centers.shape[0], dtype=acc), h.new_empty((), dtype=acc))


@torch.library.custom_op("fairkernels::triton_fcmi_emb_bwd", mutates_args=())
def fcmi_emb_bwd(h: torch.Tensor, centers: torch.Tensor, groups: torch.Tensor, lse: torch.Tensor,
                 table: torch.Tensor, logc_coef: torch.Tensor, tau: float, deterministic: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (grad_h [N, D] h's dtype, grad_centers [K, D] centers' dtype). dL/du_unit is summed over
    rows with atomics, or per-program slots (deterministic; P x K x D floats), then chained
    through the center normalisation on the host."""
    h, centers, groups = h.contiguous(), centers.contiguous(), groups.contiguous()
    acc = cm.acc_dtype(h.dtype)
    num_rows, dim = h.shape
    num_cols = centers.shape[0]
    centers_acc = centers.to(acc)
    units_acc = _unit_centers(centers, acc)
    table = table.to(acc).contiguous()
    logc_coef = logc_coef.to(acc).reshape(())
    grad_h = torch.empty_like(h)
    if dim > cm.max_block_d(h.dtype):
        grad_units = torch.zeros_like(units_acc)
        for a, b, h_unit, logits in _wide_logits(h, units_acc, tau):
            lse_rows = lse[a:b] if lse.numel() else lse
            grad_s = _raw_fcmi_bwd(logits, groups[a:b], lse_rows, table, logc_coef, deterministic) / tau
            h_rows = h[a:b].to(acc)
            grad_h[a:b] = cm.normalize_backward(h_rows, h_unit, grad_s @ units_acc).to(h.dtype)
            grad_units += grad_s.t() @ h_unit
        return grad_h, cm.normalize_backward(centers_acc, units_acc, grad_units).to(centers.dtype)
    cfg = cm.dot_config(num_cols, dim, h.dtype)
    if h.dtype == torch.float64:
        # float64 FMA dots at 16 warps (128 registers) spill kilobytes (kernel_report.py); the
        # K tiling must stay the forward's (it decides whether lse was saved), so fewer warps
        cfg = cfg._replace(num_warps=cm.float64_warps(cfg.num_warps, h.dtype))
        if not cfg.single:  # lse is saved: any K tile will do, and narrower ones spill less
            cfg = cfg._replace(block_k=min(cfg.block_k, 32))
    tiles = triton.cdiv(num_rows, cfg.block_n)
    programs = cm.num_programs(tiles, h.device, num_cols * dim, deterministic)
    grad_units = torch.zeros(cm.partial_slots(programs, deterministic), num_cols, dim, dtype=acc, device=h.device)
    cm.launch(_fcmi_emb_bwd_kernel, programs, h, h.stride(0), units_acc.to(h.dtype).contiguous(), groups,
              lse.to(acc), table, logc_coef, 1.0 / tau, grad_h, grad_h.stride(0), grad_units,
              num_rows, num_cols, dim, tiles,
              ACC=cm.tl_acc(h.dtype), DOT=cm.tl_dot_dtype(h.dtype, h.device), BLOCK_N=cfg.block_n,
              BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d, SINGLE_K_TILE=cfg.single, ATOMIC=not deterministic,
              num_warps=cfg.num_warps)
    return grad_h, cm.normalize_backward(centers_acc, units_acc, grad_units.sum(0)).to(centers.dtype)


@fcmi_emb_bwd.register_fake
def _(h, centers, groups, lse, table, logc_coef, tau, deterministic=False):
    return (torch.empty_like(h, memory_format=torch.contiguous_format),
            torch.empty_like(centers, memory_format=torch.contiguous_format))
