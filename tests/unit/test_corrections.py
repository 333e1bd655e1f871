"""The corrections table: appended rows, the latest per image, and training takes them into its
training rows only (an image or group of validation or test is skipped)."""

from __future__ import annotations

import pytest

from ase_ray.errors import DataError
from ase_ray.testing import fake_feature_store
from ase_ray.train.corrections import COLUMNS, append_correction, read_corrections, with_corrections
from ase_ray.train.data import load_task_arrays


def test_append_keeps_every_row_and_reading_takes_the_latest(tmp_path):
    path = tmp_path / "c" / "corrections.csv"
    append_correction(path, {"image_path": "/a.png", "image_id": "aa", "label": "scratch", "previous_label": "normal",
                             "model_version": "3"})
    append_correction(path, {"image_path": "/a.png", "image_id": "aa", "label": "void", "previous_label": "normal"})
    append_correction(path, {"image_path": "/b.png", "image_id": "bb", "label": "normal", "previous_label": "void"})
    lines = path.read_text().splitlines()
    assert lines[0].split(",") == COLUMNS and len(lines) == 4
    table = read_corrections(path)
    assert dict(zip(table["image_id"], table["label"])) == {"aa": "void", "bb": "normal"}
    assert all(table["corrected_at"].str.endswith("+00:00"))
    with pytest.raises(DataError, match="needs image_id and label"):
        append_correction(path, {"image_id": "cc"})


def test_training_takes_train_corrections_and_skips_held_out_ones(tmp_path):
    fake_feature_store(tmp_path / "store", per_class=10)
    splits, classes = load_task_arrays(tmp_path / "store", "multiclass")
    rows = {name: splits[name].rows for name in splits}
    in_train, in_val = rows["train"].iloc[0], rows["val"].iloc[0]
    old = classes[splits["train"].labels[0]]
    new = next(c for c in classes if c != old)
    path = tmp_path / "corrections.csv"
    append_correction(path, {"image_path": in_train["image_path"], "image_id": in_train["image_id"], "label": new,
                             "previous_label": old})
    append_correction(path, {"image_path": in_val["image_path"], "image_id": in_val["image_id"], "label": new})
    append_correction(path, {"image_path": "/elsewhere.png", "image_id": "ff" * 32, "label": new,
                             "group": rows["test"].iloc[0]["group"]})
    append_correction(path, {"image_path": "/x.png", "image_id": "ee" * 32, "label": "not-a-class"})

    out, record = with_corrections(splits, classes, "multiclass", path, {}, None)
    assert classes[out["train"].labels[0]] == new and len(out["train"]) == len(splits["train"])
    assert (out["train"].labels[1:] == splits["train"].labels[1:]).all()
    assert out["val"] is splits["val"] and out["test"] is splits["test"]  # held-out rows untouched
    assert record["relabelled"] == 1 and record["added"] == 0
    assert set(record["skipped"]) == {in_val["image_id"], "ff" * 32, "ee" * 32}
    assert "validation or test" in record["skipped"][in_val["image_id"]]
    assert "group" in record["skipped"]["ff" * 32]
    assert record["used_image_ids"] == [in_train["image_id"]]
