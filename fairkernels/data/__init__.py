"""Data sets for fair clustering: every loader returns a :class:`Dataset` (X float32 N x D,
y int64 or None, groups int64 in 0..T-1, description, group_names).

    >>> from fairkernels import data
    >>> ds = data.load("digits-reverse")                 # bundled, no files needed
    >>> ds = data.load("adult", root="/data/uci")        # or set FAIRKERNELS_DATA=/data/uci
    >>> ds = data.load("my_table.csv", group_column=["sex", "race"], label_column="income")

Files expected under root (argument, else $FAIRKERNELS_DATA):
    adult           adult/adult.data + adult/adult.test (or directly under root)
    har             "UCI HAR Dataset"/train/X_train.txt, y_train.txt, subject_train.txt, test/...
    ds              data/aXX/pY/sZZ.txt (UCI Daily and Sports Activities; or ds/data/...)
    mnist-usps, reverse-mnist, office31, mtfl   <name>.npz with keys X, y, g
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from fairkernels.data._dataset import DATA_ENV, Dataset, encode_groups, from_arrays
from fairkernels.data.appearance import make_appearance
from fairkernels.data.arrays import NPZ_DATASETS, load_digits_reverse, load_named_npz, load_npz
from fairkernels.data.synthetic import make_synthetic
from fairkernels.data.tabular import load_csv
from fairkernels.data.uci import load_adult, load_ds, load_har

__all__ = ["DATA_ENV", "Dataset", "available", "encode_groups", "from_arrays", "load", "load_adult",
           "load_csv", "load_digits_reverse", "load_ds", "load_har", "load_npz", "make_appearance",
           "make_synthetic"]


def _file_loader(loader: Callable) -> Callable:
    return lambda root, **options: loader(root=root, **options)


def _no_files(loader: Callable) -> Callable:
    return lambda root, **options: loader(**options)


def _named_npz(name: str) -> Callable:
    return lambda root, **options: load_named_npz(name, root=root, **options)


_LOADERS = {
    "digits-reverse": _no_files(load_digits_reverse),
    "synthetic": _no_files(make_synthetic),
    "appearance": _no_files(make_appearance),
    "adult": _file_loader(load_adult),
    "har": _file_loader(load_har),
    "ds": _file_loader(load_ds),
    **{name: _named_npz(name) for name in NPZ_DATASETS},
}


def available() -> list[str]:
    """Names accepted by :func:`load` (besides paths to .npz / .csv files)."""
    return sorted(_LOADERS)


def load(name: str, root=None, **options) -> Dataset:
    """Load a data set by name (see :func:`available`) or from a path ending in .npz or .csv.

    options go to the loader: synthetic(n, dim, n_clusters, n_groups, bias, seed, separation,
    chunk_rows); appearance(n, dim, n_clusters, n_groups, latent_dim, noise, seed);
    adult(split, group_column, drop_columns); har(split); ds(features, activities);
    .csv(group_column, label_column, delimiter, drop_columns)."""
    if not isinstance(name, (str, Path)):
        raise TypeError(f"name must be a data set name or a path, got {type(name).__name__}")
    suffix = Path(name).suffix.lower()
    if suffix in (".npz", ".csv"):
        path = Path(name)
        if not path.is_absolute() and not path.exists() and root is not None:
            path = Path(root) / path
        return load_npz(path, **options) if suffix == ".npz" else load_csv(path, **options)
    key = str(name).lower()
    if key not in _LOADERS:
        raise ValueError(f"unknown data set {name!r}; available: {available()}, or a .npz / .csv path")
    return _LOADERS[key](root, **options)
