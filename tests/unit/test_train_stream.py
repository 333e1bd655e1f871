"""The training driver reads the store's small columns only, and the ranks' shares of a split cover it
exactly once (ase_ray.train.data: read_store_rows, load_task_rows, share_of, take_share)."""

from __future__ import annotations

import numpy as np
import pytest

from ase_ray.features.store import array_columns
from ase_ray.testing import fake_feature_store
from ase_ray.train.data import (
    LABEL_KEY,
    ROW_KEY,
    load_task_arrays,
    load_task_rows,
    read_row_arrays,
    read_store_rows,
    row_columns,
    share_of,
    split_fingerprint,
    store_columns,
    take_share,
)


@pytest.fixture
def store(tmp_path):
    fake_feature_store(tmp_path / "store", records={"lot": list(range(36))})
    return tmp_path / "store"


def test_the_driver_reads_no_array_column(store, monkeypatch):
    import pyarrow.parquet as pq

    requested = []
    real = pq.ParquetDataset.read

    def spy(self, columns=None, **kwargs):
        requested.append(columns)
        return real(self, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetDataset, "read", spy)
    rows = read_store_rows(store)
    assert requested and all(cols is not None for cols in requested)
    arrays = set(array_columns())
    assert not arrays & {c for cols in requested for c in cols}
    assert not arrays & set(rows.features.columns)
    assert set(store_columns(store)) & arrays  # the store has them; they were left alone
    assert {"row_id", "image_id", "label", "split", "ocr_fields", "lot"} <= set(rows.features.columns)
    assert row_columns(["row_id", "image_tokens", "text_ocr_mask", "text_ocr_tokens_cut"]) == [
        "row_id", "text_ocr_tokens_cut"]


def test_rows_only_splits_match_the_in_memory_ones(store):
    rows, classes = load_task_rows(store, "multiclass")
    full, full_classes = load_task_arrays(store, "multiclass")
    assert classes == full_classes
    for name in ("train", "val", "test"):
        assert rows[name].features == {}
        np.testing.assert_array_equal(rows[name].labels, full[name].labels)
        assert rows[name].rows["row_id"].tolist() == full[name].rows["row_id"].tolist()
    assert split_fingerprint(rows["val"], classes) == split_fingerprint(full["val"], classes)
    ids = rows["val"].rows["row_id"].to_numpy()[[2, 0]]
    got = read_row_arrays(store, ["image_tokens"], ids)["image_tokens"]
    np.testing.assert_array_equal(got.astype(np.float32), full["val"].features["image_tokens"][[2, 0]])


class _Shard:
    """A dataset iterator stand-in: batches of rows in a shuffled block order."""

    def __init__(self, n: int, seed: int):
        order = np.random.default_rng(seed).permutation(n)
        self.batches = [{ROW_KEY: order[i:i + 5], LABEL_KEY: order[i:i + 5] % 3,
                         "x": np.stack([order[i:i + 5]] * 2, axis=1).astype(np.float16)} for i in range(0, n, 5)]

    def iter_batches(self, batch_size, batch_format):
        return iter(self.batches)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_ranks_shares_cover_the_split_once_whatever_the_block_order(world):
    n = 23
    shares = [take_share(_Shard(n, seed=rank), rank, world) for rank in range(world)]
    seen = np.concatenate([s[LABEL_KEY] * 0 + s["x"][:, 0].astype(np.int64) for s in shares])
    assert sorted(seen.tolist()) == list(range(n))  # every row once
    for rank, share in enumerate(shares):
        rows = share["x"][:, 0].astype(np.int64)
        assert rows.tolist() == list(range(rank, n, world))  # in split order, the same under any block order
        np.testing.assert_array_equal(take_share(_Shard(n, seed=99), rank, world)["x"], share["x"])
        assert ROW_KEY not in share
    assert share_of(np.arange(6), 1, 2).tolist() == [False, True] * 3


def test_added_rows_join_the_share_by_their_index():
    added = {ROW_KEY: np.array([23, 24]), LABEL_KEY: np.array([0, 1]), "x": np.array([[23, 23], [24, 24]], np.float32)}
    share = take_share(_Shard(23, seed=0), 0, 2, added)
    assert share["x"][:, 0].tolist() == list(range(0, 25, 2))
    assert share["x"].dtype == np.float16  # the stream's dtype: an added row does not double the share
