"""The DFC paper's data sets from their published UCI files: Adult, HAR, Daily and Sports.

Each loader looks under `root` (argument, else $FAIRKERNELS_DATA) in a few usual places and
raises FileNotFoundError naming every path it tried.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from fairkernels.data._dataset import Dataset, encode_groups, encode_labels, find_file, resolve_root
from fairkernels.data.tabular import read_rows, rows_to_dataset

ADULT_COLUMNS = ("age", "workclass", "fnlwgt", "education", "education-num", "marital-status",
                 "occupation", "relationship", "race", "sex", "capital-gain", "capital-loss",
                 "hours-per-week", "native-country", "income")
SPLITS = ("all", "train", "test")


def _check_split(split: str) -> list[str]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return ["train", "test"] if split == "all" else [split]


def load_adult(root=None, split: str = "all", group_column="sex",
               drop_columns: Sequence[str] = ()) -> Dataset:
    """UCI Adult from adult.data (train) and adult.test (test), found in <root>/adult/ or <root>/.

    Label: income > 50K (1) or not (0). Groups: `group_column` (default "sex"; any column, or a
    list of columns for intersectional groups), removed from the features. Rows with '?' are
    dropped (45,222 remain of 48,842). adult.test's first line ("|1x3 Cross validator") is
    skipped and its labels' trailing '.' ignored."""
    root = resolve_root(root)
    rows = []
    for part in _check_split(split):
        file_name = "adult.data" if part == "train" else "adult.test"
        path = find_file([root / "adult" / file_name, root / file_name], f"Adult file {file_name}")
        with open(path) as handle:
            first_line = handle.readline()
        rows.extend(read_rows(path, skip_lines=1 if first_line.startswith("|") else 0))

    def income_above_50k(labels: np.ndarray) -> np.ndarray:
        return (np.char.rstrip(labels.astype(str), ".") == ">50K").astype(np.int64)

    return rows_to_dataset(ADULT_COLUMNS, rows, group_column, "income", drop_columns,
                           label_transform=income_above_50k, source=f"UCI Adult ({split})")


def _har_folder(root: Path) -> Path:
    candidates = [root / "UCI HAR Dataset", root / "har" / "UCI HAR Dataset", root / "har", root]
    for folder in candidates:
        if (folder / "train" / "X_train.txt").exists() or (folder / "test" / "X_test.txt").exists():
            return folder
    return find_file([c / "train" / "X_train.txt" for c in candidates], "UCI HAR Dataset")


def load_har(root=None, split: str = "all") -> Dataset:
    """UCI HAR ("UCI HAR Dataset" folder with train/ and test/). Features: the 561 published
    features; label: activity - 1 (6 classes); groups: subject (30 people, remapped 0..T-1 in
    increasing subject id)."""
    folder = _har_folder(resolve_root(root))
    features, labels, subjects = [], [], []
    for part in _check_split(split):
        paths = [folder / part / f"{stem}_{part}.txt" for stem in ("X", "y", "subject")]
        for path in paths:
            find_file([path], f"HAR file {path.name}")
        features.append(np.loadtxt(paths[0], dtype=np.float32, ndmin=2))
        labels.append(np.loadtxt(paths[1], dtype=np.int64, ndmin=1))
        subjects.append(np.loadtxt(paths[2], dtype=np.int64, ndmin=1))
    X, activity, subject = (np.concatenate(parts) for parts in (features, labels, subjects))
    if not (len(X) == len(activity) == len(subject)):
        raise ValueError(f"HAR files in {folder} disagree on the number of rows: X {len(X)}, "
                         f"y {len(activity)}, subject {len(subject)}")
    if activity.min() < 1:
        raise ValueError(f"HAR labels must be activity ids >= 1, found {activity.min()}")
    groups, names = encode_groups([subject], ["subject"])
    return Dataset(X=X, y=activity - 1, groups=groups, group_names=names,
                   description=f"UCI HAR ({split}): {len(X)} windows, {X.shape[1]} features, "
                               f"label activity, groups subject ({len(names)})")


_DS_ACTIVITY = re.compile(r"a(\d+)$")
_DS_PERSON = re.compile(r"p(\d+)$")
_DS_SEGMENT = re.compile(r"s(\d+)\.txt$")
DS_FEATURES = ("flatten", "summary")


def _ds_folder(root: Path) -> Path:
    candidates = [root / "ds" / "data", root / "daily-and-sports" / "data", root / "data", root / "ds", root]
    for folder in candidates:
        if folder.is_dir() and any(_DS_ACTIVITY.match(p.name) for p in folder.iterdir() if p.is_dir()):
            return folder
    return find_file([c / "a01" for c in candidates], "Daily and Sports Activities folder (a01/p1/s01.txt ...)")


def load_ds(root=None, features: str = "flatten", activities: Optional[Sequence[int]] = None) -> Dataset:
    """UCI Daily and Sports Activities: data/aXX/pY/sZZ.txt, 19 activities x 8 people x 60
    five-second segments, each file 125 rows (25 Hz) x 45 sensor columns.

    features="flatten" (default) concatenates the 125 x 45 readings of a segment into 5,625
    values (the DFC paper does not say how it encodes a segment; flattening keeps everything);
    features="summary" gives per-column mean, std, min and max (180 values). Label: activity
    (remapped 0..L-1 over the kept activities); groups: person. activities: optional 1-based
    activity ids to keep (all by default)."""
    if features not in DS_FEATURES:
        raise ValueError(f"features must be one of {DS_FEATURES}, got {features!r}")
    folder = _ds_folder(resolve_root(root))
    keep = None if activities is None else {int(a) for a in activities}
    records = []
    for activity_dir in folder.iterdir():
        activity_match = _DS_ACTIVITY.match(activity_dir.name)
        if not activity_dir.is_dir() or activity_match is None:
            continue
        activity = int(activity_match.group(1))
        if keep is not None and activity not in keep:
            continue
        for person_dir in activity_dir.iterdir():
            person_match = _DS_PERSON.match(person_dir.name)
            if not person_dir.is_dir() or person_match is None:
                continue
            for segment in person_dir.iterdir():
                segment_match = _DS_SEGMENT.match(segment.name)
                if segment_match is not None:
                    records.append((activity, int(person_match.group(1)), int(segment_match.group(1)), segment))
    if not records:
        raise FileNotFoundError(f"no segment files aXX/pY/sZZ.txt under {folder}"
                                + (f" for activities {sorted(keep)}" if keep else ""))
    records.sort(key=lambda record: record[:3])
    segments = [np.loadtxt(record[3], delimiter=",", dtype=np.float32, ndmin=2) for record in records]
    shape = segments[0].shape
    for record, segment in zip(records, segments):
        if segment.shape != shape:
            raise ValueError(f"{record[3]} has shape {segment.shape}, expected {shape} like {records[0][3]}")
    stacked = np.stack(segments)  # (N, rows, columns)
    if features == "flatten":
        X = stacked.reshape(len(records), -1)
    else:
        X = np.concatenate([stacked.mean(axis=1), stacked.std(axis=1), stacked.min(axis=1),
                            stacked.max(axis=1)], axis=1)
    y, _ = encode_labels(np.array([record[0] for record in records]))
    groups, names = encode_groups([np.array([record[1] for record in records])], ["person"])
    return Dataset(X=X, y=y, groups=groups, group_names=names,
                   description=f"UCI Daily and Sports Activities: {len(records)} segments of "
                               f"{shape[0]}x{shape[1]}, features {features}, label activity, "
                               f"groups person ({len(names)})")
