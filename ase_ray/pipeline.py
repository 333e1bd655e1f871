"""The embedded-default workflow behind ``ase-ray pipeline``: each stage reads what the last wrote."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import pandas as pd

from ase_ray.config import AppConfig, dump_config
from ase_ray.data.manifest import (
    LABEL,
    SPLIT,
    metadata_columns,
    read_dataset_info,
    read_manifest,
    write_dataset_info,
    write_manifest,
)
from ase_ray.data.metadata import is_missing
from ase_ray.data.splits import assign_splits, split_summary
from ase_ray.data.validate import validate_manifest
from ase_ray.errors import DataError


def run_pipeline(config: AppConfig, echo=print) -> dict:
    """Run the configured stages and write ``<work_dir>/pipeline_report.json``."""
    work_dir = Path(config.project.work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "config.yaml").write_text(dump_config(config))
    stages = config.pipeline.stages
    report: dict = {"work_dir": str(work_dir), "stages": {}}

    started = time.perf_counter()
    source_manifest = prepare_source(config, work_dir / "data", echo)
    report["stages"]["source"] = _timed(started, manifest=str(source_manifest))

    started = time.perf_counter()
    split_manifest = split_dataset(config, source_manifest, work_dir / "data" / "split", echo)
    report["stages"]["split"] = _timed(started, manifest=str(split_manifest))

    started = time.perf_counter()
    train_manifest, tda = augment_dataset(config, split_manifest, work_dir / "data" / "augmented", echo)
    report["stages"]["tda"] = _timed(started, manifest=str(train_manifest), **tda)

    df = read_manifest(train_manifest)
    report["dataset"] = {
        "manifest": str(train_manifest),
        "rows": len(df),
        "counts": {split: _counts(df[df[SPLIT] == split]) for split in ("train", "val", "test")},
    }
    echo(_summary_text(df))

    if "features" in stages:
        from ase_ray.features.pipeline import extract_features

        started = time.perf_counter()
        echo(f"features: extracting {len(df)} images on Ray Data ...")
        extraction = extract_features(config, train_manifest, echo=_brief(echo))
        report["stages"]["features"] = _timed(started, store=str(extraction.out_dir), **extraction.summary)

    if "train" in stages:
        from ase_ray.train.fit import fit

        started = time.perf_counter()
        echo(f"train: {config.train.task} {config.train.model.kind} on Ray Train "
             f"({config.train.num_workers} worker(s), {config.train.strategy}) ...")
        trained = fit(config, echo=echo)
        report["stages"]["train"] = _timed(
            started, run_id=trained.run_id, train_run=trained.train_run, model_dir=str(trained.model_dir),
            best_epoch=trained.best["epoch"], val_macro_f1=trained.metrics["val"]["macro_f1"], test_macro_f1=trained.metrics["test"]["macro_f1"],
        )
        if config.pipeline.register_train and trained.run_id:
            from ase_ray.registry import register_run

            registration = register_run(config, trained.run_id, echo=echo)
            report["stages"]["train"]["registered"] = _registered(registration)

    if "tune" in stages:
        from ase_ray.tune.search import pipeline_space, run_search

        started = time.perf_counter()
        space = config.pipeline.tune_space
        searched = run_search(config, space, echo=_brief(echo), space_data=None if space else pipeline_space())
        report["stages"]["tune"] = _timed(
            started, search=searched.name, parent_run_id=searched.parent_run_id, table=str(searched.table_path),
            best_trial=searched.best.trial, best_run_id=searched.best.run_id, best_params=searched.best.params,
            best_metric={searched.metric: searched.best.metric},
            registered=_registered(searched.registration) if searched.registration else None,
        )

    if {"train", "tune"} & set(stages):
        from ase_ray.registry import champion_version

        champion = champion_version(config)
        if champion is not None:
            report["champion"] = {"name": champion.name, "version": str(champion.version), "run_id": champion.run_id,
                                  "uri": f"models:/{champion.name}@{config.registry.champion_alias}"}

    if "serve" in stages:
        started = time.perf_counter()
        echo("serve: deploying the champion on Ray Serve for one HTTP prediction ...")
        image_path, record = _one_test_image(df)
        served = serve_one_prediction(config, image_path, echo, record)
        report["stages"]["serve"] = _timed(started, **served)

    report_path = work_dir / "pipeline_report.json"
    report["report_path"] = str(report_path)
    report_path.write_text(json.dumps(report, indent=2))
    echo(_closing_text(config, report))
    return report


def serve_one_prediction(config: AppConfig, image_path: str, echo=print, metadata: dict | None = None) -> dict:
    """Start Serve with the champion, answer one real HTTP prediction on ``image_path`` (with its
    records beside it, ``metadata``), stop it."""
    import mimetypes

    import httpx
    from ray import serve

    from ase_ray.ray_env import ensure_ray
    from ase_ray.serve.deploy import deploy

    ensure_ray(config.ray)
    release_leftover_placement_groups(echo)
    url = deploy(config)
    try:
        with open(image_path, "rb") as image:
            mime = mimetypes.guess_type(image_path)[0] or "application/octet-stream"
            response = httpx.post(f"{url}/predict", files={"file": (Path(image_path).name, image, mime)},
                                  data={"metadata": json.dumps(metadata or {})},
                                  headers=_api_key_header(config), timeout=300)
    finally:
        serve.delete(config.serve.app_name)
    if response.status_code != 200:
        raise DataError(f"Serve answered {response.status_code} on {url}/predict: {response.text[:500]}")
    body = response.json()
    model = body["model"]
    echo(f"serve: {url}/predict -> {body['label']} (confidence {body['confidence']:.2f}, model {model['name']} "
         f"version {model['version']}, {body['latency_ms']:.0f} ms); stopped")
    return {"url": url, "image": image_path, "prediction": {
        "label": body["label"], "confidence": body["confidence"], "needs_review": body["needs_review"],
        "model_name": model["name"], "model_version": model["version"], "latency_ms": body["latency_ms"]}}


def release_leftover_placement_groups(echo=print, wait_s: float = 60.0) -> list[str]:
    """Remove the placement groups this job still holds once training and tuning are over.

    A Ray Train run whose controller actor is still referenced, or a Tune trial that ASHA stopped
    early (ray-project/ray#54305), can leave its worker group's placement group reserved; on a small
    machine that keeps Serve's replicas from being scheduled. Ray Train's own cleaner gets ``wait_s`` to release them first. Returns the ids removed."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    job = ray.get_runtime_context().get_job_id()

    def held() -> list[str]:
        return [pg for pg, info in placement_group_table().items() if info["state"] == "CREATED" and pg.endswith(job)]

    deadline = time.monotonic() + wait_s
    while held() and time.monotonic() < deadline:
        time.sleep(2)
    left = held()
    for pg in left:
        remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg))))
    if left:
        echo(f"serve: removed {len(left)} placement group(s) left reserved by finished training runs")
    return left


def _brief(echo):
    """On a quiet console a stage's result table shows as its first and last lines: the full tables are
    in pipeline_report.json (features), the search's trials.md (named at the end), and with --verbose."""
    from ase_ray.console import is_quiet

    if not is_quiet():
        return echo

    def brief(text="", *args, **kwargs):
        lines = [line for line in str(text).splitlines() if line.strip()]
        echo("\n".join(lines if len(lines) <= 2 else [lines[0], lines[-1]]), *args, **kwargs)

    return brief


def _api_key_header(config: AppConfig) -> dict[str, str]:
    import os

    key = os.environ.get(config.serve.api_key_env or "", "")
    return {"X-API-Key": key} if key else {}


def _one_test_image(df: pd.DataFrame) -> tuple[str, dict]:
    """A test image and its metadata record (every metadata column of its manifest row; empty: null)."""
    test = df[df[SPLIT] == "test"]
    row = (test if len(test) else df).iloc[0]
    record = {c: (None if is_missing(row[c]) else row[c].item() if hasattr(row[c], "item") else row[c])
              for c in metadata_columns(df)}
    return str(row["image_path"]), record


def _registered(registration) -> dict:
    return {"name": registration.name, "version": registration.version, "alias": registration.alias,
            "reason": registration.reason}


def _closing_text(config: AppConfig, report: dict) -> str:
    from ase_ray.tracking import tracking_uri

    lines = [f"report: {report['report_path']}"]
    if "features" in report["stages"]:
        lines.append(f"feature store: {report['stages']['features']['store']}")
    if "train" in report["stages"]:
        t = report["stages"]["train"]
        lines.append(f"model: {t['model_dir']} (val macro-F1 {t['val_macro_f1']:.4f}, test {t['test_macro_f1']:.4f})")
    if "tune" in report["stages"]:
        t = report["stages"]["tune"]
        lines.append(f"search {t['search']}: best {t['best_trial']} {t['best_params']} {t['best_metric']}, "
                     f"table {t['table']}")
    if "champion" in report:
        c = report["champion"]
        lines.append(f"champion: {c['uri']} (version {c['version']}, run {c['run_id']})")
    if "serve" in report["stages"]:
        p = report["stages"]["serve"]["prediction"]
        lines.append(f"served one prediction: {p['label']} ({p['latency_ms']:.0f} ms); `ase-ray serve` starts it again")
    if {"features", "train", "tune"} & set(report["stages"]):
        uri = tracking_uri(config)
        lines.append(f"MLflow runs: {uri}  (UI: mlflow ui --backend-store-uri {uri} --host 127.0.0.1)")
    return "\n".join(lines)


def prepare_source(config: AppConfig, data_dir: Path, echo=print) -> Path:
    """Make or import the configured dataset; validate it; return its manifest path."""
    source = config.data.source
    if source == "synthetic":
        manifest = _synthetic(config, data_dir / "synthetic", echo)
    elif source == "magnetic-tile":
        from ase_ray.data.magnetic_tile import import_magnetic_tile

        out = data_dir / "magnetic_tile"
        import_magnetic_tile(config.data.magnetic_tile_root, out, config.data.magnetic_tile_max_gap)
        manifest = out / "manifest.csv"
    else:
        if config.data.manifest is None:
            raise DataError("data.source is 'manifest' but data.manifest is not set")
        manifest = Path(config.data.manifest)
    check_manifest(manifest)
    return manifest


def check_manifest(manifest: Path) -> None:
    """Raise with every problem named when the manifest is not clean."""
    info = read_dataset_info(manifest)
    problems = validate_manifest(read_manifest(manifest), info.classes if info else None)
    if problems:
        listing = "; ".join(str(p) for p in problems[:20])
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise DataError(f"{manifest} has {len(problems)} problem(s): {listing}{more}")


def _synthetic(config: AppConfig, out: Path, echo) -> Path:
    """Generate the synthetic set, or reuse it when the same settings made it before."""
    from ase_ray.data.synthetic import generate_synthetic

    synth = config.data.synth
    digest = hashlib.sha256(synth.model_dump_json().encode()).hexdigest()[:16]
    stamp = out / ".synth_config_hash"
    manifest = out / "manifest.csv"
    if manifest.is_file() and stamp.is_file() and stamp.read_text() == digest:
        echo(f"reusing synthetic dataset in {out}")
        return manifest
    if out.exists():
        shutil.rmtree(out)
    echo(f"generating synthetic dataset in {out}")
    generate_synthetic(synth, out, progress=True)
    stamp.write_text(digest)
    return manifest


def split_dataset(config: AppConfig, manifest: Path, out_dir: Path, echo=print) -> Path:
    s = config.data.split
    df = assign_splits(read_manifest(manifest), s.val_fraction, s.test_fraction, config.project.seed, s.label_column)
    target = write_manifest(df, out_dir / "manifest.csv")
    info = read_dataset_info(manifest)
    if info is not None:
        write_dataset_info(out_dir, info)
    echo(f"split {len(df)} rows -> {target}")
    return target


def augment_dataset(config: AppConfig, manifest: Path, out_dir: Path, echo=print) -> tuple[Path, dict]:
    """TDA on the train split; returns the manifest to train on and what TDA did."""
    if not config.data.tda.enabled:
        return manifest, {"enabled": False}
    from ase_ray.data.tda import augment_manifest

    info = read_dataset_info(manifest)
    result = augment_manifest(read_manifest(manifest), out_dir, config.data.tda, info.classes if info else None)
    if info is not None:
        write_dataset_info(out_dir, info)
    for cls, why in result.skipped.items():
        echo(f"TDA skipped for class {cls}: {why}")
    echo(f"TDA added {sum(result.added.values())} training images -> {out_dir / 'manifest.csv'}")
    return out_dir / "manifest.csv", {"enabled": True, "added": result.added, "skipped": result.skipped}


def _timed(started: float, **fields) -> dict:
    return {"seconds": round(time.perf_counter() - started, 2), **fields}


def _counts(df: pd.DataFrame) -> dict[str, int]:
    return {str(k): int(v) for k, v in df[LABEL].value_counts().sort_index().items()}


def _summary_text(df: pd.DataFrame) -> str:
    table = split_summary(df)
    return "dataset (rows per class and split, TDA images included in train):\n" + table.to_string()
