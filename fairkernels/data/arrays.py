"""Data sets stored as arrays: scikit-learn's bundled digits (reversed-digits task) and .npz
feature files (the image / face benchmarks of the FCMI paper, as pre-extracted features)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fairkernels.data._dataset import Dataset, find_file, resolve_root

# Data sets the FCMI paper evaluates on, expected as <root>/<name>.npz (keys X, y, g).
NPZ_DATASETS = {
    "mnist-usps": "MNIST and USPS digits; group = source domain (0 MNIST, 1 USPS)",
    "reverse-mnist": "MNIST digits and their intensity-reversed copies; group = original/reversed",
    "office31": "Office-31 object images (features); group = domain (amazon, dslr, webcam)",
    "mtfl": "MTFL faces (features); label = glasses; group = gender",
}


def load_digits_reverse() -> Dataset:
    """scikit-learn's 1,797 8x8 digits scaled to [0, 1] plus their reversed copies 1 - x.
    group 0 = original, 1 = reversed; y = digit. N = 3,594, D = 64. Needs no files."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    original = digits.data.astype(np.float32) / 16.0
    X = np.concatenate([original, 1.0 - original])
    y = np.concatenate([digits.target, digits.target]).astype(np.int64)
    groups = np.repeat(np.arange(2, dtype=np.int64), len(original))
    return Dataset(X=X, y=y, groups=groups, group_names=("original", "reversed"),
                   description="digits-reverse: sklearn 8x8 digits in [0, 1] and 1 - x; "
                               "group = original / reversed, label = digit")


def load_npz(path, description: str = "") -> Dataset:
    """Arrays from an .npz file with keys X (N x ...; flattened to N x D), g (group ids) and
    optionally y (class ids). Integer group/label ids are used as they are."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"npz file not found: {path}")
    with np.load(path, allow_pickle=False) as arrays:
        missing = [key for key in ("X", "g") if key not in arrays.files]
        if missing:
            raise ValueError(f"{path} lacks key(s) {missing}; it must hold X, g and optionally y "
                             f"(found {arrays.files})")
        X = arrays["X"]
        X = X.reshape(X.shape[0], -1) if X.ndim != 2 else X
        y = arrays["y"] if "y" in arrays.files else None
        groups = arrays["g"]
    return Dataset(X=X, y=y, groups=groups, description=description or f"arrays from {path}")


def load_named_npz(name: str, root=None) -> Dataset:
    """One of NPZ_DATASETS from <root>/<name>.npz (root: argument or $FAIRKERNELS_DATA)."""
    path = find_file([resolve_root(root) / f"{name}.npz"], f"{name} features ({name}.npz with keys X, y, g)")
    return load_npz(path, description=f"{name}: {NPZ_DATASETS[name]} (from {path})")
