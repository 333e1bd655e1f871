"""Damaged and unfinished files on the feature data path are one clear error naming the file
(the drills that make them from outside: tests/integration/test_fault_drills.py)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from ase_ray.errors import DataError
from ase_ray.features.pipeline import format_summary, summarise
from ase_ray.features.store import ATTEMPTS_DIR, META_FILE, Store, clear_store, load_store
from ase_ray.models.io import META_FILE as MODEL_META, WEIGHTS_FILE, load_model
from ase_ray.testing import fake_feature_store


def test_a_folder_an_extraction_began_is_not_a_store(tmp_path):
    fake_feature_store(tmp_path / "s", per_class=2)
    (tmp_path / "s" / META_FILE).unlink()  # what a killed run leaves: tables, no store.json
    with pytest.raises(DataError, match="unfinished feature store"):
        load_store(tmp_path / "s")
    clear_store(tmp_path / "t")
    (tmp_path / "t" / ATTEMPTS_DIR).mkdir()  # killed before its first shard
    with pytest.raises(DataError, match="unfinished feature store"):
        load_store(tmp_path / "t")
    with pytest.raises(DataError, match="not a feature store"):
        load_store(tmp_path / "empty")


def test_clearing_a_store_removes_its_summary_and_attempt_log_first(tmp_path):
    fake_feature_store(tmp_path, per_class=2)
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / ATTEMPTS_DIR).mkdir()
    clear_store(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset.yaml"]  # not the store's


def test_a_truncated_shard_is_named(tmp_path):
    store = fake_feature_store(tmp_path, per_class=2)
    path = tmp_path / "features.parquet"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match=f"damaged feature store: {path} is not readable Parquet") as err:
        load_store(tmp_path)
    assert "\n" not in str(err.value) and len(store.features)


def test_a_missing_or_damaged_model_file_is_named(tmp_path):
    from tests.unit.test_serving_device import saved_model

    model = saved_model(tmp_path / "m")
    (model / WEIGHTS_FILE).write_bytes(b"garbage")
    with pytest.raises(DataError, match=f"damaged saved model: {model / WEIGHTS_FILE} cannot be loaded"):
        load_model(model)
    (model / WEIGHTS_FILE).unlink()
    with pytest.raises(DataError, match=f"incomplete saved model: {model / WEIGHTS_FILE} is missing"):
        load_model(model)
    (model / MODEL_META).write_text("{not json")
    torch.save({}, model / WEIGHTS_FILE)
    with pytest.raises(DataError, match=f"damaged saved model: {model / MODEL_META}"):
        load_model(model)


def test_the_summary_counts_rows_from_the_cache_computed_and_retried():
    stages = ("ocr", "describe", "reason", "image_encoder", "text_encoder")
    rows = pd.DataFrame({"row_id": [0, 1, 2, 3], "error_stage": ["", "", "", "decode"],
                         **{f"hit_{s}": [True, s != "reason", True, False] for s in stages}})
    store = Store(pd.DataFrame(), pd.DataFrame(), {"rows": 3, "errors": 1})
    summary = summarise(rows, 2.0, store, {"ocr": 2, "rows": 2})
    assert (summary["from_cache"], summary["computed"], summary["retried"]) == (2, 2, 2)
    assert summary["stages"]["ocr"]["retried"] == 2 and summary["stages"]["reason"]["cache_hits"] == 2
    assert "2 from the cache, 2 computed, 2 retried" in format_summary(summary)


def test_a_shard_whose_optional_text_column_is_all_empty_reads_with_the_others(tmp_path):
    """A batch without TDA rows has no ``source_image``: its shard must still share the store's schema
    (the demo's store once failed to read: null type in one shard, text in the next)."""
    import numpy as np
    import pyarrow.dataset as pads

    from ase_ray.features.store import FEATURES_FILE, _read_table, features_table

    folder = tmp_path / FEATURES_FILE
    folder.mkdir()
    no_tda = pd.DataFrame({"row_id": [0, 1], "source_image": [None, None], "label": ["crack", "normal"]})
    with_tda = pd.DataFrame({"row_id": [2], "source_image": ["tiles/a.png"], "label": ["crack"]})
    for name, rows in (("part-000000000.parquet", no_tda), ("part-000000002.parquet", with_tda)):
        table, _ = features_table(rows, {"image_pooled": np.full((len(rows), 3), 0.5, np.float32)})
        pads.write_dataset(table, folder, format="parquet", basename_template=name.replace(".parquet", "-{i}.parquet"),
                           existing_data_behavior="overwrite_or_ignore")
    read = _read_table(str(folder))
    assert read["row_id"].tolist() == [0, 1, 2]
    assert read["source_image"].tolist()[2] == "tiles/a.png" and read["source_image"].iloc[:2].isna().all()
    assert pads.dataset(folder, format="parquet").to_table(columns=["source_image"]).num_rows == 3
