"""The split a Train worker streams from the store (ase_ray.train.data.stream_rows + take_share) is the
in-memory split row for row: the ranks' shares cover it once, each in split order, with the numeric
block and a correction's new image (the rows the store lacks) included."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ase_ray.testing import fake_feature_store
from ase_ray.train.data import (
    LABEL_KEY,
    NUMERIC_KEY,
    added_rows,
    load_task_arrays,
    load_task_rows,
    store_metadata,
    stream_rows,
    take_share,
    fit_numeric,
    with_numeric,
)

pytestmark = [pytest.mark.integration]


def test_streamed_shares_are_the_in_memory_split(ray_session, tmp_path, monkeypatch):
    from ase_ray.features.store import load_store
    from ase_ray.train import corrections
    from ase_ray.train.corrections import append_correction, with_corrections
    from ase_ray.train.fit import stored_columns

    fake_feature_store(tmp_path / "store", per_class=14, records={"lot": [float(i % 5) for i in range(42)]})
    store = load_store(tmp_path / "store")
    shapes, metadata = store.meta["shapes"], store_metadata(store.meta)
    columns = stored_columns(shapes, finetune=False)
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
        ds = stream_rows(tmp_path / "store", columns, [rows[name]], shapes)
        added = added_rows(rows[name])
        assert bool(added) == (name == "train")
        shares = [take_share(ds.iterator(), rank, world, added) for rank in range(world)]
        want = full[name]
        for rank, share in enumerate(shares):
            index = np.arange(rank, len(want), world)
            np.testing.assert_array_equal(share[LABEL_KEY], want.labels[index])
            for key in [*columns, NUMERIC_KEY]:
                np.testing.assert_array_equal(share[key].astype(np.float32), want.features[key][index].astype(np.float32))
        assert sum(len(s[LABEL_KEY]) for s in shares) == len(want)


def test_fit_reads_no_array_column_on_the_driver(ray_session, tmp_path, monkeypatch):
    """A whole ``fit`` (train, calibrate, decide, evaluate, log): this process asks Parquet for small
    columns only; the arrays are read in Ray Data's read tasks (other processes)."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from ase_ray.config import load_config
    from ase_ray.features import store as store_module
    from ase_ray.features.store import array_columns
    from ase_ray.train.fit import fit

    fake_feature_store(tmp_path / "store", per_class=10, records={"lot": [float(i % 5) for i in range(30)]})
    requested: list[list[str] | None] = []
    read, to_table = pq.ParquetDataset.read, pads.Dataset.to_table

    def spy_read(self, columns=None, **kwargs):
        requested.append(columns)
        return read(self, columns=columns, **kwargs)

    def spy_to_table(self, columns=None, **kwargs):
        requested.append(columns)
        return to_table(self, columns=columns, **kwargs)

    def no_load(*args, **kwargs):
        raise AssertionError("the training driver loaded the whole store")

    monkeypatch.setattr(pq.ParquetDataset, "read", spy_read)
    monkeypatch.setattr(pads.Dataset, "to_table", spy_to_table)
    monkeypatch.setattr(store_module, "load_store", no_load)
    cfg = load_config(overrides=[f"project.work_dir={tmp_path / 'work'}", f"train.store_dir={tmp_path / 'store'}",
                                 "train.epochs=1", "train.num_workers=1"])
    result = fit(cfg)
    assert requested and None not in requested
    assert not set(array_columns()) & {c for cols in requested for c in cols}
    model = json.loads((result.model_dir / "model.json").read_text())
    assert model["extra"]["inputs"]["numeric"]["fields"]  # the numeric block reached the model
    assert "calibration" in model["extra"] and "decision" in model["extra"]
