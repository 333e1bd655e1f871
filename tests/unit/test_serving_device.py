"""The served classifier's device and prediction code (ase_ray.models.inference), on the CPU.

The GPU side of it is tests/gpu/test_gpu_serve.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ase_ray.models.classifier import build_model
from ase_ray.models.inference import ClassifierPredictor, feature_shapes, predict_proba, replica_device
from ase_ray.models.io import save_model
from ase_ray.models.projections import FeatureDims
from ase_ray.models.settings import ModelSettings, PfaSettings

CLASSES = ["normal", "scratch", "void"]


def saved_model(directory: Path, kind: str = "cmaf") -> Path:
    settings = ModelSettings(kind=kind, d_model=16, heads=4, head_hidden=16)
    dims = FeatureDims(image_dim=12, image_tokens=4, text_dim=8, text_len=5, llm_dim=6)
    torch.manual_seed(0)
    model = build_model(settings, dims, len(CLASSES), PfaSettings(proj_dim=8))
    return save_model(model, directory, settings, dims, CLASSES)


def features(meta: dict, rows: int = 70) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for column, shape in feature_shapes(meta).items():
        if column.endswith("_mask"):
            out[column] = (rng.random((rows, *shape)) < 0.6).astype(np.int8)
        else:
            out[column] = rng.normal(size=(rows, *shape)).astype(np.float32)
    return out


def test_replica_device_follows_the_gpu_share(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert replica_device(1).type == "cuda" and replica_device(0.25).type == "cuda"
    assert replica_device(0).type == "cpu"  # a CPU replica on a GPU node keeps off the GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert replica_device(1).type == "cpu"


@pytest.mark.parametrize("kind", ["cmaf", "gated", "text_only"])
def test_serving_probabilities_are_trainings(tmp_path, kind) -> None:
    """The serving copy of predict_proba computes what training's scoring computes."""
    from ase_ray.train.loop import predict_proba as training_predict_proba

    predictor = ClassifierPredictor.from_dir(saved_model(tmp_path, kind))
    arrays = features(predictor.meta)
    served = predictor.predict_proba(arrays)
    np.testing.assert_array_equal(served, training_predict_proba(predictor.module, arrays))
    assert served.dtype == np.float32 and served.shape == (70, 3)
    np.testing.assert_array_equal(predict_proba(predictor.module, {k: v[:0] for k, v in arrays.items()}),
                                  np.zeros((0, 3), np.float32))


def test_predictor_moves_and_keeps_eval_mode(tmp_path) -> None:
    predictor = ClassifierPredictor.from_dir(saved_model(tmp_path), device="cpu")
    assert predictor.device.type == "cpu" and not predictor.module.training
    assert predictor.to("cpu") is predictor


def test_pyfunc_load_context_and_serve_load_model_place_the_weights(tmp_path, monkeypatch) -> None:
    """MLflow loads the pyfunc on the CPU; Serve's load_model then puts it on the replica's device."""
    import mlflow.pyfunc

    from ase_ray.serve import predictor as serve_predictor
    from ase_ray.serving_model import ARTIFACT_KEY, DefectClassifierModel

    model_dir = saved_model(tmp_path)
    pyfunc = DefectClassifierModel()
    pyfunc.load_context(SimpleNamespace(artifacts={ARTIFACT_KEY: str(model_dir)}))
    assert pyfunc.device.type == "cpu" and pyfunc.feature_settings is None
    moves = []
    monkeypatch.setattr(pyfunc, "to", lambda device: moves.append(device) or pyfunc)
    monkeypatch.setattr(mlflow.pyfunc, "load_model", lambda uri: SimpleNamespace(unwrap_python_model=lambda: pyfunc))
    monkeypatch.setattr(serve_predictor, "set_tracking", lambda uri: None)  # keep the global URIs alone
    ref = serve_predictor.ModelRef("runs:/x/model", "runs:/x/model")
    loaded = serve_predictor.load_model(ref, "unused", device=torch.device("cpu"))
    assert loaded.python_model is pyfunc and moves == [torch.device("cpu")]
    out = pyfunc.predict_arrays(features(pyfunc.meta, rows=3))
    assert list(out.columns) == ["label"] + [f"prob_{c}" for c in CLASSES]
