"""The whole workflow on object storage: a real S3-compatible server (moto's server mode, on 127.0.0.1 and a
private port), ``project.storage_uri=s3://...``, every step through the ``ase-ray`` CLI as a user runs it:
features -> train -> tune -> register -> serve (one real HTTP prediction) -> predict. Afterwards the
bucket holds the store, the cache, the checkpoints, the MLflow model and the predictions, and the local
work folder holds nothing of the run's outputs (only MLflow's tracking database: the tracking server's
metadata, which a cluster keeps on its MLflow server)."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest

import ase_ray

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(ase_ray.__file__).resolve().parents[1]
BUCKET = "ase-ray-test"
TINY = [
    "features.describe.backend=measure", "features.reason.backend=tiny", "features.image_encoder.backend=tiny",
    "features.text_encoder.backend=tiny", "features.reason.resources.actors=1", "ray.num_cpus=2",
    "train.num_workers=1", "train.cpus_per_worker=0.8", "train.epochs=2", "train.pfa.epochs_per_stage=1",
    "train.pfa.first_fraction=0.5", "train.pfa.stride=0.5", "train.model.d_model=32", "train.model.head_hidden=32",
    "train.pfa.proj_dim=16", "tune.grace_period=2", "tune.num_samples=1",
]
LOCAL_OUTPUTS = (".parquet", ".pt", ".pkl", ".json", ".csv", ".md", ".npz", ".yaml", "MLmodel")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on 127.0.0.1, a bucket, and the environment that points every client at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    yield env, client
    server.stop()


def keys(client, prefix: str = "") -> list[str]:
    out, token = [], None
    while True:
        page = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix, **({"ContinuationToken": token} if token else {}))
        out += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return out
        token = page["NextContinuationToken"]


def run_cli(env: dict, *args: str, timeout: int = 400) -> str:
    proc = subprocess.run([sys.executable, "-m", "ase_ray.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


@pytest.mark.timeout(1500)
def test_the_whole_workflow_runs_on_s3_and_leaves_no_output_on_local_disk(s3, tmp_path):
    from ase_ray.config import load_config
    from ase_ray.data.synthetic import generate_synthetic

    aws, client = s3
    inputs, work = tmp_path / "inputs", tmp_path / "work"
    cfg = load_config(overrides=["data.synth.scale=0.06", "data.synth.seed=3"])
    generate_synthetic(cfg.data.synth, inputs / "synth")
    env = {**os.environ, **aws, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_THREAD_LIMIT": "1"}
    env.pop("RAY_ADDRESS", None)  # each command starts its own local Ray, as a user's does
    storage = f"s3://{BUCKET}/project"
    sets = [a for o in [f"project.work_dir={work}", f"project.storage_uri={storage}", *TINY] for a in ("--set", o)]

    run_cli(env, "data", "split", str(inputs / "synth" / "manifest.csv"), "--out", str(inputs / "split.csv"), *sets)
    out = run_cli(env, "features", "--manifest", str(inputs / "split.csv"), *sets)
    assert f"store: {storage}/features" in out
    trained = run_cli(env, "train", *sets)
    run_id = next(line.split()[-1] for line in trained.splitlines() if line.startswith("run:"))
    run_cli(env, "register", "--run-id", run_id, *sets)
    space = tmp_path / "space.yaml"
    space.write_text("params:\n  train.lr: {grid: [0.003]}\n")
    run_cli(env, "tune", "--space", str(space), *sets, timeout=600)

    port = free_port()
    served = subprocess.Popen([sys.executable, "-m", "ase_ray.cli", "serve", "--port", str(port), *sets], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        from ase_ray.data.manifest import metadata_columns, read_manifest

        rows = read_manifest(inputs / "split.csv")  # image paths made absolute
        record = {c: (None if pd.isna(rows[c].iloc[0]) else rows[c].iloc[0]) for c in metadata_columns(rows)}
        record = json.loads(pd.Series(record).to_json())  # plain JSON values
        answer = _predict_when_up(port, Path(rows["image_path"].iloc[0]), record, served, timeout_s=300)
        assert answer["label"] and answer["probabilities"]
    finally:
        os.killpg(served.pid, signal.SIGINT)
        try:
            served.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(served.pid, signal.SIGKILL)
        print("ase-ray serve said:", (served.stdout.read() if served.stdout else "")[-4000:])  # shown on failure
    predicted = run_cli(env, "predict", "--manifest", str(inputs / "split.csv"), "--out", f"{storage}/predictions",
                        *sets)
    assert f"wrote {storage}/predictions" in predicted

    found = keys(client, "project/")
    names = [k[len("project/"):] for k in found]
    assert "features/store.json" in names and any(n.startswith("features/features.parquet/part-") for n in names)
    assert any(n.startswith("features/errors.parquet") for n in names)
    assert any(n.startswith("cache/image_encoder/") and n.endswith(".parquet") for n in names)
    assert any(n.startswith("ray_results/") and "/checkpoint_" in n for n in names)  # Ray Train's checkpoints
    assert any(n.startswith("mlartifacts/") and n.endswith("MLmodel") for n in names)  # the logged model
    assert any(n.startswith("tune/") and n.endswith("trials.json") for n in names)
    table = pd.read_parquet(io.BytesIO(client.get_object(Bucket=BUCKET, Key="project/predictions/predictions.parquet")
                                       ["Body"].read()))
    assert len(table) == len(pd.read_csv(inputs / "split.csv"))
    summary = json.loads(client.get_object(Bucket=BUCKET, Key="project/features/summary.json")["Body"].read())
    assert summary["stored"] + summary["errors"] == summary["rows"] > 0

    left = sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file())
    outputs = [p for p in left if p.endswith(LOCAL_OUTPUTS) or "checkpoint" in p]
    assert outputs == [], f"run outputs left on local disk: {outputs}"
    assert set(left) <= {"mlflow.db"}, left


def _predict_when_up(port: int, image: Path, record: dict, proc: subprocess.Popen, timeout_s: float) -> dict:
    """The first 200 answer to one image and its records. Serve's proxy answers 404 until the application is
    deployed; any other 4xx is the test's fault and ends it."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"ase-ray serve exited: {proc.stdout.read()[-4000:]}")
            try:
                r = http.post("/predict", files={"file": (image.name, image.read_bytes(), "image/png")},
                              data={"metadata": json.dumps(record)})
                if r.status_code == 200:
                    return r.json()
                last = f"HTTP {r.status_code}: {r.text[:500]}"
                proxy_not_routed_yet = r.status_code == 404 and "-/routes" in r.text
                assert proxy_not_routed_yet or not 400 <= r.status_code < 500, last
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(2)
    raise AssertionError(f"ase-ray serve did not answer within the time limit (last: {last})")
