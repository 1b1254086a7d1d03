"""Input validation shared by every public op (docs/math.md §7).

Each check raises ValueError or TypeError with a message that names the offending argument.
Checks that read tensor values (finiteness, group range, signs) run only when
`check_inputs=True` and never while torch.compile is tracing. On the cpu backend they cost no
pass of their own: the C++ kernels find bad values in the pass they make anyway (group ids out
of range raise from the kernel with the messages below; non-finite logits, embeddings or
probabilities are flagged by the kernel's outputs and only then located by these functions).
Elsewhere (reference, triton, cuda) they are separate passes, and on a GPU each one syncs.
"""
from __future__ import annotations

import math
import numbers

import torch

# Backends whose kernels do the value checks inside their first pass (see the module docstring).
FUSED_CHECK_BACKENDS = frozenset({"cpu"})
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def tracing() -> bool:
    """True while torch.compile / torch.export traces: value-dependent checks must be skipped."""
    return torch.compiler.is_compiling()


def check_tensor(x, name: str, ndim: int, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {x.dtype}")


def check_matrix(x, name: str, min_rows: int = 1, min_cols: int = 1) -> None:
    """A float N x K (or N x d) matrix with N >= min_rows and K >= min_cols."""
    check_tensor(x, name, 2)
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} must have at least {min_rows} row(s), got shape {tuple(x.shape)}")
    if x.shape[1] < min_cols:
        raise ValueError(f"{name} must have at least {min_cols} column(s), got shape {tuple(x.shape)}")


def check_same_device(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_b} is on {b.device} but {name_a} is on {a.device}; "
                         "they must be on the same device")


def check_finite(x: torch.Tensor, name: str) -> None:
    if not tracing() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")


def check_nonnegative(x: torch.Tensor, name: str) -> None:
    if not tracing() and bool((x < 0).any()):
        raise ValueError(f"{name} must be non-negative, found {float(x.min())}")


def fused_checks(backend: str, check_inputs: bool) -> bool:
    """True when the resolved backend's kernels check the values themselves (no extra pass)."""
    return check_inputs and backend in FUSED_CHECK_BACKENDS and not tracing()


def check_positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_groups(groups, num_rows: int, ref: torch.Tensor, num_groups, check_values: bool,
                 name: str = "groups") -> int:
    """Validate `groups` (1-D int32/int64, length num_rows, on ref's device, values in [0, T))
    and return T. num_groups=None means max(groups) + 1, which costs a device sync."""
    check_tensor(groups, name, 1, INDEX_DTYPES)
    if groups.shape[0] != num_rows:
        raise ValueError(f"{name} has length {groups.shape[0]} but the input has {num_rows} rows")
    check_same_device("input", ref, name, groups)
    if num_groups is not None:
        if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral):
            if isinstance(num_groups, float) and not math.isfinite(num_groups):
                raise ValueError(f"num_groups must be a finite positive integer, got {num_groups}")
            raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__}")
        num_groups = int(num_groups)
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    if tracing():
        if num_groups is None:
            raise ValueError("num_groups must be given under torch.compile (inferring it syncs)")
        return num_groups
    if num_groups is None:
        return check_group_values(groups, None, name)
    if check_values:
        check_group_values(groups, num_groups, name)
    return num_groups


def check_group_values(groups: torch.Tensor, num_groups, name: str = "groups") -> int:
    """Values of groups in [0, num_groups) (num_groups=None: inferred as max + 1); returns T.
    One aminmax pass and one device sync."""
    if tracing():
        return num_groups
    if groups.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    lo, hi = torch.stack(torch.aminmax(groups)).tolist()   # one sync for both
    if lo < 0:
        raise ValueError(f"{name} must be >= 0, found {lo}")
    if num_groups is None:
        return hi + 1
    if hi >= num_groups:
        raise ValueError(f"{name} must be < num_groups={num_groups}, found {hi}")
    return num_groups


def check_weights(weights, num_rows: int, ref: torch.Tensor, check_values: bool = False) -> None:
    if weights is None:
        return
    check_tensor(weights, "weights", 1)
    if weights.shape[0] != num_rows:
        raise ValueError(f"weights has length {weights.shape[0]} but the input has {num_rows} rows")
    check_same_device("input", ref, "weights", weights)
    if check_values:
        check_finite(weights, "weights")
