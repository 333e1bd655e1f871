"""Fine-tuning the image encoder's later stages on Ray Train (2 CPU workers), under DDP and DeepSpeed:
the encoder's weights move, the loss falls, and the exported model is the one evaluation scored. Defect
maps the same way: their cell loss falls on the masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from ase_ray.config import load_config
from ase_ray.models.encoder_tail import load_tail
from ase_ray.models.inference import ClassifierPredictor
from ase_ray.models.settings import ImageTailSpec
from ase_ray.testing import fake_feature_store
from ase_ray.tracking import tracking_uri
from ase_ray.train.data import load_task_arrays, with_model_numeric
from ase_ray.train.fit import fit
from ase_ray.train.metrics import classification_metrics

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = {"backend": "tiny", "image_size": 64, "pooling": "mean_max", "resize": "pad"}


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_finetuning_on_two_workers_moves_the_encoder_and_exports_what_was_scored(ray_session, tmp_path, strategy):
    store = tmp_path / "store"
    fake_feature_store(store, image_encoder=TINY, per_class=15)
    cfg = load_config(overrides=[
        f"project.work_dir={tmp_path / 'work'}", f"train.store_dir={store}", "train.epochs=5", "train.lr=3e-3",
        "train.num_workers=2", "train.model.kind=cmaf", "train.pfa.epochs_per_stage=1",
        "train.finetune.enabled=true", f"train.strategy={strategy}", f"train.run_name=ft_{strategy}"])
    result = fit(cfg)
    client = MlflowClient(tracking_uri(cfg))
    losses = [m.value for m in sorted(client.get_metric_history(result.run_id, "train_ce"), key=lambda m: m.step)]
    assert len(losses) == 5 and losses[-1] < losses[0]

    meta = json.loads((result.model_dir / "model.json").read_text())
    spec = ImageTailSpec.model_validate(meta["settings"]["image_tail"])
    assert spec == ImageTailSpec(backend="tiny", image_size=64, pooling="mean_max")
    weights = torch.load(result.model_dir / "weights.pt", weights_only=True)
    pretrained = load_tail(spec).state_dict()
    moved = [k for k, v in pretrained.items() if k.endswith("convolution.weight")
             and not torch.equal(weights[f"image_tail.net.{k}"], v)]
    assert moved and len(moved) == len([k for k in pretrained if k.endswith("convolution.weight")])
    for k, v in pretrained.items():  # BatchNorm statistics stay the backbone's
        if k.endswith(("running_mean", "running_var")):
            assert torch.equal(weights[f"image_tail.net.{k}"], v)

    # what `predict` and Serve load gives the test figures the run recorded
    splits, classes = load_task_arrays(store, "multiclass")
    test = with_model_numeric(splits["test"], meta)
    probs = ClassifierPredictor.from_dir(result.model_dir).predict_proba(test.features)
    scored = classification_metrics(test.labels, probs.argmax(1), classes)["macro_f1"]
    assert scored == pytest.approx(result.metrics["test"]["macro_f1"], abs=1e-9)
    assert np.isfinite(probs).all()


def test_defect_maps_train_on_two_workers_from_the_masks_and_export_what_was_scored(ray_session, tmp_path):
    store = tmp_path / "store"
    fake_feature_store(store, image_encoder=TINY, per_class=15, masks=True)
    cfg = load_config(overrides=[
        f"project.work_dir={tmp_path / 'work'}", f"train.store_dir={store}", "train.epochs=4", "train.lr=3e-3",
        "train.num_workers=2", "train.model.kind=cmaf", "train.pfa.epochs_per_stage=1",
        "train.model.image_pooling=defect_maps", "train.run_name=maps"])
    result = fit(cfg)
    client = MlflowClient(tracking_uri(cfg))
    cells = [m.value for m in sorted(client.get_metric_history(result.run_id, "train_cells"), key=lambda m: m.step)]
    assert len(cells) == 4 and cells[-1] < cells[0]
    meta = json.loads((result.model_dir / "model.json").read_text())
    assert meta["settings"]["image_pooling"] == "defect_maps"
    splits, classes = load_task_arrays(store, "multiclass")
    test = with_model_numeric(splits["test"], meta)
    probs = ClassifierPredictor.from_dir(result.model_dir).predict_proba(test.features)
    scored = classification_metrics(test.labels, probs.argmax(1), classes)["macro_f1"]
    assert scored == pytest.approx(result.metrics["test"]["macro_f1"], abs=1e-9)
