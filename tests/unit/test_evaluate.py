"""`evaluate` on a saved model folder: metrics of a split, clear errors for bad input."""

from __future__ import annotations

import pytest

from ase_ray.config import load_config
from ase_ray.errors import DataError
from ase_ray.models.io import save_model
from ase_ray.models.projections import dims_from_batch
from ase_ray.testing import fake_feature_store
from ase_ray.train.data import LABEL_KEY, load_task_arrays
from ase_ray.train.evaluate import evaluate, resolve_model_dir
from ase_ray.train.loop import run_epochs, to_tensors


def test_evaluate_saved_model(tmp_path):
    import numpy as np
    import torch

    fake_feature_store(tmp_path / "store", per_class=10)
    cfg = load_config(overrides=["train.epochs=8", "train.model.kind=concat", "train.pfa.enabled=false",
                                 f"project.work_dir={tmp_path / 'work'}"])
    splits, classes = load_task_arrays(tmp_path / "store", "multiclass")
    train = {**splits["train"].features, LABEL_KEY: splits["train"].labels}
    result = run_epochs(train, {}, cfg.train, classes)
    dims = dims_from_batch(to_tensors(train, np.arange(1), "cpu", torch.float32))
    save_model(result.module, tmp_path / "model", cfg.train.model, dims, classes, extra={"task": "multiclass"})

    metrics = evaluate(cfg, str(tmp_path / "model"), tmp_path / "store", "test")
    assert metrics["n"] == len(splits["test"]) and metrics["classes"] == classes
    assert 0.0 <= metrics["macro_f1"] <= 1.0
    assert set(metrics["per_class"]) == set(classes)
    assert sum(map(sum, metrics["confusion_matrix"])) == metrics["n"]

    with pytest.raises(DataError, match="unknown split"):
        evaluate(cfg, str(tmp_path / "model"), tmp_path / "store", "holdout")
    with pytest.raises(DataError, match="not a saved ase-ray model"):
        resolve_model_dir(cfg, str(tmp_path / "store"))
    with pytest.raises(DataError, match="neither a folder"):
        resolve_model_dir(cfg, "s3-bucket-that-is-not-here")


def test_evaluate_reports_the_line_at_the_models_threshold(tmp_path):
    import numpy as np
    import torch

    from ase_ray.train.evaluate import evaluation_text
    from ase_ray.train.fit import decide_model_dir

    fake_feature_store(tmp_path / "store", per_class=10)
    cfg = load_config(overrides=["train.epochs=4", "train.model.kind=concat", "train.pfa.enabled=false",
                                 f"project.work_dir={tmp_path / 'work'}", "train.task=binary"])
    splits, classes = load_task_arrays(tmp_path / "store", "binary")
    train = {**splits["train"].features, LABEL_KEY: splits["train"].labels}
    result = run_epochs(train, {}, cfg.train, classes)
    dims = dims_from_batch(to_tensors(train, np.arange(1), "cpu", torch.float32))
    save_model(result.module, tmp_path / "model", cfg.train.model, dims, classes, extra={"task": "binary"})
    decision = decide_model_dir(tmp_path / "model", splits, "normal", 0.0, 0.2)
    assert decision["val_line"]["escape_rate"] == 0.0  # the target, met on validation

    metrics = evaluate(cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"max_escape_rate": 0.0})}),
                       str(tmp_path / "model"), tmp_path / "store", "test")
    assert metrics["decision"]["source"] == "model"
    assert metrics["line"]["threshold"] == decision["defect_threshold"]
    assert metrics["escape_rate"] == metrics["line"]["escape_rate"]
    assert metrics["line"]["defects"] + metrics["line"]["normals"] == metrics["n"]
    text = evaluation_text(metrics)
    assert "escape_rate " in text and "overkill_rate " in text

    other = evaluate(cfg, str(tmp_path / "model"), tmp_path / "store", "test")  # default target 0.05
    assert other["decision"]["source"].startswith("store val split")
    assert other["decision"]["max_escape_rate"] == 0.05
