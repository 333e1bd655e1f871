import numpy as np
import pytest

from ase_ray.data.splits import assign_splits, groups_of, kfold_indices, leaking_groups
from ase_ray.errors import DataError


def test_assign_splits_is_group_safe_stratified_and_deterministic(grouped_frame):
    out = assign_splits(grouped_frame, 0.15, 0.2, seed=0)
    assert leaking_groups(out) == []
    assert set(out["split"]) == {"train", "val", "test"}
    for split in ("train", "test"):
        assert set(out.loc[out["split"] == split, "label"]) == {"a", "b", "c"}  # stratified
    test_share = (out["split"] == "test").mean()
    assert 0.1 <= test_share <= 0.35
    again = assign_splits(grouped_frame, 0.15, 0.2, seed=0)
    assert (again["split"] == out["split"]).all()
    other = assign_splits(grouped_frame, 0.15, 0.2, seed=1)
    assert not (other["split"] == out["split"]).all()


def test_kfold_covers_every_row_once_and_never_splits_a_group(grouped_frame):
    folds = kfold_indices(grouped_frame, 4, seed=0)
    tests = np.concatenate([te for _, te in folds])
    assert sorted(tests) == list(range(len(grouped_frame)))
    groups = groups_of(grouped_frame)
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])


def test_rows_without_group_are_their_own_group(grouped_frame):
    df = grouped_frame.drop(columns=["group"])
    assert len(set(groups_of(df))) == len(df)
    df = grouped_frame.copy()
    df.loc[0, "group"] = None
    assert groups_of(df)[0] == "row_0"


def test_too_few_groups(grouped_frame):
    with pytest.raises(DataError, match="folds"):
        kfold_indices(grouped_frame.iloc[:6], 5, seed=0)
    with pytest.raises(DataError, match="out of range"):
        assign_splits(grouped_frame, 0.6, 0.2, seed=0)


def test_leak_is_detected(grouped_frame):
    df = assign_splits(grouped_frame, 0.0, 0.25, seed=0)
    first = df.index[df["split"] == "test"][0]
    group = df.loc[first, "group"]
    df.loc[df["group"] == group, "split"] = "train"
    df.loc[first, "split"] = "test"
    assert leaking_groups(df) == [group]
