"""Fault drills on the feature data path, done from outside the code under test (issue 17, features part).

1. a feature-stage actor is SIGKILLed mid-extraction: every row is stored or in the errors table, and
   the summary says how many rows were run again;
2. the driver of `ase-ray features` is SIGKILLed mid-run (with it, the local Ray it started): the
   folder it leaves is not taken for a store, and the rerun computes exactly the rows the cache lacks;
5. a damaged cache entry is recomputed; a truncated store shard and a missing model file are a
   one-line `error:` naming the file (exit 2);
6. two `ase-ray features` runs at once on one cache (each with its own local Ray) write the stores a
   lone run writes.

Everything stays on 127.0.0.1 and is small: ~16 synthetic images, tesseract and the fastest offline
backends (measure describer, no LLM, tiny random encoders), batches of two rows. Each drill records its
figures with ``record_drill`` (rows in / out, lost, retried, recomputed)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest

import ase_ray
from ase_ray.config import load_config
from ase_ray.data.manifest import read_dataset_info, read_manifest
from ase_ray.errors import DataError
from ase_ray.features.pipeline import apply_layout_hints, extract_features, stage_plan, with_metadata
from ase_ray.features.stages import DecodeStage
from ase_ray.features.store import load_store

from tests.conftest import synthetic_with_a_corrupt_image
from tests.integration.drill_report import record_drill

pytestmark = pytest.mark.integration

REPO = Path(ase_ray.__file__).resolve().parents[1]
MODEL_STAGES = ("ocr", "describe", "reason", "image_encoder", "text_encoder")
CHEAP = [
    "features.describe.backend=measure", "features.reason.backend=none", "features.reason.resources.actors=1",
    "features.image_encoder.backend=tiny", "features.text_encoder.backend=tiny", "features.shard_rows=4",
    "ray.num_cpus=2", "ray.log_to_driver=false",
    "features.decode.batch_size=2", *(f"features.{s}.resources.batch_size=2" for s in MODEL_STAGES),
]


# ------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """~16 synthetic images and one that does not decode (the errors table's row); returns the manifest."""
    return synthetic_with_a_corrupt_image(tmp_path_factory.mktemp("drills"), scale=0.035, seed=11)


def overrides(work: Path, cache: Path) -> list[str]:
    return [f"project.work_dir={work}", f"features.cache_dir={cache}", *CHEAP]


def config(work: Path, cache: Path):
    return load_config(overrides=overrides(work, cache))


@pytest.fixture(scope="module")
def lone(ray_session, dataset, tmp_path_factory) -> Path:
    """The store of one uninterrupted run on a fresh cache: what every drill's store must equal."""
    root = tmp_path_factory.mktemp("lone")
    result = extract_features(config(root, root / "cache"), dataset, root / "store", echo=lambda *_: None, track=False)
    assert result.summary["computed"] == result.summary["rows"] and result.summary["retried"] == 0
    return root


def rows_in(manifest: Path) -> int:
    return len(read_manifest(manifest))


def cli_env() -> dict[str, str]:
    """The environment of an `ase-ray` subprocess: this checkout first on the path, offline, loopback."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_THREAD_LIMIT="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.pop("RAY_ADDRESS", None)  # each CLI run starts its own local Ray, as a user's does
    return env


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ase_ray.cli", *args]


def features_cli(manifest: Path, out: Path, work: Path, cache: Path) -> list[str]:
    sets = [a for o in overrides(work, cache) for a in ("--set", o)]
    return cli("features", "--manifest", str(manifest), "--out", str(out), "--no-track", *sets)


def cache_entries(cache: Path, stage: str) -> int:
    """Distinct keys in a stage's cache shards (every fingerprint)."""
    return len(set().union(*[shard_keys(p) for p in (cache / stage).rglob("*.parquet")])) if (cache / stage).is_dir() else 0


def shard_keys(shard: Path) -> set[str]:
    import pyarrow.parquet as pq

    return set(pq.read_table(shard, columns=["key"])["key"].to_pylist())


def cached_per_stage(cfg, manifest: Path) -> tuple[int, dict[str, int]]:
    """Counted from the cache, the way the pipeline keys it: (rows that decode and whose every stage
    output is cached, per stage the rows whose output for it is cached)."""
    rows = read_manifest(manifest)
    rows, _ = with_metadata(cfg, rows, read_dataset_info(manifest))
    cfg = apply_layout_hints(cfg, read_dataset_info(manifest))
    rows = rows.reset_index(drop=True)
    rows.insert(0, "row_id", np.arange(len(rows), dtype=np.int64))
    rows = rows.astype({c: str for c in rows.columns if rows[c].dtype == object})
    per_stage = dict.fromkeys(MODEL_STAGES, 0)
    complete = 0
    cache = Path(cfg.features.cache_dir)
    for i in range(len(rows)):
        batch = DecodeStage()(rows.iloc[[i]])
        if batch.at[0, "error_stage"]:
            continue
        for stage_cls, settings in stage_plan(cfg):
            batch = stage_cls(settings, str(cache)).lookup(batch)
            if batch is None:
                break
            per_stage[stage_cls.name] += 1
        else:
            complete += 1
    return complete, per_stage


def assert_same_store(got: Path, want: Path) -> None:
    """Same rows, same texts, equal arrays, same errors."""
    a, b = load_store(got), load_store(want)
    assert list(a.features.columns) == list(b.features.columns)
    assert list(a.features["row_id"]) == list(b.features["row_id"])
    for column in a.features.columns:
        x, y = a.features[column], b.features[column]
        if len(x) and isinstance(x.iloc[0], np.ndarray):
            np.testing.assert_array_equal(np.stack(x.to_numpy()), np.stack(y.to_numpy()), err_msg=column)
        else:
            assert list(x) == list(y), column
    pd.testing.assert_frame_equal(a.errors, b.errors)
    assert a.meta["shapes"] == b.meta["shapes"] and a.meta["rows"] == b.meta["rows"]


def wait_for(condition, timeout_s: float, what: str, alive=lambda: True, poll_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if not alive():
            raise AssertionError(f"the run ended before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout_s} s")
        time.sleep(poll_s)


def begun(store_dir: Path, stage: str) -> int:
    """Rows the stage has begun in this run, read from the run's attempt log (ase_ray.features.stages.AttemptLog)."""
    from ase_ray.features.store import ATTEMPTS_DIR

    logs = (store_dir / ATTEMPTS_DIR).glob(f"{stage}.*.log")
    return sum(len(p.read_text().split()) for p in logs)


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def still_alive(processes: list[psutil.Process], wait_s: float, ignore: tuple[str, ...] = ()) -> list[psutil.Process]:
    """The processes of ``processes`` (and their children) still running after ``wait_s`` seconds (those
    named in ``ignore`` left out)."""
    deadline = time.monotonic() + wait_s
    while True:
        family = {p.pid: p for p in processes}
        for p in processes:
            family.update({c.pid: c for c in _children(p)})
        alive = [p for p in family.values() if _running(p) and process_name(p) not in ignore]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def process_name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return ""


def _children(p: psutil.Process) -> list[psutil.Process]:
    try:
        return p.children(recursive=True)
    except psutil.Error:
        return []


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_all(processes: list[psutil.Process]) -> None:
    for p in processes:
        try:
            p.kill()
        except psutil.Error:
            pass


# ------------------------------------------------------------------------ 1. kill a stage actor
@pytest.mark.timeout(420)
def test_drill_1_a_killed_stage_actor_loses_no_row_and_its_rows_are_counted_as_retried(ray_session, dataset, lone,
                                                                                       tmp_path):
    from ray.util.state import list_actors

    n = rows_in(dataset)
    cache, out = tmp_path / "cache", tmp_path / "store"
    cfg = config(tmp_path, cache)
    done: dict = {}

    def run():
        try:
            done["result"] = extract_features(cfg, dataset, out, echo=lambda *_: None, track=False)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the test's thread
            done["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    thread.start()
    # Mid-extraction and mid-batch: the OCR actor has finished some rows (their outputs are in the cache)
    # and has begun a batch it has not finished (its rows are in the run's attempt log, not yet cached).
    def mid_batch() -> bool:
        done = cache_entries(cache, "ocr")
        return 2 <= done <= n - 6 and begun(out, "ocr") > done

    wait_for(mid_batch, 300, "OCR batch under way", thread.is_alive, poll_s=0.02)
    alive = list_actors(address=ray_session.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")],
                        detail=True, raise_on_missing_output=False)  # this session's Ray, not a neighbour's
    # The pool that runs OCR (with features.fuse_cpu_stages, the one that also decodes and encodes images).
    ocr_actors = [a for a in alive
                  if "OcrDescribe" in (a.class_name or "") or "OcrDescribe" in (getattr(a, "repr_name", "") or "")]
    assert len(ocr_actors) == 1, ocr_actors
    ocr_done_at_kill = cache_entries(cache, "ocr")
    os.kill(ocr_actors[0].pid, signal.SIGKILL)
    thread.join(360)
    assert not thread.is_alive(), "the run did not finish after its OCR actor was killed"
    if "error" in done:
        raise done["error"]
    summary = done["result"].summary
    store = load_store(out)
    lost = n - len(store.features) - len(store.errors)
    record_drill("features_kill_stage_actor", rows_in=n, rows_out=len(store.features) + len(store.errors),
                 stored=len(store.features), errors=len(store.errors), rows_lost=lost, rows_retried=summary["retried"],
                 retried_per_stage={s: summary["stages"][s]["retried"] for s in MODEL_STAGES},
                 ocr_rows_done_at_kill=ocr_done_at_kill, killed_actor_pid=ocr_actors[0].pid,
                 wall_s=round(time.monotonic() - started, 1))
    assert lost == 0 and summary["rows"] == n
    assert set(store.features["row_id"]) | set(store.errors["row_id"]) == set(range(n))
    # The batch the actor was running when it died ran again on its restarted actor, and was counted.
    assert summary["retried"] >= 1 and summary["stages"]["ocr"]["retried"] >= 1, summary
    assert summary["retried"] <= n - ocr_done_at_kill
    assert_same_store(out, lone / "store")


# ----------------------------------------------------------------------------- 2. kill the driver
@pytest.mark.timeout(480)
def test_drill_2_a_killed_driver_leaves_no_store_and_the_rerun_computes_only_the_uncached_rows(
        ray_session, dataset, lone, tmp_path):
    n = rows_in(dataset)
    cache, out = tmp_path / "cache", tmp_path / "store"
    cfg = config(tmp_path, cache)
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(features_cli(dataset, out, tmp_path, cache), env=cli_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    family: list[psutil.Process] = []
    try:
        # Mid-run: some rows are through every stage, most are not.
        wait_for(lambda: cache_entries(cache, "text_encoder") >= 2, 360, "row through every stage",
                 lambda: proc.poll() is None, poll_s=0.05)
        family = descendants(proc.pid)  # its local Ray: GCS, raylet, dashboard, agents, workers
        os.kill(proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        proc.wait(30)
        # GCS, raylet and dashboard share the driver's fate (the kernel's parent-death signal), the
        # workers follow the raylet; Ray's two node agents notice the raylet is gone, then spend about a
        # minute trying to tell the dead GCS before they exit: they are waited for after the rerun.
        workers_left = [p.pid for p in still_alive(family, 30, ignore=RAY_AGENTS)]
        assert not workers_left, f"the killed driver's Ray processes outlived it: {workers_left}"
        assert family, "the driver had started no Ray processes"

        complete, per_stage = cached_per_stage(cfg, dataset)  # nothing writes the cache any more
        assert 2 <= complete < n - 1, (complete, per_stage)
        # What the killed run left is not taken for a store.
        shards_at_kill = len(list((out / "features.parquet").glob("part-*.parquet")))  # often none yet
        with pytest.raises(DataError, match="unfinished feature store"):
            load_store(out)
        assert not (out / "summary.json").exists()

        rerun = extract_features(cfg, dataset, out, echo=lambda *_: None, track=False).summary
        ray_left = [p.pid for p in still_alive(family, max(0.0, 150 - (time.monotonic() - killed_at)))]
        gone_within_s = round(time.monotonic() - killed_at, 1)  # an upper bound: checked after the rerun
    finally:
        kill_all(still_alive(family, 0))  # never leave a stray Ray behind, whatever happened
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    assert not ray_left, f"the killed driver's Ray processes outlived it by 150 s: {ray_left}"
    record_drill("features_kill_driver", rows_in=n, rows_out=rerun["stored"] + rerun["errors"], stored=rerun["stored"],
                 errors=rerun["errors"], rows_lost=n - rerun["stored"] - rerun["errors"],
                 rows_complete_at_kill=complete, store_shards_at_kill=shards_at_kill, rows_recomputed=rerun["computed"], rows_from_cache=rerun["from_cache"],
                 cached_per_stage_at_kill=per_stage, rerun_cache_hits={s: rerun["stages"][s]["cache_hits"]
                                                                       for s in MODEL_STAGES},
                 ray_processes_of_killed_driver=len(family), ray_processes_left=len(ray_left),
                 ray_processes_gone_within_s=gone_within_s)
    assert rerun["stored"] + rerun["errors"] == n
    assert rerun["from_cache"] == complete and rerun["computed"] == n - complete  # the failed row is "computed"
    assert {s: rerun["stages"][s]["cache_hits"] for s in MODEL_STAGES} == per_stage
    assert_same_store(out, lone / "store")


# ------------------------------------------------------------------- 5. damaged files, missing files
@pytest.mark.timeout(300)
def test_drill_5a_a_damaged_cache_entry_is_recomputed_and_only_it(ray_session, dataset, lone, tmp_path):
    n = rows_in(dataset)
    cache = tmp_path / "cache"
    shutil.copytree(lone / "cache", cache)
    entry = sorted((cache / "describe").rglob("*.parquet"))[1]
    damaged = shard_keys(entry)
    entry.write_bytes(b"not parquet " * 10)  # garbage where a shard of entries was
    summary = extract_features(config(tmp_path, cache), dataset, tmp_path / "store", echo=lambda *_: None,
                               track=False).summary
    stored = summary["stored"]
    record_drill("features_damaged_cache_entry", rows_in=n, rows_out=stored + summary["errors"], stored=stored,
                 errors=summary["errors"], rows_lost=n - stored - summary["errors"],
                 rows_recomputed=stored - summary["stages"]["describe"]["cache_hits"],
                 rows_computed=summary["computed"],  # with the undecodable row, which every run tries
                 rows_from_cache=summary["from_cache"], damaged_entry=str(entry.relative_to(cache)))
    assert stored + summary["errors"] == n
    hits = {s: summary["stages"][s]["cache_hits"] for s in MODEL_STAGES}
    k = len(damaged)
    assert k >= 1
    assert hits == {**dict.fromkeys(MODEL_STAGES, stored), "describe": stored - k}  # the downstream keys held
    assert summary["from_cache"] == stored - k and summary["computed"] == k + summary["errors"]
    rewritten = [p for p in (cache / "describe").rglob("*.parquet") if p != entry and damaged <= shard_keys(p)]
    assert rewritten  # the damaged shard's entries are written again, in a new shard
    assert_same_store(tmp_path / "store", lone / "store")


@pytest.mark.timeout(240)
def test_drill_5b_a_truncated_store_shard_is_a_one_line_error_naming_it(lone, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(lone / "store", store)
    shard = sorted((store / "features.parquet").glob("part-*.parquet"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(DataError, match=f"damaged feature store: {shard}"):
        load_store(store)
    proc = subprocess.run(cli("train", "--store", str(store), "--set", f"project.work_dir={tmp_path / 'work'}"),
                          env=cli_env(), capture_output=True, text=True, timeout=200)
    lines = proc.stderr.strip().splitlines()
    record_drill("features_truncated_store_shard", store_rows=load_store(lone / "store").meta["rows"], exit_code=proc.returncode, message=lines[-1] if lines else "", shard=shard.name)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and len(lines) == 1 and lines[0].startswith("error: damaged feature store")
    assert str(shard) in lines[0]


@pytest.mark.timeout(240)
def test_drill_5c_a_missing_or_damaged_model_file_is_a_one_line_error_naming_it(tmp_path):
    import torch

    from ase_ray.models.classifier import build_model
    from ase_ray.models.io import WEIGHTS_FILE, load_model, save_model
    from ase_ray.models.projections import FeatureDims
    from ase_ray.models.settings import ModelSettings, PfaSettings
    from ase_ray.testing import fake_feature_store

    classes = ("normal", "scratch", "void")
    fake_feature_store(tmp_path / "store", classes=classes, per_class=6)
    meta = load_store(tmp_path / "store").meta["shapes"]
    settings = ModelSettings(kind="cmaf", d_model=16, heads=4, head_hidden=16)
    dims = FeatureDims(image_dim=meta["image_tokens"][1], image_tokens=meta["image_tokens"][0],
                       text_dim=meta["text_ocr_tokens"][1], text_len=meta["text_ocr_tokens"][0],
                       llm_dim=meta["llm_hidden"][0])
    torch.manual_seed(0)
    model_dir = save_model(build_model(settings, dims, len(classes), PfaSettings(proj_dim=8)), tmp_path / "model",
                           settings, dims, list(classes))
    weights = model_dir / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(DataError, match=f"damaged saved model: {weights} cannot be loaded"):
        load_model(model_dir)
    weights.unlink()  # missing
    proc = subprocess.run(cli("evaluate", "--model", str(model_dir), "--store", str(tmp_path / "store"),
                              "--set", f"project.work_dir={tmp_path / 'work'}"),
                          env=cli_env(), capture_output=True, text=True, timeout=200)
    lines = proc.stderr.strip().splitlines()
    record_drill("features_missing_model_file", exit_code=proc.returncode,
                 message=lines[-1] if lines else "")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and len(lines) == 1
    assert lines[0].startswith("error: incomplete saved model") and str(weights) in lines[0]


# ------------------------------------------------------------------ 6. two runs at once on one cache
@pytest.mark.timeout(600)
def test_drill_6_two_runs_at_once_on_one_cache_write_the_lone_runs_store(dataset, lone, tmp_path):
    n = rows_in(dataset)
    cache = tmp_path / "cache"
    logs = [(tmp_path / f"run{i}.log").open("w") for i in (0, 1)]
    started = time.monotonic()
    procs = [subprocess.Popen(features_cli(dataset, tmp_path / f"store{i}", tmp_path / f"work{i}", cache),
                              env=cli_env(), stdout=logs[i], stderr=subprocess.STDOUT, start_new_session=True)
             for i in (0, 1)]
    family: list[psutil.Process] = []
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() - started < 540:
            family += [c for p in procs for c in descendants(p.pid) if c.pid not in {f.pid for f in family}]
            time.sleep(1)
        codes = [p.poll() for p in procs]
        left = [p.pid for p in still_alive(family, 30)]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        kill_all(still_alive(family, 0))
        for log in logs:
            log.close()
    outputs = [(tmp_path / f"run{i}.log").read_text() for i in (0, 1)]
    assert codes == [0, 0], outputs
    assert not left, f"Ray processes outlived the two runs: {left}"
    stores = [load_store(tmp_path / f"store{i}") for i in (0, 1)]
    record_drill("features_two_runs_one_cache", rows_in=n,
                 rows_out=[len(s.features) + len(s.errors) for s in stores],
                 rows_lost=[n - len(s.features) - len(s.errors) for s in stores],
                 wall_s=round(time.monotonic() - started, 1),
                 **{key: [json.loads((tmp_path / f"store{i}" / "summary.json").read_text())[key] for i in (0, 1)]
                    for key in ("from_cache", "computed", "retried")})
    for i in (0, 1):
        assert_same_store(tmp_path / f"store{i}", lone / "store")
