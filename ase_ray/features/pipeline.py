"""Feature extraction on Ray Data: decode -> OCR -> describe -> image encoder -> LLM -> text encoder -> store.

Everything per row happens in Ray Data workers: they read and decode each image once, run the stages
(each on its own actor pool with the resources of its config section, or the cheap CPU stages together
with ``features.fuse_cpu_stages``), look every output up in the stage cache first and write what they
compute to it, and write the store's Parquet shards (``ase_ray.features.store``). Store and cache are
paths or URIs (``s3://...``). The driver keeps counts, the conservation check and ``store.json``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ase_ray.config import AppConfig
from ase_ray.data.manifest import DatasetInfo, check_some_images_exist, read_dataset_info, read_manifest
from ase_ray.data.metadata import STORE_KEY as METADATA_KEY
from ase_ray.data.metadata import column_kinds, configured_columns, with_metadata_text
from ase_ray.errors import DataError
from ase_ray.features.hub import resolved_models_dir
from ase_ray.features.inmemory import feature_settings
from ase_ray import storage
from ase_ray.features.settings import StageResources
from ase_ray.features.stages import IMAGE_STAGES, group_class, loaded_models, ran_models, retried_rows, stage_plan_of
from ase_ray.features.store import (
    ATTEMPTS_DIR,
    SUMMARY_FILE,
    Store,
    StoreShardWriter,
    clear_store,
    finish_store,
)
from ase_ray.outputs import check_output_location

logger = logging.getLogger(__name__)

STAGE_NAMES = ("decode", "ocr", "describe", "image_encoder", "reason", "text_encoder")


@dataclass
class ExtractionResult:
    store: Store
    out_dir: str  # a path or a URI
    summary: dict[str, Any]


def stage_plan(config: AppConfig) -> list[tuple[type, Any]]:
    return stage_plan_of(config.features)


def cache_root(config: AppConfig) -> str:
    """The stage cache: ``features.cache_dir``, else ``<storage_uri>/cache`` for a URI storage, else
    ``<work_dir>/cache``."""
    return storage.resolved(config.features.cache_dir or _default_location(config, "cache"))


def store_dir(config: AppConfig, out_dir: str | Path | None = None) -> str:
    """The store's folder (a path or a URI): ``out_dir``, else ``features.out_dir``, else
    ``<storage_uri>/features`` for a URI storage, else ``<work_dir>/features``."""
    return storage.resolved(out_dir or config.features.out_dir or _default_location(config, "features"))


def _default_location(config: AppConfig, name: str) -> str:
    base = config.project.storage_uri
    return storage.join(base, name) if base and storage.is_uri(base) else str(Path(config.project.work_dir) / name)


def check_backends_available(config: AppConfig) -> None:
    """Fail at start-up (not per row) when a stage's backend cannot run here, e.g. no tesseract, or a
    hub model that is not in ``features.models_dir``."""
    from ase_ray.features.base import BackendUnavailable
    from ase_ray.features.backends import build_ocr
    from ase_ray.features.hub import missing_models

    build_ocr(config.features.ocr)  # cheap for tesseract: finds the binary or raises BackendUnavailable
    missing = missing_models(config.features)
    if missing:
        names = ", ".join(f"{m.repo_id} at {m.revision} ({m.stage})" for m in missing)
        models_dir = resolved_models_dir(config.features)
        raise BackendUnavailable(f"not in models_dir {models_dir}: {names}; pull them first: "
                                 f"ase-ray models pull --models-dir {models_dir} (with the same config)")


def build_dataset(config: AppConfig, manifest: pd.DataFrame, cache: str, target: str):
    """The lazy Ray Dataset of the whole extraction: decode and the stages (in :func:`stage_groups`),
    then ``features.store_writers`` actors write the store's shards into ``target``
    (:class:`ase_ray.features.store.StoreShardWriter`); the dataset keeps only each row's id, errors,
    seconds and cache hits."""
    import ray

    rows = _with_row_ids(manifest)
    groups = stage_groups(config)
    if len(groups) == 1:  # one pool: each input block is one of its batches, the last round split evenly
        pool = groups[0][2]
        ds = ray.data.from_blocks(input_blocks(rows, block_sizes(len(rows), pool.batch_size, pool.actors)))
        batch_sizes = [None]
    else:
        smallest_batch = min(s.resources.batch_size for _, s in stage_plan(config))
        ds = ray.data.from_blocks(input_blocks(rows, block_sizes(len(rows), smallest_batch)))
        batch_sizes = [resources.batch_size for _, _, resources in groups]
    models_dir = resolved_models_dir(config.features)
    attempts = storage.join(target, ATTEMPTS_DIR)  # the summary's `retried` and models loaded
    for (stages, decode, resources), batch_size in zip(groups, batch_sizes):
        ds = ds.map_batches(group_class(stages, decode), batch_format="pandas",
                            fn_constructor_args=(stages, cache, models_dir),
                            fn_constructor_kwargs={"attempts_dir": attempts, "decode": decode},
                            **_actor_args(resources, batch_size))
    return ds.map_batches(StoreShardWriter, fn_constructor_args=(target,), batch_format="pandas",
                          batch_size=config.features.shard_rows, num_cpus=0.1,
                          compute=ray.data.ActorPoolStrategy(size=config.features.store_writers))


def block_sizes(rows: int, size: int, actors: int = 1) -> list[int]:
    """Input blocks of ``size`` rows, except the rows of the last round (fewer than ``actors`` x ``size``),
    which are split evenly over the actors: with whole blocks the last one runs on one actor while the
    others idle (a batch of 8 is 4 s of a core on the embedded default)."""
    full_rounds = rows - rows % (size * actors)
    sizes = [size] * (full_rounds // size)
    last = rows - full_rounds
    if last:
        parts = min(actors, last)
        sizes += [last // parts + (1 if i < last % parts else 0) for i in range(parts)]
    return sizes or [0]


def input_blocks(rows: pd.DataFrame, sizes: list[int]) -> list:
    """The manifest as Arrow tables of ``sizes`` rows, all with the whole manifest's schema (a column empty in
    one block must not change type there: the store's shards would disagree). Built here, since
    ``ray.data.from_pandas`` converts them in a task and waits for its worker to start (1.5 s)."""
    import pyarrow as pa

    schema = pa.Schema.from_pandas(rows, preserve_index=False)
    starts = np.cumsum([0, *sizes[:-1]])
    return [pa.Table.from_pandas(rows.iloc[start:start + size], schema=schema, preserve_index=False)
            for start, size in zip(starts, sizes)]


def stage_groups(config: AppConfig) -> list[tuple[list[tuple[type, Any]], bool, StageResources]]:
    """The pipeline's actor pools, in order: (stages, decodes first, resources).

    - ``features.fuse_all_stages`` (a small machine's default): one pool; each actor decodes and runs
      every stage, with the LLM's pool size and batch size, so no batch waits for another pool.
    - else ``features.fuse_cpu_stages``: two pools, one decodes and runs OCR, the describer and the
      image encoder (the OCR's batch size), the other runs the LLM and the text encoder (the LLM's
      batch size and pool size); each pool's CPUs are its stages' added up.
    - else: decode alone (its ``features.decode`` resources), then every stage alone (a cluster).

    Fewer processes share a small machine's cores better: each imports torch and holds its models once."""
    plan = stage_plan(config)
    decode = config.features.decode
    if config.features.fuse_all_stages:
        return [(plan, True, _one_pool_resources(plan, decode.num_cpus, config.features.reason.resources))]
    if not config.features.fuse_cpu_stages:
        return [([], True, decode), *[([(cls, s)], False, s.resources) for cls, s in plan]]
    images = [(cls, s) for cls, s in plan if cls.name in IMAGE_STAGES]
    texts = [(cls, s) for cls, s in plan if cls.name not in IMAGE_STAGES]
    return [(images, True, _fused_resources(images, decode.num_cpus)), (texts, False, _fused_resources(texts))]


def _one_pool_resources(stages: list[tuple[type, Any]], decode_cpus: float, llm: StageResources) -> StageResources:
    """The LLM's pool size and batch size; CPUs and GPUs the most any one step asks for, since an actor
    runs its steps one after another."""
    return llm.model_copy(update={"num_cpus": max(decode_cpus, *(s.resources.num_cpus for _, s in stages)),
                                  "num_gpus": max(s.resources.num_gpus for _, s in stages)})


def _fused_resources(stages: list[tuple[type, Any]], extra_cpus: float = 0.0) -> StageResources:
    """The first stage's resources, with every stage's CPUs added up and the largest pool of them."""
    first = stages[0][1].resources
    return first.model_copy(update={"num_cpus": round(extra_cpus + sum(s.resources.num_cpus for _, s in stages), 3),
                                    "num_gpus": max(s.resources.num_gpus for _, s in stages),
                                    "actors": max(s.resources.actors for _, s in stages)})


def _with_row_ids(manifest: pd.DataFrame) -> pd.DataFrame:
    rows = manifest.reset_index(drop=True).copy()
    rows.insert(0, "row_id", np.arange(len(rows), dtype=np.int64))
    return rows.astype({c: str for c in rows.columns if rows[c].dtype == object})


def _actor_args(res: StageResources, batch_size: int | None) -> dict[str, Any]:
    """A stage's actor pool. An actor that dies (killed, OOM, its node lost) is restarted and the
    batches it held are run again on an actor of the pool: Ray Data's defaults for actor pools
    (unbounded ``max_restarts``/``max_task_retries``), which extraction relies on to lose no row (the
    fault drill kills one); the cache keeps what the dead actor finished, and the summary's ``retried``
    counts the rows run again."""
    import ray

    return {
        "compute": ray.data.ActorPoolStrategy(min_size=min(res.min_actors or res.actors, res.actors),
                                              max_size=res.actors),
        "batch_size": batch_size,  # None: a block is a batch
        "num_cpus": res.num_cpus,
        "num_gpus": res.num_gpus,
    }


def extract_features(
    config: AppConfig, manifest_path: str | Path, out_dir: str | Path | None = None, echo=print,
    track: bool = True,
) -> ExtractionResult:
    """Run the pipeline over a manifest and write the store (a path or a URI); log an MLflow run when
    ``track``. Every row is looked up in the cache by the workers: a run served wholly from it loads no
    model (the summary's ``models_loaded``)."""
    from ase_ray.ray_env import ensure_ray

    manifest = read_manifest(manifest_path)
    check_some_images_exist(manifest, Path(manifest_path))  # before any backend, cache or Ray
    cache, target = cache_root(config), store_dir(config, out_dir)
    check_output_location(target, "feature store folder")
    info = read_dataset_info(manifest_path)
    manifest, metadata = with_metadata(config, manifest, info)
    config = apply_layout_hints(config, info)
    check_backends_available(config)
    started = time.perf_counter()
    ensure_ray(config.ray)
    clear_store(target)
    rows = build_dataset(config, manifest, cache, target).to_pandas()
    attempts = storage.join(target, ATTEMPTS_DIR)
    retried, loaded = retried_rows(attempts), loaded_models(attempts)
    storage.remove(attempts)
    wall = time.perf_counter() - started
    if len(rows) != len(manifest):
        raise DataError(f"pipeline returned {len(rows)} rows for {len(manifest)} inputs")
    meta = {
        "manifest": str(Path(manifest_path).resolve()),
        "backends": backend_description(config),
        "features": feature_settings(config.features),  # what serving must extract for a model
        "cache_dir": cache,
        METADATA_KEY: metadata.to_json(),
    }
    store = finish_store(target, rows, meta)
    summary = summarise(rows, wall, store, retried, loaded)
    storage.write_text(storage.join(target, SUMMARY_FILE), json.dumps(summary, indent=2))
    echo(format_summary(summary))
    if summary["constant_sources"]:
        logger.warning("text sources %s do not vary across the %d stored rows (absent: %s); training leaves "
                       "them out", summary["constant_sources"], summary["stored"], summary["absent_sources"] or "none")
    if track:
        log_extraction_run(config, store, summary, target)
    if summary["stored"] == 0:
        first = store.errors.iloc[0] if len(store.errors) else None
        raise DataError(f"every one of the {summary['rows']} images failed extraction"
                        + (f" (the first, {first['image_path']}: {first['stage']}: {str(first['message'])[:200]})"
                           if first is not None else "")
                        + f"; the errors table is {storage.join(target, 'errors.parquet')}")
    return ExtractionResult(store=store, out_dir=target, summary=summary)


def with_metadata(config: AppConfig, manifest: pd.DataFrame, info: DatasetInfo | None):
    """(the manifest with its ``metadata_text`` column, its metadata columns by kind): the columns of
    ``data.metadata_columns`` (or dataset.yaml's), see ``ase_ray.data.metadata``."""
    metadata = column_kinds(manifest, configured_columns(config.data.metadata_columns, info))
    return with_metadata_text(manifest, metadata), metadata


def apply_layout_hints(config: AppConfig, info: DatasetInfo | None) -> AppConfig:
    """Use the dataset's ``text_region`` (dataset.yaml) for the OCR crop and to keep the describer off
    the text band, and its ``domain`` (what the images are) in the LLM's system prompt, unless the config
    sets them. The hints are layout and domain, never label information."""
    config = apply_domain_hint(config, info)
    region = info.extra.get("text_region") if info is not None else None
    if region is None:
        return config
    f = config.features
    ocr = f.ocr if f.ocr.text_region is not None else f.ocr.model_copy(update={"text_region": tuple(region)})
    describe = (f.describe if f.describe.ignore_region is not None
                else f.describe.model_copy(update={"ignore_region": tuple(region)}))
    return config.model_copy(update={"features": f.model_copy(update={"ocr": ocr, "describe": describe})})


def apply_domain_hint(config: AppConfig, info: DatasetInfo | None) -> AppConfig:
    """``features.reason.domain`` from dataset.yaml's ``domain`` when the config leaves it None."""
    domain = info.extra.get("domain") if info is not None else None
    f = config.features
    if not domain or f.reason.domain is not None:
        return config
    reason = f.reason.model_copy(update={"domain": str(domain)})
    return config.model_copy(update={"features": f.model_copy(update={"reason": reason})})


def backend_description(config: AppConfig) -> dict[str, Any]:
    """Per stage: the backend and the model that runs (``ase_ray.features.model_info``), never the
    ``model_id`` of a backend that does not read it."""
    return ran_models(config.features)


def summarise(rows: pd.DataFrame, wall_s: float, store: Store, retried: dict[str, int] | None = None,
              loaded: dict[str, int] | None = None) -> dict[str, Any]:
    """Rows, errors, seconds and images/s per stage; the conservation check. What the run did per row:
    ``from_cache``, rows every model stage served from the cache (nothing ran for them but decoding);
    ``computed``, the others (at least one stage ran its model, or the row failed); ``retried``, rows a
    model stage began more than once, i.e. Ray ran their batch again after its actor died (the
    :class:`ase_ray.features.stages.AttemptLog` of the run; per stage in ``stages.<name>.retried``);
    ``models_loaded``, per model stage, how many actors loaded its model (0: all served from the cache)."""
    retried = retried or {}
    model_hits = [f"hit_{name}" for name in STAGE_NAMES[1:]]
    cached = rows[model_hits].astype(bool).all(axis=1) if set(model_hits) <= set(rows.columns) else pd.Series(False, index=rows.index)
    if "error_stage" in rows:
        cached &= rows["error_stage"].astype(str) == ""
    stages = {}
    for name in STAGE_NAMES:
        seconds = float(rows[f"t_{name}"].sum()) if f"t_{name}" in rows else 0.0
        hits = int(rows[f"hit_{name}"].sum()) if f"hit_{name}" in rows else 0
        errors = int((rows["error_stage"] == name).sum())
        stages[name] = {
            "seconds": round(seconds, 3),
            "images_per_s": round(len(rows) / seconds, 2) if seconds > 0 else None,
            "cache_hits": hits,
            "errors": errors,
            "retried": int(retried.get(name, 0)),
        }
    stored, failed = store.meta["rows"], store.meta["errors"]
    if stored + failed != len(rows):
        raise DataError(f"lost rows: {len(rows)} in, {stored} stored + {failed} errors")
    return {
        "rows": len(rows),
        "stored": stored,
        "errors": failed,
        "from_cache": int(cached.sum()),
        "computed": int(len(rows) - cached.sum()),
        "retried": int(retried.get("rows", 0)),
        "models_loaded": {name: int((loaded or {}).get(name, 0)) for name in STAGE_NAMES[1:]},
        "wall_s": round(wall_s, 2),
        "images_per_s": round(len(rows) / wall_s, 2) if wall_s > 0 else None,
        "stages": stages,
        "text_sources": store.meta.get("text_stats", {}),
        "constant_sources": store.meta.get("constant_sources", []),
        "absent_sources": store.meta.get("absent_sources", []),
        METADATA_KEY: store.meta.get(METADATA_KEY, {"text": [], "numeric": []}),
    }


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"features: {summary['rows']} rows in -> {summary['stored']} stored + {summary['errors']} errors "
        f"(checked), {summary['wall_s']} s, {summary['images_per_s']} images/s",
        f"rows: {summary['from_cache']} from the cache, {summary['computed']} computed, "
        f"{summary['retried']} retried (run again after a worker died); models loaded: "
        + (", ".join(f"{k} {v}" for k, v in summary.get("models_loaded", {}).items() if v) or "none"),
        f"{'stage':<14}{'seconds':>10}{'images/s':>10}{'cache hits':>12}{'errors':>8}",
    ]
    for name, s in summary["stages"].items():
        rate = "-" if s["images_per_s"] is None else f"{s['images_per_s']:.2f}"
        lines.append(f"{name:<14}{s['seconds']:>10.2f}{rate:>10}{s['cache_hits']:>12}{s['errors']:>8}")
    lines.append(f"{'text source':<14}{'spread':>10}{'distinct':>10}{'tokens cut':>12}  flag")
    for src, t in summary.get("text_sources", {}).items():
        flag = "absent" if t["absent"] else "CONSTANT" if t["constant"] else ""
        spread = "-" if t["pooled_std"] is None else f"{t['pooled_std']:.4f}"
        lines.append(f"{src:<14}{spread:>10}{_dash(t['distinct_texts']):>10}{_dash(t['tokens_cut']):>12}  {flag}")
    metadata = summary.get(METADATA_KEY) or {}
    lines.append(f"metadata columns: text {metadata.get('text') or 'none'}, numeric {metadata.get('numeric') or 'none'}")
    return "\n".join(lines)


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)


def text_source_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics of each text source's spread, distinct texts and cut tokens."""
    metrics = {}
    for src, t in summary.get("text_sources", {}).items():
        for key, name in (("pooled_std", "pooled_std"), ("distinct_texts", "distinct_texts"), ("tokens_cut", "tokens_cut")):
            if t.get(key) is not None:
                metrics[f"text_{src}_{name}"] = float(t[key])
    return metrics


def log_extraction_run(config: AppConfig, store: Store, summary: dict[str, Any], target: Path) -> str:
    from ase_ray.tracking import config_params, ran_model_params, setup_mlflow

    mlflow = setup_mlflow(config)
    with mlflow.start_run(run_name="features") as run:
        mlflow.set_tag("ase_ray.stage", "features")
        mlflow.log_params(config_params(config, ("features",)))
        models = store.meta["backends"]
        mlflow.log_params(ran_model_params(models))
        mlflow.set_tags({f"ase_ray.model.{stage}": info["model"] for stage, info in models.items()})
        mlflow.log_param("store_dir", str(target))
        metrics = {k: summary[k] for k in ("rows", "stored", "errors", "from_cache", "computed", "retried", "wall_s",
                                           "images_per_s") if summary[k] is not None}
        for name, s in summary["stages"].items():
            if s["images_per_s"] is not None:
                metrics[f"{name}_images_per_s"] = s["images_per_s"]
            metrics[f"{name}_cache_hits"] = s["cache_hits"]
        mlflow.log_metrics({**metrics, **text_source_metrics(summary)})
        mlflow.set_tags({"ase_ray.constant_sources": ",".join(summary["constant_sources"]) or "none",
                         "ase_ray.absent_sources": ",".join(summary["absent_sources"]) or "none"})
        sample = store.features.head(config.features.sample_texts)
        texts = sample[[c for c in ("image_path", "ocr_text", "ocr_fields", "description", "reasoning",
                                    "metadata_text") if c in sample.columns]].to_dict("records")
        mlflow.log_dict({"samples": texts}, "sample_texts.json")
        mlflow.log_dict(store.meta, "store.json")
        mlflow.log_dict(summary, "summary.json")
        if len(store.errors):
            mlflow.log_dict({"errors": store.errors.to_dict("records")}, "errors.json")
        return run.info.run_id
