"""Delimited text tables (the generic .csv loader and UCI Adult) to a Dataset.

Encoding: a column whose every value parses as a number is numeric and is standardised
(zero mean, unit variance over the loaded rows; a constant column becomes 0); any other column
is categorical and one-hot encoded over its sorted values. The protected column(s) and the
label column are removed from the features. Rows with a missing value ('?' or an empty field)
in any used column are dropped.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from fairkernels.data._dataset import Dataset, encode_groups, encode_labels

MISSING_VALUES = ("?", "")


def read_rows(path: Path, delimiter: str = ",", skip_lines: int = 0) -> list[list[str]]:
    """Non-blank rows of a delimited file, each field stripped of surrounding spaces."""
    with open(path, newline="") as handle:
        for _ in range(skip_lines):
            handle.readline()
        return [[field.strip() for field in row] for row in csv.reader(handle, delimiter=delimiter)
                if row and any(field.strip() for field in row)]


def _as_name_list(columns: Union[str, Sequence[str], None], argument: str) -> list[str]:
    if columns is None:
        return []
    if isinstance(columns, str):
        return [columns]
    names = list(columns)
    if not all(isinstance(name, str) for name in names):
        raise TypeError(f"{argument} must be a column name or a list of column names")
    return names


def _numeric_or_none(values: np.ndarray) -> Optional[np.ndarray]:
    try:
        return values.astype(np.float64)
    except ValueError:
        return None


def encode_features(columns: dict[str, np.ndarray]) -> tuple[np.ndarray, list[str]]:
    """Standardised numeric columns and one-hot categorical columns, in column order.
    Returns (X float32 N x D, one feature name per output column)."""
    blocks, feature_names = [], []
    for name, values in columns.items():
        numeric = _numeric_or_none(values)
        if numeric is not None:
            std = numeric.std()
            blocks.append(((numeric - numeric.mean()) / (std if std > 0 else 1.0))[:, None])
            feature_names.append(name)
            continue
        categories, codes = np.unique(values, return_inverse=True)
        one_hot = np.zeros((values.size, categories.size), dtype=np.float32)
        one_hot[np.arange(values.size), codes.reshape(-1)] = 1.0
        blocks.append(one_hot)
        feature_names.extend(f"{name}={category}" for category in categories)
    if not blocks:
        raise ValueError("no feature columns left after removing the group and label columns")
    return np.concatenate(blocks, axis=1).astype(np.float32), feature_names


def rows_to_dataset(header: Sequence[str], rows: list[list[str]], group_column, label_column=None,
                    drop_columns: Sequence[str] = (), label_transform: Optional[Callable] = None,
                    source: str = "table") -> Dataset:
    """Encode parsed rows as a Dataset (see the module docstring for the encoding)."""
    header = list(header)
    group_names = _as_name_list(group_column, "group_column")
    if not group_names:
        raise ValueError("group_column must name at least one column")
    label_names = _as_name_list(label_column, "label_column")
    if len(label_names) > 1:
        raise ValueError("label_column must be one column name")
    dropped = _as_name_list(drop_columns, "drop_columns")
    for name in group_names + label_names + dropped:
        if name not in header:
            raise ValueError(f"column {name!r} not in {source}; columns are {header}")
    width = len(header)
    bad = [i for i, row in enumerate(rows) if len(row) != width]
    if bad:
        raise ValueError(f"{source}: row {bad[0]} has {len(rows[bad[0]])} fields, expected {width}")
    table = np.array(rows, dtype=str).reshape(len(rows), width)
    used = [i for i, name in enumerate(header) if name not in dropped]
    complete = ~np.isin(table[:, used], MISSING_VALUES).any(axis=1)
    table = table[complete]
    if table.shape[0] == 0:
        raise ValueError(f"{source}: no complete rows (rows with '?' or empty fields are dropped)")
    column = {name: table[:, i] for i, name in enumerate(header)}
    groups, names = encode_groups([column[name] for name in group_names], group_names)
    y = None
    if label_names:
        labels = column[label_names[0]]
        if label_transform is not None:
            y = np.asarray(label_transform(labels), dtype=np.int64)
        else:
            y, _ = encode_labels(labels)
    excluded = set(group_names) | set(label_names) | set(dropped)
    X, _ = encode_features({name: column[name] for name in header if name not in excluded})
    description = (f"{source}: {X.shape[0]} rows ({int((~complete).sum())} with missing values "
                   f"dropped), groups from {'+'.join(group_names)}, "
                   f"label {label_names[0] if label_names else 'none'}; numeric standardised, "
                   "categorical one-hot")
    return Dataset(X=X, y=y, groups=groups, description=description, group_names=names)


def load_csv(path, group_column, label_column=None, delimiter: str = ",",
             drop_columns: Sequence[str] = ()) -> Dataset:
    """A delimited file whose first row names the columns. group_column: a name, or a list of
    names for intersectional groups; label_column: an optional class column (any values,
    numbered 0..L-1 in sorted order)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"csv file not found: {path}")
    rows = read_rows(path, delimiter=delimiter)
    if not rows:
        raise ValueError(f"{path} is empty")
    return rows_to_dataset(rows[0], rows[1:], group_column, label_column, drop_columns,
                           source=str(path))
