"""Pieces shared by the Triton kernel families: launch configs (block sizes and num_warps per K
and D), program counts, the row-tile helpers every kernel loops with, the group x cluster
accumulation of docs/math.md §2.1, and small numeric helpers.

Every kernel is "persistent": a program walks the row tiles pid, pid + P, pid + 2P, ... so the
number of programs P is chosen independently of N. That matters three times: reductions over
rows are kept in registers per program and flushed once at its end (one atomic add per table
entry per program, or one private slot per program in deterministic mode, P x table floats);
N and the tile count are not specialised (do_not_specialize), so a new batch size never
recompiles; and under TRITON_INTERPRET=1 fewer, larger programs run much faster.

Configs are sized for sm_90 (65536 registers and 227 KB of shared memory per block) and checked
by benchmarks/kernel_report.py, which compiles every launch for sm_90 without a GPU: about 16
elements of a [BLOCK_N, BLOCK_K] register tile per thread (8 in float64), and
tl.dot operands no larger than DOT_TILE_ELEMENTS (they are staged through shared memory).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Elements of one [BLOCK_N, BLOCK_K] register tile; a tile gets one warp per 256 (fp32) elements.
TILE_ELEMENTS = 2048
# Largest K tile; K beyond it is streamed in tiles (online logsumexp). Tests lower it to force
# the tiled path.
MAX_BLOCK_K = 512
# Largest feature tile of the embedding kernels (whole rows of h / z stay in registers); wider
# inputs take the fallback named in each launcher. kernel_report.py found D = 512 (and float64
# beyond D = 32) spilling or over the shared memory limit: see max_block_d.
MAX_BLOCK_D = 128
MAX_BLOCK_D_FP64 = 32
# Elements of a [BLOCK_K, BLOCK_D] centres tile (a tl.dot operand, staged through shared memory):
# K is tiled so that the operand stays far below the 227 KB per block whatever K is.
DOT_TILE_ELEMENTS = 2048
# tl.dot needs every tile dimension >= 16.
MIN_DOT = 16
# Group tile of the one-hot joint accumulation; T <= BLOCK_T keeps the joint in registers.
BLOCK_T = 16
# Elements allowed in all per-program partial buffers of one deterministic reduction (fp32:
# 256 MB). P is capped so that P * table_size stays below it.
PARTIAL_BUDGET = 1 << 26
# Programs per SM on GPU; programs on CPU under the interpreter (each runs sequentially).
PROGRAMS_PER_SM = 4
INTERPRETER_PROGRAMS = 4
# SMs of an H100/H200: the program count of a launch on a "meta" device (kernel_report.py).
REPORT_SMS = 132
MAX_WARPS = 16
# sm_90 registers per SM (and per block)
REGISTERS_PER_SM = 65536

NORM_EPS = 1e-12
LOG_EPS = 1e-12


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """docs/math.md §7: float64 accumulation for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def tl_dot_dtype(dtype: torch.dtype, device: torch.device):
    """Operand dtype of tl.dot: the input dtype (fp16/bf16 tensor cores, fp32 as exact "ieee"
    FMA products, fp64 FMA). The CPU interpreter multiplies bf16 operands wrongly (triton 3.7),
    so there bf16 operands are upcast to fp32 (exact: products of bf16 values fit in fp32)."""
    if dtype == torch.bfloat16 and device.type == "cpu":
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
            torch.float32: tl.float32, torch.float64: tl.float64}[dtype]


# --------------------------------------------------------------------------- launch configs
class RowConfig(NamedTuple):
    """Block sizes of a row kernel. single: the whole row is one K tile (read once)."""
    block_n: int
    block_k: int
    block_d: int
    num_warps: int
    single: bool


def _warps(tile_elements: int, dtype: torch.dtype) -> int:
    # ~8 fp32 (4 fp64) elements of each live [BLOCK_N, BLOCK_K] tile per thread (up to MAX_WARPS):
    # a kernel holds 4-6 such tiles (x, c, log c, the gathered table, dot operands) besides its
    # accumulators, so this keeps it under 128 registers
    per_warp = 32 * (4 if dtype == torch.float64 else 8)
    return max(4, min(MAX_WARPS, triton.next_power_of_2(triton.cdiv(tile_elements, per_warp))))


def row_config(num_cols: int, dtype: torch.dtype) -> RowConfig:
    """Row kernels over an [N, K] matrix (fcmi, histogram, DFC): BLOCK_K covers K up to
    MAX_BLOCK_K, BLOCK_N fills TILE_ELEMENTS (at least MIN_DOT rows for the one-hot dot)."""
    # float64 tiles hold half the elements: each takes two registers
    max_k = MAX_BLOCK_K // 2 if dtype == torch.float64 else MAX_BLOCK_K
    blk_k = max(MIN_DOT, min(triton.next_power_of_2(num_cols), max_k))
    if num_cols > blk_k:
        # streamed K tiles: the loop also keeps the online-lse state and table updates live
        blk_k = max(MIN_DOT, blk_k // 2)
    blk_n = max(MIN_DOT, min(256, TILE_ELEMENTS // blk_k))
    return RowConfig(blk_n, blk_k, 0, _warps(blk_n * blk_k, dtype), num_cols <= blk_k)


def dot_config(num_cols: int, num_features: int, dtype: torch.dtype) -> RowConfig:
    """Kernels that compute x @ centres^T in registers (assignments, fcmi from embeddings,
    k-means): whole rows of x ([BLOCK_N, BLOCK_D]) stay in registers, the centres are read in
    [BLOCK_K, BLOCK_D] tiles of at most DOT_TILE_ELEMENTS."""
    blk_d = max(MIN_DOT, triton.next_power_of_2(num_features))
    dot_tile = DOT_TILE_ELEMENTS // (2 if dtype == torch.float64 else 1)
    blk_k = max(MIN_DOT, min(triton.next_power_of_2(num_cols), MAX_BLOCK_K, dot_tile // blk_d))
    blk_n = max(MIN_DOT, min(64, TILE_ELEMENTS // max(blk_k, blk_d)))
    return RowConfig(blk_n, blk_k, blk_d, _warps(blk_n * max(blk_k, blk_d), dtype), num_cols <= blk_k)


def max_block_d(dtype: torch.dtype) -> int:
    """Widest feature dim the fused embedding / assignment / k-means kernels take for this dtype."""
    return min(MAX_BLOCK_D, MAX_BLOCK_D_FP64) if dtype == torch.float64 else MAX_BLOCK_D


def max_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    if device.type == "meta":
        return PROGRAMS_PER_SM * REPORT_SMS
    return INTERPRETER_PROGRAMS


def num_programs(num_tiles: int, device: torch.device, partial_size: int = 0,
                 deterministic: bool = False) -> int:
    """Programs of a persistent launch; deterministic reductions cap P by PARTIAL_BUDGET."""
    programs = max(1, min(num_tiles, max_programs(device)))
    if deterministic and partial_size > 0:
        programs = max(1, min(programs, PARTIAL_BUDGET // partial_size))
    return programs


def partial_slots(programs: int, deterministic: bool) -> int:
    """Deterministic: one slot per program (reduced in a fixed order afterwards); fast: one shared
    slot that all programs atomically add into."""
    return programs if deterministic else 1


def normalize_backward(x: torch.Tensor, x_unit: torch.Tensor, grad_unit: torch.Tensor) -> torch.Tensor:
    """Host-side (O(K d)) gradient through x / max(||x||, eps): the radial part of dL/d(unit)
    is removed where the clamp is inactive. (Autograd is unavailable inside a custom op.)"""
    norm = x.norm(dim=1, keepdim=True)
    radial = torch.where(norm > NORM_EPS, (x_unit * grad_unit).sum(1, keepdim=True), 0.0) * x_unit
    return (grad_unit - radial) / norm.clamp_min(NORM_EPS)


# benchmarks/kernel_report.py sets this to a callable(kernel, grid, args, kwargs) that records a
# launch instead of running it, so the report compiles exactly what the launchers would launch.
LAUNCH_HOOK = None


def register_budget(num_warps: int) -> int:
    """Registers per thread a block of num_warps can use on sm_90 (65536 per SM, at most 255).

    Passed as maxnreg (by launch at 8 warps, by the assignment kernels at every width): without
    it ptxas, given only the block size (.reqntid), may pick a lower register target for
    occupancy and spill a few values to local memory (kernel_report.py saw 64 registers and
    8-16 spill bytes at 8 warps); with it, it spills only when the block runs out of registers.
    """
    return min(255, (REGISTERS_PER_SM // (32 * num_warps)) // 8 * 8)


def float64_warps(num_warps: int, dtype: torch.dtype) -> int:
    """num_warps, at most 8 for float64: its FMA tiles at 16 warps (128 registers per thread)
    spilled in the assignment, embedding and histogram kernels (kernel_report.py), while 8 warps
    with up to 255 registers do not."""
    return min(num_warps, 8) if dtype == torch.float64 else num_warps


def launch(kernel, programs: int, *args, **kwargs) -> None:
    """kernel[(programs,)](*args, **kwargs), or hand the launch to LAUNCH_HOOK. 8-warp launches
    get maxnreg = register_budget(8) unless the caller sets it (see register_budget; at 4 and
    16 warps kernel_report.py found ptxas' own choice as good or better)."""
    if kwargs.get("num_warps") == 8:
        kwargs.setdefault("maxnreg", register_budget(8))
    if LAUNCH_HOOK is not None:
        LAUNCH_HOOK(kernel, (programs,), args, kwargs)
    else:
        kernel[(programs,)](*args, **kwargs)


# --------------------------------------------------------------------------- row-tile helpers
@triton.jit
def row_tile(tile, N, BLOCK_N: tl.constexpr):
    """Rows of one tile as int64 (rows * stride can pass 2^31) and their validity mask."""
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_n.to(tl.int64), offs_n < N


@triton.jit
def col_tile(k_start, K, BLOCK_K: tl.constexpr):
    offs_k = k_start + tl.arange(0, BLOCK_K)
    return offs_k, offs_k < K


@triton.jit
def load_rows(ROW_ptrs, offs_k, row_mask, k_mask, other, ACC: tl.constexpr):
    """[BLOCK_N, BLOCK_K] tile of rows (ROW_ptrs: [BLOCK_N, 1] row starts) in the acc dtype."""
    return tl.load(ROW_ptrs + offs_k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=other).to(ACC)


@triton.jit
def store_rows(ROW_ptrs, offs_k, row_mask, k_mask, values):
    tl.store(ROW_ptrs + offs_k[None, :], values.to(ROW_ptrs.dtype.element_ty),
             mask=row_mask[:, None] & k_mask[None, :])


@triton.jit
def add_to_table(TABLE_ptrs, values, mask, ATOMIC: tl.constexpr):
    """TABLE += values by relaxed atomics (only the sum is needed, no ordering with other
    memory). ATOMIC: a table shared by all programs (the order of adds varies run to run).
    Otherwise TABLE_ptrs is in this program's private slot: each entry is added by the one
    thread that owns it, in program order (same-address atomics of one thread are ordered), so
    the result is bitwise reproducible; a fire-and-forget red.add also needs no register round
    trip, unlike a load + store (which spilled in the K-tiled kernels)."""
    tl.atomic_add(TABLE_ptrs, values, mask=mask, sem="relaxed")


@triton.jit
def add_scalar(PTR, value, ATOMIC: tl.constexpr):
    if ATOMIC:
        tl.atomic_add(PTR, value, sem="relaxed")
    else:
        tl.store(PTR, tl.load(PTR) + value)


@triton.jit
def slot(PTR, size, ATOMIC: tl.constexpr):
    """This program's partial buffer: the shared table (atomic) or its private slot."""
    if ATOMIC:
        return PTR
    else:
        return PTR + tl.program_id(0).to(tl.int64) * size


@triton.jit
def eps_of(ACC: tl.constexpr):
    """The 1e-12 floor of docs/math.md §1.2 / 2.2 as a constant of the acc dtype: a bare literal would be
    rounded to float32 first, which differs from the float64 reference by 4e-9 relative."""
    return tl.full((), 1e-12, ACC)


@triton.jit
def log1p_pos(x):
    """log(1 + x) for x >= 0 without cancellation (Goldberg: log(u) * x / (u - 1), u = 1 + x)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def online_lse_update(row_max, sum_exp, x):
    """Online logsumexp: fold one tile x (masked entries -inf) into (row_max, sum_exp)."""
    new_max = tl.maximum(row_max, tl.max(x, axis=1))
    sum_exp = sum_exp * tl.exp(row_max - new_max) + tl.sum(tl.exp(x - new_max[:, None]), axis=1)
    return new_max, sum_exp


@triton.jit
def row_lse(x):
    """Row logsumexp of one tile holding the whole row (masked entries -inf)."""
    row_max = tl.max(x, axis=1)
    return row_max + tl.log(tl.sum(tl.exp(x - row_max[:, None]), axis=1))


@triton.jit
def unit_rows(X_ptr, X_row_stride, rows, row_mask, D, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    """Loads [BLOCK_N, BLOCK_D] rows of x and returns (x / max(||x||, eps), 1 / max(||x||, eps),
    ||x|| > eps) in the acc dtype (docs/math.md §1.2, as F.normalize)."""
    offs_d = tl.arange(0, BLOCK_D)
    x = tl.load(X_ptr + rows[:, None] * X_row_stride + offs_d[None, :],
                mask=row_mask[:, None] & (offs_d < D)[None, :], other=0.0).to(ACC)
    norm = tl.sqrt(tl.sum(x * x, axis=1))
    eps = eps_of(ACC)
    inv_norm = 1.0 / tl.maximum(norm, eps)
    return x * inv_norm[:, None], inv_norm, norm > eps


@triton.jit
def normalize_bwd_rows(x_unit, inv_norm, nonzero, grad_unit):
    """dL/dx = (g - <x_unit, g> x_unit) / max(||x||, eps); the radial term is dropped where
    ||x|| <= eps (the clamp is active there), as torch_kernels.normalize_backward."""
    radial = tl.sum(x_unit * grad_unit, axis=1)
    radial = tl.where(nonzero, radial, 0.0)
    return (grad_unit - radial[:, None] * x_unit) * inv_norm[:, None]


@triton.jit
def group_onehot(groups, row_mask, t_start, BLOCK_T: tl.constexpr):
    """[BLOCK_T, BLOCK_N] one-hot of the rows' groups t_start .. t_start + BLOCK_T - 1."""
    offs_t = t_start + tl.arange(0, BLOCK_T)
    return (groups[None, :] == offs_t[:, None]) & row_mask[None, :], offs_t


@triton.jit
def joint_tile(values, groups, row_mask, t_start, BLOCK_T: tl.constexpr):
    """[BLOCK_T, BLOCK_K]: sum over the tile's rows of group t of values (docs/math.md §2.1), by the
    one-hot matmul onehot^T @ values, so memory sees one update per (group, cluster)."""
    onehot, offs_t = group_onehot(groups, row_mask, t_start, BLOCK_T)
    return tl.dot(onehot.to(values.dtype), values, input_precision="ieee"), offs_t


@triton.jit
def add_joint_tile(JOINT_slot, values, groups, row_mask, offs_k, k_mask, K, T,
                   BLOCK_T: tl.constexpr, ATOMIC: tl.constexpr):
    """J[t, k] += sum_{rows i of this tile with g_i = t} values[i, k] for the groups present in
    this row tile (T > BLOCK_T or K tiled: the joint does not fit registers). Branch-free: a
    data-dependent branch around the dot made ptxas spill."""
    for t_start in range(0, T, BLOCK_T):
        onehot, offs_t = group_onehot(groups, row_mask, t_start, BLOCK_T)
        counts = tl.dot(onehot.to(values.dtype), values, input_precision="ieee")
        # group tiles absent from this row tile add nothing: masked off, no memory traffic
        present = tl.sum(onehot.to(tl.int32), axis=1) > 0
        add_to_table(JOINT_slot + offs_t.to(tl.int64)[:, None] * K + offs_k[None, :], counts,
                     (present & (offs_t < T))[:, None] & k_mask[None, :], ATOMIC)


@triton.jit
def flush_joint(JOINT_slot, joint, K, T, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                ATOMIC: tl.constexpr):
    """Adds a program's register [BLOCK_T, BLOCK_K] joint (T <= BLOCK_T, K <= BLOCK_K) once."""
    offs_t = tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    add_to_table(JOINT_slot + offs_t[:, None] * K + offs_k[None, :], joint,
                 (offs_t < T)[:, None] & (offs_k < K)[None, :], ATOMIC)
