"""Stratified, group-aware splits: items of one ``group`` always land on the same side."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from ase_ray.data.manifest import AUGMENTED, GROUP, IMAGE_PATH, LABEL, SPLIT
from ase_ray.errors import DataError


def groups_of(df: pd.DataFrame) -> np.ndarray:
    """The group of each row; rows without a group are groups of their own."""
    if GROUP not in df.columns:
        return np.array([f"row_{i}" for i in range(len(df))], dtype=object)
    values = df[GROUP].astype(object).to_numpy().copy()
    empty = pd.isna(values) | (values == "")
    values[empty] = [f"row_{i}" for i in np.flatnonzero(empty)]
    return values.astype(str)


def check_unique_images(df: pd.DataFrame) -> None:
    """One row per image: a repeated image could land on both sides of a split (a leak)."""
    if IMAGE_PATH not in df.columns:
        return
    paths = df[IMAGE_PATH].astype(str)
    repeated = paths[paths.duplicated(keep=False)]
    if len(repeated):
        rows = [int(i) for i in np.flatnonzero(paths.duplicated(keep=False).to_numpy())[:2]]
        raise DataError(f"{paths.duplicated().sum()} duplicate image path(s) in the manifest, e.g. rows {rows[0]} and "
                        f"{rows[1]} both name {repeated.iloc[0]!r}: a repeated image could land in train and test; "
                        "`ase-ray data validate` lists them all")


def kfold_indices(
    df: pd.DataFrame, folds: int, seed: int, label_column: str = LABEL
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``folds`` pairs of (train positions, test positions), stratified by label, grouped by group."""
    check_unique_images(df)
    groups = groups_of(df)
    n_groups = len(set(groups))
    if folds < 2:
        raise DataError(f"k-fold needs at least 2 folds, got {folds}")
    if n_groups < folds:
        raise DataError(f"cannot make {folds} folds from {n_groups} group(s)")
    labels = df[label_column].astype(str).to_numpy()
    from sklearn.model_selection import StratifiedGroupKFold  # here: scikit-learn takes a second to import

    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # sklearn warns when a class has fewer groups than folds; the split is still group-safe.
        warnings.simplefilter("ignore", UserWarning)
        return [(tr, te) for tr, te in splitter.split(np.zeros(len(df)), labels, groups)]


def assign_splits(
    df: pd.DataFrame,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    label_column: str = LABEL,
) -> pd.DataFrame:
    """Copy of ``df`` with a ``split`` column (train/val/test), stratified and group-aware."""
    if AUGMENTED in df.columns and df[AUGMENTED].astype(str).str.lower().eq("true").any():
        raise DataError("this manifest holds TDA-augmented rows: split the original manifest, then augment")
    if not 0 < test_fraction < 0.5 or not 0 <= val_fraction < 0.5:
        raise DataError(f"fractions out of range: val={val_fraction}, test={test_fraction}")
    check_unique_images(df)
    out = df.copy()
    split = np.full(len(df), "train", dtype=object)
    test_folds = max(2, round(1 / test_fraction))
    _, test_pos = kfold_indices(df, test_folds, seed, label_column)[0]
    split[test_pos] = "test"
    if val_fraction > 0:
        rest = np.flatnonzero(split == "train")
        val_folds = max(2, round((1 - test_fraction) / val_fraction))
        _, val_rel = kfold_indices(df.iloc[rest], val_folds, seed + 1, label_column)[0]
        split[rest[val_rel]] = "val"
    out[SPLIT] = split
    return out


def leaking_groups(df: pd.DataFrame) -> list[str]:
    """Groups whose rows sit in more than one split (should always be empty)."""
    if SPLIT not in df.columns:
        return []
    frame = pd.DataFrame({"group": groups_of(df), "split": df[SPLIT].to_numpy()})
    sides = frame.groupby("group")["split"].nunique()
    return sorted(sides[sides > 1].index)


def split_summary(df: pd.DataFrame, label_column: str = LABEL) -> pd.DataFrame:
    """Counts per label (rows) and split (columns)."""
    return pd.crosstab(df[label_column], df[SPLIT]).reindex(columns=[s for s in ("train", "val", "test") if s in set(df[SPLIT])])
