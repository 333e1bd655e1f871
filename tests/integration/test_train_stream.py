"""A whole training run whose driver reads no array column of the store (the workers read their shares)."""

from __future__ import annotations

import json

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
