"""Which run an invocation is: new names every time, resume by name / id / latest, and the errors."""

from __future__ import annotations

import os
from pathlib import Path
import time

import pytest

from ase_ray.config import apply_overrides, load_config
from ase_ray.errors import ConfigError
from ase_ray.train.runs import explicit_keys, plan_run, write_record

STORAGE = "/tmp/storage-for-tests"


def _started(config, run_id="abc123"):
    plan = plan_run(config, STORAGE)
    write_record(plan, run_id, {"train_rows": 10})
    return plan


def test_every_plan_is_a_new_run(tmp_path):
    cfg = load_config(overrides=[f"project.work_dir={tmp_path}"])
    names = {plan_run(cfg, STORAGE).name for _ in range(5)}
    assert len(names) == 5 and all(n.startswith("train-") for n in names)


def test_resume_finds_latest_by_name_and_by_mlflow_id(tmp_path):
    cfg = load_config(overrides=[f"project.work_dir={tmp_path}", "train.lr=0.01"])
    older = _started(cfg, "run-old")
    time.sleep(0.01)
    newer = _started(cfg, "run-new")
    os.utime(Path(older.record_dir) / "settings.json", (1, 1))
    bare = load_config(overrides=[f"project.work_dir={tmp_path}"])
    latest = plan_run(bare, STORAGE, resume=True)
    assert (latest.name, latest.resuming, latest.mlflow_run_id) == (newer.name, True, "run-new")
    assert latest.config.train.lr == 0.01  # the run's settings, not the defaults
    assert plan_run(bare, STORAGE, resume=older.name).mlflow_run_id == "run-old"
    assert plan_run(bare, STORAGE, resume="run-old").name == older.name
    with pytest.raises(ConfigError, match="no training run 'nope' to resume"):
        plan_run(bare, STORAGE, resume="nope")


def test_resume_refuses_changes_and_names_them(tmp_path):
    cfg = load_config(overrides=[f"project.work_dir={tmp_path}"])
    _started(cfg)
    shape = load_config(overrides=[f"project.work_dir={tmp_path}", "train.model.d_model=64", "train.lr=0.5"])
    with pytest.raises(ConfigError, match=r"shape: train.model.d_model \(run: 128, given: 64\).*train.lr"):
        plan_run(shape, STORAGE, resume=True)
    longer = load_config(overrides=[f"project.work_dir={tmp_path}", "train.epochs=80"])
    assert plan_run(longer, STORAGE, resume=True).config.train.epochs == 80  # extending is allowed


def test_no_run_to_resume(tmp_path):
    with pytest.raises(ConfigError, match="no training run to resume"):
        plan_run(load_config(overrides=[f"project.work_dir={tmp_path}"]), STORAGE, resume=True)


def test_a_fixed_name_continues_its_own_record(tmp_path):
    cfg = apply_overrides(load_config(overrides=[f"project.work_dir={tmp_path}"]), {})
    first = plan_run(cfg, STORAGE, name="trial_000")
    assert not first.resuming
    write_record(first, "r1", {})
    again = plan_run(cfg, STORAGE, name="trial_000")
    assert again.resuming and again.mlflow_run_id == "r1"


def test_explicit_keys_are_what_was_given():
    cfg = load_config(overrides=["train.lr=0.5", "train.model.d_model=64"])
    assert explicit_keys(cfg.train, "train.") == {"train.lr", "train.model.d_model"}
