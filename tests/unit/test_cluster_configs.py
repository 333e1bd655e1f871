"""cluster.yaml and cluster-onprem.yaml against the launcher schema the installed Ray ships; the jobs'
runtime_env and the cluster's app config against their own validators."""

from __future__ import annotations

import copy
import subprocess
import sys

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from ase_ray.config import load_config
from ase_ray.storage import as_uri, storage_location
from ase_ray.tracking import artifact_root, tracking_uri

from tests.conftest import REPO

LAUNCHER_CONFIGS = ["cluster.yaml", "cluster-onprem.yaml"]


def _launcher_config(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_is_valid_for_the_installed_ray(name):
    prepared = prepare_config(_launcher_config(name))
    validate_config(prepared)
    for node_type in prepared["available_node_types"].values():
        assert node_type["max_workers"] >= node_type.get("min_workers", 0)


def test_cloud_config_has_gpu_workers_tesseract_mlflow_and_private_dashboard():
    config = _launcher_config("cluster.yaml")
    instance_types = [t["node_config"]["InstanceType"] for t in config["available_node_types"].values()]
    assert any(t.startswith("g5.") for t in instance_types)
    setup = " ".join(config["setup_commands"])
    assert "tesseract-ocr" in setup and "pip install" in setup and "torch==2.13.0" in setup
    head = " ".join(config["head_start_ray_commands"])
    assert "mlflow server" in head and "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head
    assert "ASE_RAY_TRACKING_URI" in " ".join(config["worker_start_ray_commands"])


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_a_misspelled_launcher_key_is_rejected(name):
    config = copy.deepcopy(_launcher_config(name))
    config["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(config))


def test_runtime_env_uploads_code_only_and_sets_the_worker_environment():
    from ray.runtime_env import RuntimeEnv

    env = RuntimeEnv(**yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text()))
    for excluded in (".git", ".venv", "work", "data", "mlruns", "*.parquet", "*.db"):
        assert excluded in env["excludes"]
    from ase_ray.ray_env import WORKER_ENV

    for name in ("OMP_THREAD_LIMIT", "TOKENIZERS_PARALLELISM", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"):
        assert env["env_vars"][name] == WORKER_ENV[name], name  # a submitted job's workers as a local run's


def test_cluster_app_config_loads_with_gpu_stages_and_shared_storage():
    config = load_config(REPO / "configs" / "cluster.yaml")
    assert config.features.reason.resources.num_gpus > 0 and config.features.describe.resources.num_gpus > 0
    assert config.train.use_gpu and config.train.strategy == "deepspeed"
    assert config.project.storage_uri.startswith("s3://")
    assert storage_location(config, "ray_results") == "s3://ase-ray-storage/ray_results"


def test_storage_defaults_to_the_work_dir_and_keeps_uris(tmp_path, monkeypatch):
    monkeypatch.delenv("ASE_RAY_TRACKING_URI", raising=False)
    local = load_config(overrides=[f"project.work_dir={tmp_path}"])
    assert storage_location(local, "ray_results") == str(tmp_path / "ray_results")
    assert artifact_root(local) == (tmp_path / "mlartifacts").as_uri()
    assert tracking_uri(local) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    shared = load_config(overrides=[f"project.work_dir={tmp_path}", "project.storage_uri=gs://bucket/x/"])
    assert storage_location(shared, "ray_results") == "gs://bucket/x/ray_results"
    assert as_uri("s3://b/k") == "s3://b/k"
    monkeypatch.setenv("ASE_RAY_TRACKING_URI", "http://10.0.0.10:5000")
    assert tracking_uri(local) == "http://10.0.0.10:5000"


@pytest.mark.parametrize("job", sorted(p.name for p in (REPO / "jobs").glob("[a-z]*.py")))
def test_every_job_entry_runs_its_cli_command(job):
    done = subprocess.run([sys.executable, str(REPO / "jobs" / job), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Usage" in done.stdout


def test_setup_mlflow_points_the_registry_at_the_configured_store(tmp_path, monkeypatch):
    # A served model sets the global registry URI; a later registration must not land in that store.
    import mlflow

    from ase_ray.tracking import setup_mlflow

    monkeypatch.delenv("ASE_RAY_TRACKING_URI", raising=False)
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    try:
        mlflow.set_registry_uri(f"sqlite:///{tmp_path / 'other.db'}")
        config = load_config(overrides=[f"project.work_dir={tmp_path / 'w'}"])
        setup_mlflow(config)
        assert mlflow.get_registry_uri() == mlflow.get_tracking_uri() == tracking_uri(config)
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
