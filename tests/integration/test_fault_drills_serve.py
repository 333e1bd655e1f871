"""Serve drills from outside, over real HTTP on 127.0.0.1: a replica (Features, then Classifier) is
SIGKILLed under closed-loop load, and a soak at concurrency 32.

What must hold: Serve replaces the replica; no answer is a 500 or a non-JSON error: a request in
flight on the dead replica is sent again to its replacement, or gets a JSON 503 with Retry-After
when none answers within ``serve.request_timeout_s``; no request waits longer than that; once the
replacement is up, every request succeeds; ``/readyz`` says 503 while a deployment cannot answer and
200 once it can. The figures go to ``bench/results/reliability.json`` (see drill_report.py)."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
import pytest

from ase_ray.config import load_config
from ase_ray.data.manifest import read_dataset_info
from ase_ray.data.synthetic import generate_synthetic
from ase_ray.features.inmemory import decode_image_bytes
from ase_ray.features.pipeline import apply_layout_hints
from ase_ray.testing import register_untrained_model
from tests.integration.drill_report import record_drill
from tests.integration.local_cluster import free_port
from tests.integration.serve_load import ClosedLoop, percentile_ms

pytestmark = pytest.mark.integration

TINY = [
    "features.describe.backend=tiny", "features.reason.backend=tiny", "features.image_encoder.backend=tiny",
    "features.text_encoder.backend=tiny", "features.describe.max_new_tokens=4",
    "train.model.d_model=16", "train.model.heads=2", "train.model.head_hidden=16",
]
REQUEST_TIMEOUT_S = 20.0
APP = "ase-ray-drills"


@pytest.fixture(scope="module")
def app(ray_session, tmp_path_factory):
    from ray import serve

    from ase_ray.serve.deploy import deploy

    root = tmp_path_factory.mktemp("drills")
    cfg = load_config(overrides=[
        f"project.work_dir={root / 'work'}", *TINY, "data.synth.scale=0.02", "data.synth.seed=5",
        f"serve.port={free_port()}", f"serve.app_name={APP}", f"serve.request_timeout_s={REQUEST_TIMEOUT_S}",
        "serve.features.num_cpus=0.5", "serve.batching.max_batch_size=8", "serve.api_key_env=ASE_RAY_DRILLS_NO_KEY",
    ])
    synth = generate_synthetic(cfg.data.synth, root / "synth")
    cfg = apply_layout_hints(cfg, read_dataset_info(root / "synth" / "manifest.csv"))
    images = [Path(p).read_bytes() for p in synth["image_path"][:8]]
    register_untrained_model(cfg, [decode_image_bytes(b) for b in images[:2]], "ase-ray-multiclass", alias="champion",
                             out_dir=root / "model")
    url = deploy(cfg, timeout_s=300)
    yield url, cfg, images
    serve.shutdown()


def replica_pid(deployment: str) -> int:
    from ray.util.state import list_actors

    from tests.integration.local_cluster import connected_address

    alive = list_actors(address=connected_address(), raise_on_missing_output=False,
                        filters=[("class_name", "=", f"ServeReplica:{APP}:{deployment}"), ("state", "=", "ALIVE")])
    assert len(alive) <= 1, alive
    return int(alive[0].pid) if alive else 0


def deployment_healthy(deployment: str) -> bool:
    from ray import serve

    status = serve.status().applications[APP].deployments[deployment].status
    return str(getattr(status, "value", status)) == "HEALTHY"


def _wait_for_answers(loop: ClosedLoop, count: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while len(loop.answers) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(loop.answers) >= count, f"only {len(loop.answers)} answers under load"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("deployment", ["Features", "Classifier"])
def test_a_killed_replica_is_replaced_and_no_request_gets_a_500(app, deployment):
    url, cfg, images = app
    clients = 4
    old = replica_pid(deployment)
    assert old
    loop = ClosedLoop(url, images, clients, timeout_s=REQUEST_TIMEOUT_S + 30).start()
    readiness: list[tuple[float, int]] = []
    try:
        _wait_for_answers(loop, 2 * clients)
        killed_at = time.monotonic()
        os.kill(old, signal.SIGKILL)
        recovered_at = None
        with httpx.Client(base_url=url, timeout=10) as http:
            while time.monotonic() - killed_at < 120:
                readiness.append((time.monotonic(), http.get("/readyz").status_code))
                new = replica_pid(deployment)
                if new and new != old and deployment_healthy(deployment) and readiness[-1][1] == 200:
                    recovered_at = time.monotonic()
                    break
                time.sleep(0.25)
        assert recovered_at is not None, f"{deployment} was not replaced within 120 s"
        _wait_for_answers(loop, len(loop.answers) + 3 * clients)
    finally:
        answers = loop.stop()
    during = [a for a in answers if a.ended >= killed_at and a.started < recovered_at]
    after = [a for a in answers if a.started >= recovered_at]
    assert {a.status for a in answers} <= {200, 503}, Counter((a.status, a.error) for a in answers)
    unavailable = [a for a in answers if a.status == 503]
    assert all(a.error == "service_unavailable" and a.retry_after for a in unavailable), unavailable[:3]
    assert max(a.seconds for a in answers) <= REQUEST_TIMEOUT_S + 5  # nobody waits past the timeout
    assert len(after) >= 3 * clients and all(a.status == 200 for a in after)
    assert readiness[-1][1] == 200
    record_drill(
        f"serve_{deployment.lower()}_replica_killed", clients=clients, requests=len(answers),
        in_flight_or_sent_during_recovery=len(during), failed_during_recovery=len(unavailable),
        failed_after_recovery=sum(a.status != 200 for a in after), statuses=dict(Counter(a.status for a in answers)),
        recovery_s=round(recovered_at - killed_at, 2), max_latency_s=round(max(a.seconds for a in answers), 2),
        request_timeout_s=REQUEST_TIMEOUT_S, readyz=dict(Counter(status for _, status in readiness)),
    )


def _replica_rss_mb() -> dict[str, float]:
    return {name: round(psutil.Process(replica_pid(name)).memory_info().rss / 2**20, 1)
            for name in ("Ingress", "Features", "Classifier")}


@pytest.mark.timeout(900)
def test_soak_at_concurrency_32_has_no_5xx_and_flat_replica_memory(app):
    url, cfg, images = app
    requests = int(os.environ.get("ASE_RAY_SOAK_REQUESTS", "192"))
    warmup = max(64, requests // 10)
    loop = ClosedLoop(url, images, 32, timeout_s=REQUEST_TIMEOUT_S + 30, max_requests=warmup + requests).start()
    _wait_for_answers(loop, warmup, timeout_s=300)
    warm_rss, warm_at = _replica_rss_mb(), time.monotonic()
    answers = loop.wait()
    end_rss = _replica_rss_mb()
    measured = [a for a in answers if a.started >= warm_at]
    growth = {name: round(end_rss[name] / warm_rss[name] - 1, 4) for name in warm_rss}
    errors_5xx = sum(a.status >= 500 or a.status == 0 for a in answers)
    wall = max(a.ended for a in measured) - min(a.started for a in measured)
    record_drill("soak", concurrency=32, requests=len(answers), warmup_requests=warmup, measured_requests=len(measured),
                 errors_5xx=errors_5xx, statuses=dict(Counter(a.status for a in answers)),
                 rss_mb_after_warmup=warm_rss, rss_mb_end=end_rss, rss_growth=max(growth.values()), rss_growth_by_replica=growth,
                 p50_ms=percentile_ms(measured, 50), p99_ms=percentile_ms(measured, 99),
                 req_per_s=round(len(measured) / wall, 2))
    assert len(answers) == warmup + requests
    assert errors_5xx == 0, Counter((a.status, a.error) for a in answers)
    assert all(g <= 0.10 for g in growth.values()), (warm_rss, end_rss)
