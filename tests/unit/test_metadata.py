"""Records beside the image: which columns, of which kind, as text; the synthetic set's own records."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ase_ray.config import SynthConfig, load_config
from ase_ray.data.manifest import DatasetInfo, read_dataset_info
from ase_ray.data.metadata import (
    MetadataColumns,
    column_kinds,
    configured_columns,
    metadata_text,
    missing_keys,
    with_metadata_text,
)
from ase_ray.data.synthetic import CLASS_NOTES, generate_synthetic
from ase_ray.errors import ManifestError


def manifest() -> pd.DataFrame:
    return pd.DataFrame({"image_path": ["a.png", "b.png", "c.png"], "label": ["x", "y", "x"],
                         "note": ["scratch seen", None, "ok"], "temp": [40.1, None, "41"], "line": ["A", "B", "A"]})


def test_columns_split_into_text_and_numeric_by_their_values():
    kinds = column_kinds(manifest(), ["note", "temp", "line"])
    assert kinds == MetadataColumns(text=["note", "line"], numeric=["temp"])
    assert kinds.all == ["note", "line", "temp"]
    rows = with_metadata_text(manifest(), kinds)
    assert rows["metadata_text"].tolist() == ["note: scratch seen; line: A", "line: B", "note: ok; line: A"]
    assert with_metadata_text(manifest(), MetadataColumns())["metadata_text"].eq("").all()


def test_a_column_the_manifest_lacks_or_a_label_column_is_a_clear_error():
    with pytest.raises(ManifestError, match=r"\['operator'\], which the manifest does not have .*note"):
        column_kinds(manifest(), ["note", "operator"])
    with pytest.raises(ManifestError, match=r"names \['label'\]: these are not metadata"):
        column_kinds(manifest(), ["label"])


def test_config_wins_over_dataset_yaml_and_empty_means_none():
    info = DatasetInfo(["x"], extra={"metadata_columns": ["note"]})
    assert configured_columns(None, info) == ["note"]
    assert configured_columns([], info) == [] and configured_columns(["temp"], info) == ["temp"]
    assert configured_columns(None, None) == [] and configured_columns(None, DatasetInfo(["x"])) == []


def test_a_request_must_carry_every_key_null_counts_as_given():
    columns = MetadataColumns(text=["note"], numeric=["temp"])
    assert missing_keys({"note": "x"}, columns) == ["temp"]
    assert missing_keys({"note": None, "temp": None}, columns) == []
    assert metadata_text({"note": None, "temp": 3}, ["note"]) == ""


def test_the_synthetic_records_are_deterministic_weakly_tied_and_leave_the_images_alone(tmp_path):
    config = SynthConfig(scale=0.2, seed=4)
    first = generate_synthetic(config, tmp_path / "a")
    again = generate_synthetic(config, tmp_path / "b")
    pd.testing.assert_frame_equal(first.drop(columns="image_path"), again.drop(columns="image_path"))
    assert read_dataset_info(tmp_path / "a" / "manifest.csv").extra["metadata_columns"] == ["operator_note",
                                                                                           "probe_reading"]
    silent = generate_synthetic(config.model_copy(update={"metadata_signal": 0.0}), tmp_path / "c")
    for a, c in zip(first["image_path"], silent["image_path"]):  # the records have their own random stream
        assert open(a, "rb").read() == open(c, "rb").read()
    typical = first["operator_note"] == first["label"].map(CLASS_NOTES)
    assert 0.15 < typical.mean() < 0.6  # weakly tied: the class's own note on about a third of the rows
    assert not (silent["operator_note"] == silent["label"].map(CLASS_NOTES)).any()
    means = first.groupby("label")["probe_reading"].mean()
    assert means["bridge"] > means["normal"] + 0.2 and first["probe_reading"].std() > 0.4
    assert np.isclose(silent.groupby("label")["probe_reading"].mean(), 1.0, atol=0.35).all()


def test_extraction_names_a_missing_metadata_column(tmp_path):
    from ase_ray.features.pipeline import extract_features

    cfg = load_config(overrides=["data.synth.scale=0.02", "data.metadata_columns=[operator_note,shift]"])
    generate_synthetic(cfg.data.synth, tmp_path / "syn")
    with pytest.raises(ManifestError, match=r"\['shift'\], which the manifest does not have"):
        extract_features(cfg, tmp_path / "syn" / "manifest.csv", tmp_path / "store", track=False)
