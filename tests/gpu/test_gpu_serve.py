"""The served classifier on the GPU: a saved tiny model loaded onto cuda predicts the probabilities
it predicts on the CPU, through the code Serve and ``ase-ray predict`` run (the pyfunc's
``predict_proba`` is :class:`ase_ray.models.inference.ClassifierPredictor`'s; ``classify`` is the
Classifier deployment's). MLflow is not needed (nor installed on the GPU test machine): the model
folder is loaded as the pyfunc's ``load_context`` loads it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu

CLASSES = ["normal", "scratch", "void"]
ROWS = 70  # more than one prediction batch (64)


def save_tiny_classifier(directory: Path, kind: str) -> Path:
    from ase_ray.models.classifier import build_model
    from ase_ray.models.io import save_model
    from ase_ray.models.projections import FeatureDims
    from ase_ray.models.settings import ModelSettings, PfaSettings

    settings = ModelSettings(kind=kind, d_model=16, heads=4, head_hidden=16, dropout=0.1)
    dims = FeatureDims(image_dim=24, image_tokens=9, text_dim=16, text_len=7, llm_dim=20)
    torch.manual_seed(0)
    model = build_model(settings, dims, len(CLASSES), PfaSettings(proj_dim=8))
    return save_model(model, directory, settings, dims, CLASSES, extra={"task": "multiclass"})


def features_for(meta: dict, rows: int = ROWS, seed: int = 0) -> dict[str, np.ndarray]:
    """Random features of the model's shapes; masks with 0..L real tokens (some rows have none)."""
    from ase_ray.models.inference import feature_shapes

    rng = np.random.default_rng(seed)
    out = {}
    for column, shape in feature_shapes(meta).items():
        if column.endswith("_mask"):
            lengths = rng.integers(0, shape[0] + 1, size=rows)
            out[column] = (np.arange(shape[0])[None, :] < lengths[:, None]).astype(np.int8)
        else:
            dtype = np.float16 if column.endswith("_tokens") else np.float32  # as the store keeps them
            out[column] = rng.normal(size=(rows, *shape)).astype(dtype)
    return out


@pytest.mark.gpu
def test_replica_device_is_cuda_only_with_a_gpu_share(gpu_device, dry_run) -> None:
    from ase_ray.models.inference import replica_device

    assert replica_device(0).type == "cpu"  # a CPU replica on a GPU node keeps off the GPU
    if not dry_run:
        assert replica_device(1).type == "cuda"
        assert replica_device(0.25).type == "cuda"


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["cmaf", "gated", "concat", "image_only", "text_only"])
def test_served_classifier_on_gpu_matches_cpu(tmp_path, gpu_device, kind) -> None:
    from ase_ray.models.inference import ClassifierPredictor

    model_dir = save_tiny_classifier(tmp_path / kind, kind)
    cpu = ClassifierPredictor.from_dir(model_dir)
    gpu = ClassifierPredictor.from_dir(model_dir, device=gpu_device)
    assert cpu.device.type == "cpu" and gpu.device.type == gpu_device.type
    assert {p.device.type for p in gpu.module.parameters()} == {gpu_device.type}
    features = features_for(cpu.meta)

    probs = gpu.predict_proba(features)
    reference = cpu.predict_proba(features)

    assert isinstance(probs, np.ndarray) and probs.dtype == np.float32 and probs.shape == (ROWS, len(CLASSES))
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs, reference, atol=1e-4, rtol=1e-3)
    assert not gpu.module.training  # eval mode: no dropout at prediction time
    # Moved after loading (what Serve does with the pyfunc MLflow loaded on the CPU).
    moved = ClassifierPredictor.from_dir(model_dir).to(gpu_device)
    assert moved.device.type == gpu_device.type
    np.testing.assert_allclose(moved.predict_proba(features), reference, atol=1e-4, rtol=1e-3)


@pytest.mark.gpu
def test_classify_on_gpu_gives_the_cpu_predictions(tmp_path, gpu_device) -> None:
    """The Classifier deployment's ``classify`` over per-image rows, as Features hands them over."""
    from ase_ray.models.inference import ClassifierPredictor
    from ase_ray.serve.predictor import LoadedModel, ModelRef, classify

    model_dir = save_tiny_classifier(tmp_path / "cmaf", "cmaf")
    ref = ModelRef(str(model_dir), str(model_dir))
    cpu = LoadedModel(ref, ClassifierPredictor.from_dir(model_dir))
    gpu = LoadedModel(ref, ClassifierPredictor.from_dir(model_dir).to(gpu_device))
    features = features_for(cpu.python_model.meta, rows=9, seed=1)
    rows = [{name: values[i] for name, values in features.items()} for i in range(9)]

    got = classify(gpu, rows, threshold=0.6)
    expected = classify(cpu, rows, threshold=0.6)

    assert len(got) == 9
    for g, e in zip(got, expected):
        assert set(g["probabilities"]) == set(CLASSES)
        for c in CLASSES:
            assert abs(g["probabilities"][c] - e["probabilities"][c]) < 1e-4
        top_two = sorted(e["probabilities"].values())[-2:]
        if top_two[1] - top_two[0] > 1e-3:  # not a near tie: the same label
            assert g["label"] == e["label"]
        if abs(e["confidence"] - 0.6) > 1e-3:  # not at the threshold: the same review flag
            assert g["needs_review"] == e["needs_review"]
