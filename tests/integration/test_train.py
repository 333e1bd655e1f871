"""Ray Train with DDP and DeepSpeed on 2 CPU workers: every invocation a new run, a resume on request
that reproduces the uninterrupted run, a worker killed mid-run, the best epoch exported in fp32."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from ase_ray.cli import app
from ase_ray.config import load_config
from ase_ray.testing import fake_feature_store
from ase_ray.tracking import tracking_uri
from ase_ray.train.fit import fit
from tests.integration.drill_report import record_drill
from tests.integration.local_cluster import train_worker_count, train_worker_pids

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BASE = ["train.epochs=6", "train.lr=3e-3", "train.pfa.epochs_per_stage=1", "train.pfa.first_fraction=0.5",
        "train.pfa.stride=0.25", "train.num_workers=2"]


def _overrides(tmp_path, store_dir, *extra):
    return [f"project.work_dir={tmp_path / 'work'}", f"train.store_dir={store_dir}", *BASE, *extra]


def _config(tmp_path, store_dir, *extra):
    return load_config(overrides=_overrides(tmp_path, store_dir, *extra))


def _history(client: MlflowClient, run_id: str, key: str = "train_ce") -> list[float]:
    """One value per epoch: the last logged (an epoch whose checkpoint a kill beat is trained again)."""
    by_step = {m.step: m.value for m in sorted(client.get_metric_history(run_id, key),
                                                key=lambda m: (m.step, m.timestamp))}
    return [by_step[step] for step in sorted(by_step)]


def _steps(client: MlflowClient, run_id: str) -> list[int]:
    return sorted({m.step for m in client.get_metric_history(run_id, "train_ce")})


def _runs(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name("ase-ray")
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], "tags.`ase_ray.stage` = 'train'")


def _fit_killing_a_worker(cfg, client: MlflowClient, after_step: int, timeout_s: float = 300) -> tuple[dict, int]:
    """``fit(cfg)`` in a thread; once its run has logged epoch ``after_step``, SIGKILL one Ray Train
    worker process from here, outside the run. Returns the outcome (``result`` or ``error``) and the pid."""
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = fit(cfg)
        except Exception as exc:  # the run's own failure, checked by the caller
            outcome["error"] = exc

    before = {r.info.run_id for r in _runs(client)}
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline, killed = time.monotonic() + timeout_s, None
    while killed is None and thread.is_alive() and time.monotonic() < deadline:
        new = [r for r in _runs(client) if r.info.run_id not in before]
        pids = train_worker_pids() if new and max(_steps(client, new[0].info.run_id), default=-1) >= after_step else []
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed = pids[0]
        time.sleep(0.1)
    thread.join(max(1.0, deadline - time.monotonic()))
    assert killed is not None, "the run ended before a worker could be killed"
    assert not thread.is_alive(), "the run did not end in time after its worker was killed"
    return outcome, killed


def _cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_each_train_is_a_new_run_and_a_resume_matches_the_uninterrupted_run(ray_session, tmp_path):
    fake_feature_store(tmp_path / "store", per_class=15)
    sets = [a for o in _overrides(tmp_path, tmp_path / "store") for a in ("--set", o)]
    cfg = load_config(overrides=_overrides(tmp_path, tmp_path / "store"))
    client = MlflowClient(tracking_uri(cfg))

    code, out = _cli("train", *sets)
    assert code == 0, out
    code, out2 = _cli("train", *sets, "--set", "train.lr=0.01")
    assert code == 0, out2
    first, second = sorted(_runs(client), key=lambda r: r.info.start_time)
    assert first.info.run_id != second.info.run_id
    assert (first.data.params["train.lr"], second.data.params["train.lr"]) == ("0.003", "0.01")
    assert first.data.params["ran.fake.model"] == "random arrays (ase_ray.testing)"  # the store's own record
    for run in (first, second):
        assert _steps(client, run.info.run_id) == list(range(6))  # each trained all its epochs
        assert run.info.status == "FINISHED"
    assert _history(client, first.info.run_id) != _history(client, second.info.run_id)

    # A run whose worker is killed from outside after epoch 1 (no restarts allowed), then resumed by the user.
    outcome, _ = _fit_killing_a_worker(_config(tmp_path, tmp_path / "store", "train.max_failures=0"), client, 1)
    assert "error" in outcome
    interrupted = max(_runs(client), key=lambda r: r.info.start_time)
    logged = _steps(client, interrupted.info.run_id)
    assert interrupted.info.status == "FAILED" and logged == list(range(len(logged))) and 2 <= len(logged) < 6

    code, out = _cli("train", "--resume", "--set", "train.model.d_model=64", *sets)
    assert code == 2 and "train.model.d_model" in out and "shape" in out
    code, out = _cli("train", "--resume", interrupted.data.tags["ase_ray.train_run"], *sets)
    assert code == 0, out
    assert len(_runs(client)) == 3  # resumed into the interrupted run, no new one
    resumed = client.get_run(interrupted.info.run_id)
    assert resumed.info.status == "FINISHED" and _steps(client, resumed.info.run_id) == list(range(6))
    for key in ("train_ce", "train_align", "subset_size"):
        np.testing.assert_allclose(_history(client, resumed.info.run_id, key),
                                   _history(client, first.info.run_id, key), atol=1e-4, rtol=0)

    # The served model is the best epoch's, scored in the same precision per epoch and at the end.
    best = int(resumed.data.metrics["best_epoch"])
    val = _history(client, resumed.info.run_id, "val_macro_f1")
    assert val[best] == max(val) == pytest.approx(resumed.data.metrics["final_val_macro_f1"], abs=1e-9)
    assert resumed.data.tags["ase_ray.best_epoch"] == str(best)


def test_ddp_survives_a_worker_killed_from_outside_and_keeps_one_mlflow_run(ray_session, tmp_path):
    store = fake_feature_store(tmp_path / "store", per_class=15)
    cfg = _config(tmp_path, tmp_path / "store", "train.strategy=ddp")
    client = MlflowClient(tracking_uri(cfg))
    groups_before = train_worker_count()
    outcome, pid = _fit_killing_a_worker(cfg, client, after_step=2)
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert [r.info.run_id for r in _runs(client)] == [result.run_id]  # the restart logged into the same run
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert _steps(client, result.run_id) == list(range(6))  # every epoch, none lost
    first_epoch = client.get_metric_history(result.run_id, "train_ce")
    assert [m.step for m in first_epoch].count(0) == 1  # continued from a checkpoint, not from scratch
    started = train_worker_count() - groups_before
    assert started == 2 * cfg.train.num_workers  # one worker group, then its replacement
    retrained = len(first_epoch) - 6  # epochs trained again: those after the last checkpoint
    record_drill("train_worker_killed", killed_pid=pid, killed_after_epoch=2, epochs=6, epochs_logged=len(first_epoch),
                 epochs_retrained=retrained, worker_processes_started=started, mlflow_runs=1, status=run.info.status)
    losses = _history(client, result.run_id)
    assert losses[-1] < losses[0]
    assert result.metrics["test"]["macro_f1"] > 0.6
    assert run.data.params["train.strategy"] == "ddp"
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"confusion_matrix_test.png", "classification_report_test.txt", "reliability_val.png"} <= artifacts
    # The line: the reject threshold chosen on validation for the escape target, and the test figures at it.
    decision = json.loads((result.model_dir / "model.json").read_text())["extra"]["decision"]
    assert decision["normal_class"] == "normal" and decision["max_escape_rate"] == cfg.evaluate.max_escape_rate
    assert decision["val_line"]["escape_rate"] <= cfg.evaluate.max_escape_rate
    assert run.data.metrics["final_test_defect_threshold"] == pytest.approx(decision["defect_threshold"])
    line = result.metrics["test"]["line"]
    assert run.data.metrics["final_test_escape_rate"] == pytest.approx(line["escape_rate"])
    assert run.data.metrics["final_test_overkill_rate"] == pytest.approx(line["overkill_rate"])
    assert line["defects"] + line["normals"] == result.metrics["test"]["n"]
    assert "final_val_review_error_catch_rate" in run.data.metrics
    model = mlflow.pyfunc.load_model(f"runs:/{result.run_id}/model")
    from ase_ray.serving_model import features_to_frame
    from ase_ray.train.data import load_task_arrays, with_model_numeric

    splits, classes = load_task_arrays(tmp_path / "store", "multiclass")
    meta = json.loads((result.model_dir / "model.json").read_text())
    assert [f["name"] for f in meta["extra"]["inputs"]["numeric"]["fields"]] == ["LEN"]  # the store's OCR field
    assert run.data.tags["ase_ray.numeric_fields"] == "LEN"
    # 9 validation rows: too few to fit a temperature, and the run says so
    assert meta["extra"]["calibration"]["skipped"].startswith("9 validation rows")
    assert run.data.tags["ase_ray.temperature"].startswith("not calibrated: 9 validation rows")
    test = with_model_numeric(splits["test"], meta)
    predictions = model.predict(features_to_frame(test.features, meta, len(test)))
    assert list(predictions.columns) == ["label", *[f"prob_{c}" for c in classes]]
    assert len(store.features) == 45


def test_deepspeed_zero2_bf16_exports_fp32_master_weights(ray_session, tmp_path):
    fake_feature_store(tmp_path / "store", per_class=12)
    cfg = _config(tmp_path, tmp_path / "store", "train.strategy=deepspeed", "train.deepspeed.zero_stage=2",
                  "train.deepspeed.precision=bf16", "train.task=binary", "train.model.kind=concat",
                  "train.lr_schedule=cosine")
    result = fit(cfg)
    client = MlflowClient(tracking_uri(cfg))
    losses = _history(client, result.run_id)
    assert len(losses) == 6 and losses[-1] < losses[0]
    # The rate DeepSpeed's ZeRO optimizer stepped with followed the cosine schedule.
    expected = [cfg.train.lr * (1 + math.cos(math.pi * e / 6)) / 2 for e in range(6)]
    np.testing.assert_allclose(_history(client, result.run_id, "lr"), expected, rtol=1e-6)
    assert result.classes == ["normal", "defect"]
    weights = torch.load(result.model_dir / "weights.pt", weights_only=True)
    floats = [v for v in weights.values() if v.is_floating_point()]
    assert all(v.dtype == torch.float32 for v in floats)
    # The master weights, not the bf16 copy the model computed with: most values are off the bf16 grid.
    off_grid = sum(int((v != v.bfloat16().float()).sum()) for v in floats)
    assert off_grid > 0.5 * sum(v.numel() for v in floats)
    run = client.get_run(result.run_id)
    best = int(run.data.metrics["best_epoch"])
    val = _history(client, result.run_id, "val_macro_f1")
    assert val[best] == pytest.approx(run.data.metrics["final_val_macro_f1"], abs=1e-9)
    assert json.loads((result.model_dir / "model.json").read_text())["extra"]["training_precision"] == "bf16"


def test_a_constant_text_source_is_left_out_and_recorded(ray_session, tmp_path):
    fake_feature_store(tmp_path / "store", per_class=10, constant_sources=("reasoning",))
    cfg = _config(tmp_path, tmp_path / "store", "train.epochs=2", "train.num_workers=1")
    result = fit(cfg)
    results = json.loads(result.results_path.read_text())
    kept = ["ocr", "description", "metadata"]
    assert results["dropped_text_sources"] == ["reasoning"] and results["text_sources"] == kept
    assert json.loads((result.model_dir / "model.json").read_text())["settings"]["text_sources"] == kept
    run = MlflowClient(tracking_uri(cfg)).get_run(result.run_id)
    assert run.data.tags["ase_ray.dropped_text_sources"] == "reasoning"
    assert "reasoning" not in run.data.params["train.model.text_sources"]
