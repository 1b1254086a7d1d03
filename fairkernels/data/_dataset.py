"""The Dataset record every loader returns, plus helpers shared by the loaders."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

DATA_ENV = "FAIRKERNELS_DATA"


@dataclass
class Dataset:
    """Features, labels and protected groups of one data set.

    X: float32 array (N, D). y: int64 array (N,) of class ids 0..L-1, or None (no ground truth).
    groups: int64 array (N,) with values 0..T-1. group_names: T names, one per group id (T is
    len(group_names), so a group id that happens to have no rows still counts). description: a
    line saying where the data came from and how it was encoded.
    """

    X: np.ndarray
    y: Optional[np.ndarray]
    groups: np.ndarray
    description: str = ""
    group_names: tuple = field(default_factory=tuple)

    def __post_init__(self):
        self.X = _to_numpy(self.X, "X")
        if self.X.ndim != 2:
            raise ValueError(f"X must be 2-D (N x D), got shape {self.X.shape}")
        if not np.issubdtype(self.X.dtype, np.number) or np.iscomplexobj(self.X):
            raise TypeError(f"X must hold real numbers, got dtype {self.X.dtype}")
        self.X = np.ascontiguousarray(self.X, dtype=np.float32)
        num_rows = self.X.shape[0]
        self.groups = _index_vector(self.groups, "groups", num_rows)
        if self.y is not None:
            self.y = _index_vector(self.y, "y", num_rows)
        top_group = int(self.groups.max()) if num_rows else -1
        if not self.group_names:
            self.group_names = tuple(str(t) for t in range(top_group + 1))
        self.group_names = tuple(str(name) for name in self.group_names)
        if top_group >= len(self.group_names):
            raise ValueError(f"groups holds id {top_group} but group_names has only "
                             f"{len(self.group_names)} entries")

    @property
    def num_groups(self) -> int:
        """T: the number of protected groups (ids 0..T-1)."""
        return len(self.group_names)

    @property
    def num_classes(self) -> Optional[int]:
        """L = max(y) + 1, or None when the data set has no labels."""
        if self.y is None:
            return None
        return int(self.y.max()) + 1 if self.y.size else 0

    def __len__(self) -> int:
        return self.X.shape[0]


def _to_numpy(values, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    if values is None:
        raise TypeError(f"{name} must be an array, got None")
    return np.asarray(values)


def _index_vector(values, name: str, num_rows: int) -> np.ndarray:
    array = _to_numpy(values, name)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.shape[0] != num_rows:
        raise ValueError(f"{name} has length {array.shape[0]} but X has {num_rows} rows")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got dtype {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.int64)
    if array.size and int(array.min()) < 0:
        raise ValueError(f"{name} must be >= 0, found {int(array.min())}")
    return array


def from_arrays(X, groups, y=None, description: str = "arrays", group_names: Sequence = ()) -> Dataset:
    """A Dataset from in-memory arrays (numpy, lists or torch tensors). groups must already be
    integer ids 0..T-1; use :func:`encode_groups` first for arbitrary values."""
    return Dataset(X=X, y=y, groups=groups, description=description, group_names=tuple(group_names))


def encode_groups(columns: Sequence[Sequence], names: Sequence[str]) -> tuple[np.ndarray, tuple]:
    """Group ids for one or several protected columns.

    Several columns give intersectional groups: the cartesian product of their values, of which
    only the combinations that occur become groups. Groups are numbered 0..T-1 in sorted order of
    their value tuples; names read "col=value" joined by "|"."""
    if len(columns) == 0:
        raise ValueError("group_column must name at least one column")
    codes_per_column, values_per_column = [], []
    for column in columns:
        values, codes = _unique_codes(column)
        codes_per_column.append(codes)
        values_per_column.append(values)
    sizes = [len(v) for v in values_per_column]
    combined = np.ravel_multi_index(codes_per_column, sizes) if len(sizes) > 1 else codes_per_column[0]
    observed, groups = np.unique(combined, return_inverse=True)
    group_names = []
    for flat in observed:
        parts = np.unravel_index(int(flat), sizes) if len(sizes) > 1 else (int(flat),)
        group_names.append("|".join(f"{name}={values[p]}" for name, values, p
                                    in zip(names, values_per_column, parts)))
    return groups.reshape(-1).astype(np.int64), tuple(group_names)


def encode_labels(column) -> tuple[np.ndarray, tuple]:
    """Class ids 0..L-1 in sorted order of the label values, and the values."""
    values, codes = _unique_codes(column)
    return codes, tuple(values)


def _unique_codes(column) -> tuple[list, np.ndarray]:
    """(sorted distinct values as strings, code of each entry). Values that all parse as numbers
    sort numerically ("2" before "10"), others as strings."""
    column = np.asarray(column)
    keys = column
    if column.dtype.kind in "US":
        try:
            keys = column.astype(np.float64)
        except ValueError:
            keys = column
    _, first, codes = np.unique(keys, return_index=True, return_inverse=True)
    return [str(column[i]) for i in first], codes.reshape(-1).astype(np.int64)


def resolve_root(root) -> Path:
    """The data folder: the `root` argument, else the FAIRKERNELS_DATA environment variable."""
    if root is None:
        root = os.environ.get(DATA_ENV)
        if not root:
            raise FileNotFoundError(
                f"no data folder given: pass root=... or set the environment variable {DATA_ENV} "
                "to the folder that holds the data set files")
    return Path(root).expanduser()


def find_file(candidates: Sequence[Path], what: str) -> Path:
    """The first existing path among candidates, or a FileNotFoundError listing where it looked."""
    for path in candidates:
        if path.exists():
            return path
    looked = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(
        f"{what} not found; looked for: {looked}. Pass root=<folder> or set {DATA_ENV}=<folder> "
        "to the folder that holds it")
