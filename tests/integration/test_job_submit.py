"""The whole pipeline submitted with `ray job submit` to a real Ray head on 127.0.0.1.

Starts `ray start --head` with a private temp dir and ports, submits jobs/pipeline.py on a tiny
synthetic set (tiny model configs), waits for SUCCEEDED, checks the MLflow runs, the registered
champion and the Serve prediction in the report, and stops only the cluster it started.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO
from tests.integration.local_cluster import LocalRayHead, free_port, ray_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY_PIPELINE = [
    "data.synth.scale=0.06", "data.synth.seed=3",
    "features.describe.backend=tiny", "features.reason.backend=tiny", "features.image_encoder.backend=tiny",
    "features.text_encoder.backend=tiny", "features.describe.max_new_tokens=4",
    "features.reason.resources.actors=1",
    "train.epochs=2", "train.num_workers=1",
]


@pytest.fixture(scope="module")
def ray_head():
    head = LocalRayHead(Path(tempfile.mkdtemp(prefix="ase-ray-head-", dir="/tmp"))).start()
    before = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "token"  # the job client in this process talks to a token-auth head
    yield head
    head.stop()
    if before is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = before


def _submit(head: LocalRayHead, *job_args: str) -> str:
    command = [
        ray_cli(), "job", "submit", "--address", head.dashboard_url, "--no-wait",
        "--working-dir", str(REPO), "--runtime-env", str(REPO / "jobs" / "runtime_env.yaml"),
        "--", "python", *job_args,
    ]
    done = subprocess.run(command, env=head.env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    return re.search(r"raysubmit_[A-Za-z0-9]+", done.stdout).group(0)


def _wait(head: LocalRayHead, job_id: str, timeout_s: float) -> tuple[str, str]:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(head.dashboard_url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status.value, client.get_job_logs(job_id)
        time.sleep(5)
    client.stop_job(job_id)
    return "TIMEOUT", client.get_job_logs(job_id)


def test_pipeline_job_on_a_local_ray_head(ray_head, tmp_path):
    work = tmp_path / "work"
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    job_id = _submit(
        ray_head, "jobs/pipeline.py",
        "--set", f"project.work_dir={work}", "--set", f"mlflow.tracking_uri={tracking}",
        "--set", f"project.storage_uri={(tmp_path / 'shared').as_uri()}",
        "--set", f"serve.port={free_port()}",
        *[arg for override in TINY_PIPELINE for arg in ("--set", override)],
    )
    status, logs = _wait(ray_head, job_id, timeout_s=1200)
    assert status == "SUCCEEDED", logs[-6000:]

    report = json.loads((work / "pipeline_report.json").read_text())
    assert {"features", "train", "tune", "serve"} <= set(report["stages"])
    prediction = report["stages"]["serve"]["prediction"]  # one real HTTP answer from the champion
    assert prediction["label"] in report["dataset"]["counts"]["train"]
    assert prediction["model_version"] == report["champion"]["version"]

    client = MlflowClient(tracking, registry_uri=tracking)  # not the registry an earlier test set globally
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    stages = [run.data.tags.get("ase_ray.stage") for run in runs]
    assert {"features", "train", "tune", "tune_trial"} <= set(stages)
    parent = next(r for r in runs if r.data.tags.get("ase_ray.stage") == "tune")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2
    champion = client.get_model_version_by_alias(report["champion"]["name"], "champion")
    assert champion.run_id == report["champion"]["run_id"]
    assert (tmp_path / "shared" / "ray_results").is_dir()  # Ray Train wrote to the storage URI
