"""A whole training run whose driver reads no array column of the store (the workers read their shares)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from ase_ray.testing import fake_feature_store

pytestmark = [pytest.mark.integration]


def test_fit_reads_no_array_column_on_the_driver(ray_session, tmp_path, monkeypatch):
    """A whole ``fit`` (train, calibrate, decide, evaluate, log): this process asks Parquet for small
    columns only (and the held-out rows' arrays a batch at a time); the workers read their shares."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from ase_ray.config import load_config
    from ase_ray.features import store as store_module
    from ase_ray.features.store import array_columns
    from ase_ray.train.fit import fit

    fake_feature_store(tmp_path / "store", per_class=10, records={"lot": [float(i % 5) for i in range(30)]})
    requested: list[list[str] | None] = []  # small-column reads (ParquetDataset.read)
    array_reads: list[tuple[list[str], object]] = []  # row-filtered reads (pyarrow.dataset)
    read, open_dataset = pq.ParquetDataset.read, pads.dataset

    def spy_read(self, columns=None, **kwargs):
        requested.append(columns)
        return read(self, columns=columns, **kwargs)

    class Spy:
        def __init__(self, dataset):
            self.dataset = dataset

        def to_batches(self, columns=None, filter=None, **kwargs):
            array_reads.append((columns, filter))
            return self.dataset.to_batches(columns=columns, filter=filter, **kwargs)

        def to_table(self, columns=None, filter=None, **kwargs):
            array_reads.append((columns, filter))
            return self.dataset.to_table(columns=columns, filter=filter, **kwargs)

    def no_load(*args, **kwargs):
        raise AssertionError("the training driver loaded the whole store")

    monkeypatch.setattr(pq.ParquetDataset, "read", spy_read)
    monkeypatch.setattr(pads, "dataset", lambda *a, **k: Spy(open_dataset(*a, **k)))
    monkeypatch.setattr(store_module, "load_store", no_load)
    cfg = load_config(overrides=[f"project.work_dir={tmp_path / 'work'}", f"train.store_dir={tmp_path / 'store'}",
                                 "train.epochs=1", "train.num_workers=1"])
    result = fit(cfg)
    assert requested and None not in requested
    assert not set(array_columns()) & {c for cols in requested for c in cols}
    # Arrays were read here for held-out rows only (scoring), a row_id filter on every read.
    rows = pd.read_parquet(tmp_path / "store" / "features.parquet", columns=["row_id", "split"])
    train_ids = set(rows.loc[rows["split"] == "train", "row_id"])
    assert array_reads and all(f is not None for _, f in array_reads)
    for _, row_filter in array_reads:
        read_ids = set(pads.dataset(str(tmp_path / "store" / "features.parquet")).dataset.to_table(
            columns=["row_id"], filter=row_filter).column("row_id").to_pylist())
        assert read_ids and not read_ids & train_ids
    model = json.loads((result.model_dir / "model.json").read_text())
    assert model["extra"]["inputs"]["numeric"]["fields"]  # the numeric block reached the model
    assert "calibration" in model["extra"] and "decision" in model["extra"]
