"""Ray Train with DDP and DeepSpeed on 2 CPU workers, a worker killed mid-run, MLflow logging."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from ase_ray.config import load_config
from ase_ray.testing import fake_feature_store
from ase_ray.tracking import tracking_uri
from ase_ray.train.fit import fit

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _config(tmp_path, store_dir, *overrides):
    return load_config(overrides=[
        f"project.work_dir={tmp_path / 'work'}", f"train.store_dir={store_dir}", "train.epochs=6",
        "train.lr=3e-3", "train.pfa.epochs_per_stage=1", "train.pfa.first_fraction=0.5",
        "train.pfa.stride=0.25", "train.num_workers=2", *overrides,
    ])


def _losses(client: MlflowClient, run_id: str) -> list[float]:
    history = sorted(client.get_metric_history(run_id, "train_ce"), key=lambda m: m.step)
    return [m.value for m in history]


def test_ddp_survives_a_killed_worker_and_keeps_one_mlflow_run(ray_session, tmp_path):
    store = fake_feature_store(tmp_path / "store", per_class=15)
    cfg = _config(tmp_path, tmp_path / "store", "train.strategy=ddp", "train.fault_injection_epoch=3",
                  "train.run_name=ddp_fault")
    result = fit(cfg)
    client = MlflowClient(tracking_uri(cfg))
    runs = client.search_runs([client.get_experiment_by_name("ase-ray").experiment_id])
    assert [r.info.run_id for r in runs] == [result.run_id]  # the restart logged into the same run
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    steps = sorted({m.step for m in client.get_metric_history(result.run_id, "train_ce")})
    assert steps == list(range(6))  # every epoch once, resumed after epoch 2's checkpoint
    losses = _losses(client, result.run_id)
    assert losses[-1] < losses[0]
    assert result.metrics["test"]["macro_f1"] > 0.6
    assert run.data.params["train.strategy"] == "ddp"
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"confusion_matrix_test.png", "classification_report_test.txt"} <= artifacts
    model = mlflow.pyfunc.load_model(f"runs:/{result.run_id}/model")
    from ase_ray.serving_model import features_to_frame
    from ase_ray.train.data import load_task_arrays

    splits, classes = load_task_arrays(tmp_path / "store", "multiclass")
    meta = {"dims": __import__("json").loads((result.model_dir / "model.json").read_text())["dims"],
            "settings": cfg.train.model.model_dump()}
    predictions = model.predict(features_to_frame(splits["test"].features, meta, len(splits["test"])))
    assert list(predictions.columns) == ["label", *[f"prob_{c}" for c in classes]]
    assert len(store.features) == 45


def test_deepspeed_zero1_trains_binary(ray_session, tmp_path):
    fake_feature_store(tmp_path / "store", per_class=12)
    cfg = _config(tmp_path, tmp_path / "store", "train.strategy=deepspeed", "train.deepspeed.zero_stage=1",
                  "train.task=binary", "train.run_name=ds", "train.model.kind=concat")
    result = fit(cfg)
    client = MlflowClient(tracking_uri(cfg))
    losses = _losses(client, result.run_id)
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert result.classes == ["normal", "defect"]
    assert (result.model_dir / "weights.pt").is_file()
