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
    iter_rows,
    load_task_rows,
    read_row_arrays,
    read_store_rows,
    row_columns,
    share_of,
    split_fingerprint,
    split_source,
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


@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_ranks_shares_cover_the_split_once_in_split_order(store, world):
    from ase_ray.train.fit import stored_columns

    full, _ = load_task_arrays(store, "multiclass")
    rows, _ = load_task_rows(store, "multiclass")
    shapes = read_store_rows(store).meta["shapes"]
    source = split_source(store, stored_columns(shapes, False), rows["train"], shapes)
    shares = [take_share(source, rank, world) for rank in range(world)]
    assert sum(len(s[LABEL_KEY]) for s in shares) == len(full["train"])
    for rank, share in enumerate(shares):
        index = np.arange(rank, len(full["train"]), world)
        np.testing.assert_array_equal(share[LABEL_KEY], full["train"].labels[index])
        np.testing.assert_array_equal(share["image_tokens"].astype(np.float32), full["train"].features["image_tokens"][index])
        assert ROW_KEY not in share and "image_stem" not in share
    # Small record batches (rows of one shard arrive in pieces) give the same share.
    batches = list(iter_rows(source, np.arange(len(source)), batch_rows=4))
    assert len(batches) > 1 and sorted(np.concatenate([b[ROW_KEY] for b in batches]).tolist()) == list(range(len(source)))
    assert share_of(np.arange(6), 1, 2).tolist() == [False, True] * 3
    assert take_share(split_source(store, ["image_pooled"], rows["train"].take(np.array([], dtype=np.int64)), shapes)) == {}


def test_streamed_shares_are_the_in_memory_split_with_numeric_and_corrections(tmp_path, monkeypatch):
    import pandas as pd

    from ase_ray.features.store import load_store
    from ase_ray.train import corrections
    from ase_ray.train.corrections import append_correction, with_corrections
    from ase_ray.train.data import NUMERIC_KEY, fit_numeric, store_metadata, with_numeric
    from ase_ray.train.fit import stored_columns

    fake_feature_store(tmp_path / "store", per_class=14, records={"lot": [float(i % 5) for i in range(42)]})
    meta = load_store(tmp_path / "store").meta
    shapes, metadata = meta["shapes"], store_metadata(meta)
    columns = stored_columns(shapes, with_stem=False)
    full, classes = load_task_arrays(tmp_path / "store", "multiclass")
    rows, _ = load_task_rows(tmp_path / "store", "multiclass")

    # A correction that adds a new image: its arrays are "extracted" here (a copy of a test row's).
    donor = full["test"].take(np.array([0]))
    path = tmp_path / "corrections.csv"
    append_correction(path, {"image_path": "/new.png", "image_id": "ab" * 32, "label": classes[1]})
    new_rows = pd.DataFrame([{"image_path": "/new.png", "image_id": "ab" * 32, "label": classes[1], "group": "",
                              "split": "train", "source": "correction", "ocr_fields": '{"LEN": 3.0}', "lot": 2.0}])
    monkeypatch.setattr(corrections, "_extract_new", lambda add, meta, cfg, cols: (
        {k: donor.features[k] for k in cols}, new_rows, {}))
    full, _ = with_corrections(full, classes, "multiclass", path, {}, None)
    rows, _ = with_corrections(rows, classes, "multiclass", path, {}, None, columns=columns)
    assert rows["train"].features == {} and set(rows["train"].added) == set(columns)
    block = fit_numeric(full["train"], ["ocr", "metadata"], metadata)
    assert block.fields
    full = {k: with_numeric(v, block, metadata) for k, v in full.items()}
    rows = {k: with_numeric(v, block, metadata) for k, v in rows.items()}

    for name, world in (("train", 2), ("val", 1)):
        source = split_source(tmp_path / "store", columns, rows[name], shapes)
        shares = [take_share(source, rank, world) for rank in range(world)]
        want = full[name]
        for rank, share in enumerate(shares):
            index = np.arange(rank, len(want), world)
            np.testing.assert_array_equal(share[LABEL_KEY], want.labels[index])
            for key in [*columns, NUMERIC_KEY]:
                np.testing.assert_array_equal(share[key].astype(np.float32), want.features[key][index].astype(np.float32))
        assert sum(len(s[LABEL_KEY]) for s in shares) == len(want)
    assert take_share(split_source(tmp_path / "store", columns, rows["train"], shapes), 0, 2)["image_tokens"].dtype \
        == np.float16  # the store's dtype: an added row does not double the share
