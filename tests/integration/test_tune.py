"""Ray Tune over Ray Train on a tiny store: nested MLflow runs, the results table, the registry's champion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ase_ray.config import load_config
from ase_ray.registry import champion_version, model_name, register_run, resolve_champion_uri
from ase_ray.testing import fake_feature_store
from ase_ray.tracking import tracking_uri
from ase_ray.tune.search import run_search

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _config(root, *overrides):
    return load_config(overrides=[
        f"project.work_dir={root / 'work'}", f"train.store_dir={root / 'store'}", "train.num_workers=1",
        "train.cpus_per_worker=0.8", "train.epochs=3", "train.pfa.epochs_per_stage=1",
        "train.pfa.first_fraction=0.5", "train.pfa.stride=0.25", "train.model.d_model=32",
        "train.model.head_hidden=32", "train.pfa.proj_dim=16", "tune.grace_period=3", *overrides,
    ])


@pytest.fixture(scope="module")
def first(ray_session, tmp_path_factory):
    """A 2-trial learning-rate search: both trials run at once (2 CPUs, 0.9 CPU per trial)."""
    root = tmp_path_factory.mktemp("tune")
    fake_feature_store(root / "store", per_class=15)
    cfg = _config(root, "tune.name=first")
    space = {"params": {"train.lr": {"grid": [3e-3, 1e-2]}}}
    return cfg, run_search(cfg, space_data=space)


def test_two_trial_search_nests_runs_registers_a_champion_and_writes_the_table(first):
    cfg, result = first
    client = MlflowClient(tracking_uri(cfg))
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["ase_ray.stage"] == "tune"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    assert sorted(r.data.tags["ase_ray.trial"] for r in children) == ["trial_000", "trial_001"]
    assert all(r.info.status == "FINISHED" for r in children)
    assert sorted(r.data.params["train.lr"] for r in children) == ["0.003", "0.01"]
    assert [(r.status, r.epochs) for r in result.rows] == [("completed", 3), ("completed", 3)]
    assert {r.run_id for r in result.rows} == {r.info.run_id for r in children}

    best = result.best
    assert best.metric == max(r.metric for r in result.rows)
    assert parent.data.params["best.train.lr"] == str(best.params["train.lr"])
    assert parent.data.metrics["best_val_macro_f1"] == pytest.approx(best.metric)
    assert parent.data.tags["ase_ray.best_run_id"] == best.run_id

    version = champion_version(cfg)
    assert version is not None and version.name == model_name("multiclass") == "ase-ray-multiclass"
    assert version.run_id == best.run_id and result.registration.champion
    assert float(version.tags["ase_ray.val_macro_f1"]) == pytest.approx(best.metric, abs=1e-6)
    assert resolve_champion_uri(cfg) == "models:/ase-ray-multiclass@champion"

    table = Path(result.table_path).read_text()
    for row in result.rows:
        assert f"| {row.trial}" in table and row.run_id in table
    assert f"| {best.trial} (best) |" in table
    payload = json.loads(Path(result.json_path).read_text())
    assert [t["trial"] for t in payload["trials"]] == ["trial_000", "trial_001"]
    assert payload["best"]["run_id"] == best.run_id and payload["registration"]["alias"] == "champion"
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"trials.md", "trials.json", "search_space.yaml"} <= artifacts


def test_worse_search_leaves_the_champion_where_it_was(first):
    cfg, result = first
    before = champion_version(cfg)
    worse_cfg = cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"name": "worse"})})
    space = {"fixed": {"train.epochs": 1, "train.pfa.enabled": False}, "params": {"train.lr": {"grid": [1e-7]}}}
    worse = run_search(worse_cfg, space_data=space)
    assert worse.best.metric < result.best.metric
    assert worse.registration.alias == "challenger" and not worse.registration.champion
    assert "does not beat" in worse.registration.reason and "same validation data" in worse.registration.reason
    client = MlflowClient(tracking_uri(cfg), registry_uri=tracking_uri(cfg))
    assert champion_version(cfg).version == before.version
    challenger = client.get_model_version_by_alias("ase-ray-multiclass", "challenger")
    assert challenger.run_id == worse.best.run_id


def test_register_by_hand_compares_on_the_same_data(first):
    cfg, result = first
    other = next(r for r in result.rows if r.run_id != result.best.run_id)
    by_hand = register_run(cfg, other.run_id)
    assert by_hand.alias == "challenger"  # not better than the best trial of the same search
    again = register_run(cfg, other.run_id)
    assert again.version == by_hand.version  # no second version for the same run
    assert champion_version(cfg).run_id == result.best.run_id


def test_resume_keeps_the_finished_trials(first):
    cfg, result = first
    resumed = run_search(cfg, resume=True)
    assert resumed.parent_run_id == result.parent_run_id
    assert [(r.trial, r.run_id, r.status) for r in resumed.rows] == [(r.trial, r.run_id, r.status) for r in result.rows]
    assert resumed.registration.reason == "already the champion"


def test_bad_search_space_fails_naming_the_key(tmp_path):
    from tests.unit.test_cli import run

    space = tmp_path / "bad.yaml"
    space.write_text("params:\n  train.pfa.strid: {grid: [0.1, 0.2]}\n")
    result = run("tune", "--space", str(space), "--set", f"project.work_dir={tmp_path / 'work'}")
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "train.pfa.strid" in err and "stride" in err and str(space) in err
    assert not (tmp_path / "work" / "tune").exists()


def test_placement_groups_left_by_training_are_released_before_serving(ray_session):
    # A Tune trial stopped early can leave its Ray Train worker group reserved; the pipeline's serve
    # stage removes what this job still holds so that Serve's replicas can be scheduled.
    from ray.util.placement_group import placement_group, placement_group_table

    from ase_ray.pipeline import release_leftover_placement_groups

    leftover = placement_group([{"CPU": 0.5}])
    ray_session.get(leftover.ready(), timeout=60)
    messages = []
    removed = release_leftover_placement_groups(messages.append, wait_s=0)
    assert leftover.id.hex() in removed and "removed" in messages[0]
    assert placement_group_table(leftover)["state"] == "REMOVED"
    assert release_leftover_placement_groups(messages.append, wait_s=0) == []
