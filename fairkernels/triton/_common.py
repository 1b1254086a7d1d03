"""Pieces shared by the Triton kernel families: block-size and program-count choices, the
privatised group x cluster accumulation of docs/math.md §2.1, and small numeric helpers.

Every kernel is "persistent": a program walks the row tiles pid, pid + P, pid + 2P, ... so the
number of programs P is chosen independently of N. That matters twice: reductions over rows go
into one partial buffer per program (deterministic mode), whose memory is P x (table size), and
under TRITON_INTERPRET=1 fewer, larger programs run much faster.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements of one [BLOCK_N, BLOCK_K] register tile (fp32): rows per program tile follow from it.
TILE_ELEMENTS = 8192
# Largest K tile; K beyond it is streamed in tiles (online logsumexp). Tests lower it to force
# the tiled path.
MAX_BLOCK_K = 1024
# Largest feature tile of the embedding kernels (whole rows of h / z / centers stay in registers);
# wider inputs take the fallback named in each launcher.
MAX_BLOCK_D = 512
# tl.dot needs every tile dimension >= 16.
MIN_DOT = 16
# Group tile of the one-hot joint accumulation.
BLOCK_T = 16
# Elements allowed in all per-program partial buffers of one deterministic reduction (fp32:
# 256 MB). P is capped so that P * table_size stays below it.
PARTIAL_BUDGET = 1 << 26
# Programs per SM on GPU; programs on CPU under the interpreter (each runs sequentially).
PROGRAMS_PER_SM = 4
INTERPRETER_PROGRAMS = 4

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


def block_k(num_cols: int) -> int:
    return max(MIN_DOT, min(triton.next_power_of_2(num_cols), MAX_BLOCK_K))


def block_d(num_features: int) -> int:
    return max(MIN_DOT, triton.next_power_of_2(num_features))


def block_n(block_cols: int) -> int:
    """Rows per tile: fill TILE_ELEMENTS, at least MIN_DOT (tl.dot), at most 256."""
    return max(MIN_DOT, min(256, TILE_ELEMENTS // block_cols))


def max_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
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
def add_joint_tile(JOINT_ptr, values, groups, row_mask, offs_k, k_mask, K, T,
                   BLOCK_T: tl.constexpr, ATOMIC: tl.constexpr):
    """J[t, k] += sum_{rows i of this tile with g_i = t} values[i, k]  (docs/math.md §2.1).

    The rows of the tile are first reduced per group with a one-hot matmul (onehot^T @ values),
    so memory sees one update per (group, cluster) of the tile instead of one per element;
    group tiles with no row in this tile are skipped. ATOMIC adds into a table shared by all
    programs; otherwise JOINT_ptr is this program's private slot (plain read-modify-write,
    deterministic)."""
    for t_start in range(0, T, BLOCK_T):
        offs_t = t_start + tl.arange(0, BLOCK_T)
        onehot = (groups[None, :] == offs_t[:, None]) & row_mask[None, :]
        if tl.max(onehot.to(tl.int32)) > 0:
            counts = tl.dot(onehot.to(values.dtype), values, input_precision="ieee")
            ptrs = JOINT_ptr + offs_t.to(tl.int64)[:, None] * K + offs_k[None, :]
            mask = (offs_t < T)[:, None] & k_mask[None, :]
            if ATOMIC:
                tl.atomic_add(ptrs, counts, mask=mask)
            else:
                tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + counts, mask=mask)
