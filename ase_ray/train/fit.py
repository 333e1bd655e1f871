"""``fit``: train on Ray Train (DDP or DeepSpeed), then evaluate and log everything to one MLflow run."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ase_ray.config import AppConfig
from ase_ray.errors import DataError
from ase_ray.tracking import VAL_FINGERPRINT_TAG
from ase_ray.train.data import (
    LABEL_KEY,
    ROW_KEY,
    STEM,
    Arrays,
    constant_text_sources,
    defect_targets,
    fit_numeric,
    image_tail_spec,
    iter_rows,
    load_task_rows,
    model_columns,
    model_input_record,
    read_row_arrays,
    split_fingerprint,
    split_source,
    store_metadata,
    task_normal_class,
    usable_text_sources,
    with_numeric,
    without_stem,
)
from ase_ray.models.defect_maps import DEFECT_TARGET
from ase_ray.train.loop import MODEL_DIR, train_loop_per_worker
from ase_ray.train.metrics import (
    classification_metrics,
    confusion_figure,
    flat_metrics,
    report_text,
)

logger = logging.getLogger(__name__)


@dataclass
class FitResult:
    run_id: str | None
    model_dir: Path | str  # a URI when project.storage_uri is one
    metrics: dict[str, Any]  # {"val": {...}, "test": {...}}
    classes: list[str]
    results_path: Path | str
    train_run: str = ""  # Ray Train's run name (resume it with `ase-ray train --resume <name>`)
    best: dict[str, Any] | None = None  # the exported epoch and the rule that chose it


def store_dir(config: AppConfig) -> str:
    """The store training reads (a path or a URI): ``train.store_dir``, else where ``ase-ray features``
    writes by default (``ase_ray.features.pipeline.store_dir``)."""
    from ase_ray import storage
    from ase_ray.features.pipeline import store_dir as features_store_dir

    return storage.resolved(config.train.store_dir) if config.train.store_dir else features_store_dir(config)


def store_meta(config: AppConfig) -> dict[str, Any]:
    """``store.json`` of the store training reads ({} when there is none)."""
    from ase_ray.train.data import store_meta_if_any

    return store_meta_if_any(store_dir(config))


def storage_path(config: AppConfig) -> str:
    """Ray Train's storage: ``train.storage_path``, else ``<storage_uri or work_dir>/ray_results``
    (a path or a URI)."""
    from ase_ray.storage import is_uri, storage_location

    explicit = config.train.storage_path
    if explicit:
        return explicit if is_uri(explicit) else str(Path(explicit).resolve())
    return storage_location(config, "ray_results")


def fit(config: AppConfig, echo=print, track: bool = True, tags: dict[str, str] | None = None,
        parent_run_id: str | None = None, callbacks: list | None = None, resume: bool | str = False,
        run_name: str | None = None) -> FitResult:
    """Train ``config.train`` on the feature store; returns the best epoch's model folder and its val/test
    metrics. Every call is a new run (its own Ray Train run and MLflow run) unless ``resume`` names one
    (True: the latest) to continue, see :mod:`ase_ray.train.runs`.

    ``run_name``: a fixed Ray Train run name (a Tune trial), continued when it exists. ``callbacks``: Ray
    Train ``UserCallback``s for the trainer (a Tune trial passes one so that every epoch reaches the
    scheduler).

    This process never loads the store's arrays: it reads the small columns (splits, labels, numeric
    block, fingerprint); the workers stream their shares (:func:`ase_ray.train.data.split_source`,
    :func:`~ase_ray.train.data.take_share`); validation and test rows stream through here afterwards
    and only their logits are kept (:func:`held_out_scores`)."""
    from ase_ray.ray_env import ensure_ray
    from ase_ray.train.runs import check_same_data, plan_run, write_record

    plan = plan_run(config, storage_path(config), resume, run_name)
    config = plan.config
    cfg = config.train
    # The driver reads the store's small columns only; the arrays stream to the workers (split_source, take_share).
    splits, classes = load_task_rows(store_dir(config), cfg.task, cfg.use_augmented)
    shapes = store_meta(config)["shapes"]
    splits, corrections = with_review_corrections(config, splits, classes, stored_columns(shapes, True))
    config, dropped = without_constant_sources(config, splits["train"])
    config, splits = with_image_tail(config, splits)
    cfg = config.train
    splits, inputs = with_numeric_block(config, splits)
    splits = with_defect_targets(config, splits, classes)
    if len(splits["train"]) < cfg.num_workers:
        raise DataError(f"{len(splits['train'])} training rows cannot feed {cfg.num_workers} workers")
    data = {"store_dir": store_dir(config), "classes": classes,
            "train_rows": len(splits["train"]), "val_fingerprint": split_fingerprint(splits["val"], classes)}
    check_same_data(plan, data)
    if plan.resuming:
        echo(f"resuming run {plan.name} (its latest checkpoint)")
    ensure_ray(config.ray)
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer
    run_tags = {**(tags or {}), VAL_FINGERPRINT_TAG: data["val_fingerprint"],
                "ase_ray.val_rows": str(len(splits["val"])), "ase_ray.train_run": plan.name,
                "ase_ray.dropped_text_sources": ",".join(dropped) or "none",
                "ase_ray.corrections": (f"{corrections['relabelled']} relabelled, {corrections['added']} added, "
                                        f"{len(corrections['skipped'])} skipped") if corrections else "off",
                "ase_ray.numeric_fields": ",".join(f["name"] for f in inputs["numeric"]["fields"]) or "none",
                "ase_ray.metadata_columns": ",".join([*inputs["metadata_columns"]["text"],
                                                      *inputs["metadata_columns"]["numeric"]]) or "none"}
    columns = stored_columns(shapes, reads_stem(cfg))
    run_id = _open_run(config, plan, run_tags, parent_run_id) if track else None
    write_record(plan, run_id, data)
    from ase_ray.tracking import tracking_uri

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": cfg.model_dump(mode="json"),
            "classes": classes,
            "threads": max(1, int(cfg.cpus_per_worker)),
            "tracking_uri": tracking_uri(config) if track else None,
            "run_id": run_id,
            "inputs": inputs,
            # Which rows each split holds (ids, labels, numeric block; a correction's new image's arrays):
            # small. Every worker reads its own share of the arrays from the store (take_share).
            "sources": {name: split_source(store_dir(config), columns, splits[name], shapes)
                        for name in ("train", "val")},
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=plan.name,
            storage_path=storage_path(config),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoints_to_keep),
            callbacks=list(callbacks or []),
        ),
        # No Ray Dataset: each worker reads its share straight from the store's Parquet shards (no
        # Ray Data task to schedule beside the workers; a row's rank depends on the row alone).
    )
    try:
        result = _fit_and_release(trainer)
    except Exception:
        if run_id:
            _end_run(config, run_id, "FAILED")
        raise
    if result.checkpoint is None:
        raise DataError("training finished without a checkpoint")
    # On object storage the model is built in a temporary folder and kept at <storage_uri>/models/<run>
    # (and in MLflow's artifacts); otherwise in <work_dir>/models/<run>.
    remote = _remote_storage(config)
    model_dir = (Path(tempfile.mkdtemp(prefix="ase-ray-model-")) / "model" if remote
                 else Path(config.project.work_dir).resolve() / "models" / (run_id or plan.name))
    with result.checkpoint.as_directory() as ckpt:
        if model_dir.exists():
            shutil.rmtree(model_dir)
        shutil.copytree(Path(ckpt) / MODEL_DIR, model_dir)
        best = _best_record(Path(ckpt), len(splits["val"]))
    _record_feature_settings(config, model_dir)
    splits, example = held_out_scores(model_dir, store_dir(config), columns, splits, shapes)
    calibration = calibrate_model_dir(model_dir, splits, cfg.calibrate)
    normal_class = task_normal_class(store_dir(config), cfg.task, classes)
    decision = decide_model_dir(model_dir, splits, normal_class, config.evaluate.max_escape_rate,
                                config.serve.review_fraction)
    metrics = evaluate_model_dir(model_dir, splits, classes, decision)
    results_path = _write_results(config, run_id, plan.name, model_dir, metrics, classes, best, dropped, calibration,
                                  decision, corrections)
    if run_id:
        _log_final(config, run_id, model_dir, metrics, splits, results_path, best, calibration, example)
    if remote:
        from ase_ray.storage import storage_location, upload_dir

        kept = upload_dir(model_dir, storage_location(config, "models", run_id or plan.name))
        shutil.rmtree(model_dir.parent, ignore_errors=True)
        model_dir = kept
    echo(f"{cfg.task} {cfg.model.kind} ({cfg.strategy}), best epoch {best['epoch']}: val macro-F1 "
         f"{metrics['val']['macro_f1']:.4f}, test macro-F1 {metrics['test']['macro_f1']:.4f}"
         + _line_summary(metrics["test"]))
    return FitResult(run_id, model_dir, metrics, classes, results_path, plan.name, best)


def _remote_storage(config: AppConfig) -> bool:
    from ase_ray.storage import is_uri

    return bool(config.project.storage_uri) and is_uri(config.project.storage_uri)


def stored_columns(shapes: dict[str, Any], with_stem: bool) -> list[str]:
    """The store's array columns a model is trained on (``image_stem`` only for a model that reads it; a
    text source the store was written without is absent)."""
    optional = [c for c in model_columns() if c.startswith("text_") or c == STEM]
    return [c for c in model_columns() if (c in shapes or c not in optional) and (with_stem or c != STEM)]


def reads_stem(cfg) -> bool:
    """Whether the model reads ``image_stem``: fine-tuning the encoder, or defect maps."""
    return cfg.finetune.enabled or cfg.model.image_pooling == "defect_maps"


@dataclass
class Scores:
    """A held-out split as the post-training steps need it: its rows' raw logits (temperature 1) and
    labels, computed while its arrays streamed past (:func:`held_out_scores`)."""

    logits: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def held_out_scores(model_dir: Path, store: str, columns: list[str], splits: dict[str, Arrays],
                    shapes: dict[str, Any], batch_size: int = 256) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The splits with val and test as :class:`Scores`, and one row's model inputs (the logged model's
    input example). The validation and test rows stream from the store through this process batch by
    batch, scored by the exported model and dropped: the driver keeps their logits only."""
    from ase_ray.models.inference import predict_logits
    from ase_ray.models.io import load_model

    module, meta = load_model(model_dir)
    temperature = float(module.temperature)
    names = ("val", "test")
    out, example = dict(splits), {}
    for name in names:
        source = split_source(store, columns, splits[name], shapes)
        logits = np.zeros((len(source), len(meta["classes"])), dtype=np.float32)
        seen = np.zeros(len(source), dtype=bool)
        for batch in iter_rows(source, np.arange(len(source)), batch_size):
            features = {k: np.require(v, requirements="W") for k, v in batch.items()  # Arrow's are read-only
                        if k not in (LABEL_KEY, ROW_KEY)}
            logits[batch[ROW_KEY]] = predict_logits(module, features) * temperature
            seen[batch[ROW_KEY]] = True
            if not example:
                example = {k: v[:1] for k, v in features.items()}
        if not seen.all():
            raise DataError(f"{int((~seen).sum())} of the {len(seen)} {name} rows are missing from the store")
        out[name] = Scores(logits, splits[name].labels)
    if not example and len(splits["train"]):  # no held-out row: one training row
        train = splits["train"]
        first = train.rows["row_id"].dropna()
        if len(first):
            position = int(first.index[0])
            example = {**read_row_arrays(store, columns, [int(first.iloc[0])]),
                       **{k: v[position:position + 1] for k, v in train.features.items()}}
    return out, example


def _logits(module, split) -> np.ndarray:
    """What ``module`` (temperature included) gives on a split: :class:`Scores` or :class:`Arrays`."""
    from ase_ray.models.inference import predict_logits

    if isinstance(split, Scores):
        return split.logits / float(module.temperature)
    return predict_logits(module, {k: v for k, v in split.features.items() if k != LABEL_KEY})


def _probs(module, split, classes: int) -> np.ndarray:
    import torch

    if not len(split):
        return np.zeros((0, classes))
    return torch.softmax(torch.from_numpy(np.asarray(_logits(module, split), dtype=np.float32)), dim=-1).numpy()


def with_review_corrections(config: AppConfig, splits: dict[str, Arrays], classes: list[str],
                            columns: list[str] | None = None) -> tuple[dict[str, Arrays], dict[str, Any] | None]:
    """With ``train.corrections`` on: the corrections table taken into the training rows
    (``ase_ray.train.corrections``) and the record of what was used; off: the splits as they are.
    ``columns``: the splits carry no arrays; a new image's arrays of those columns go to ``added``."""
    if not config.train.corrections:
        return splits, None
    from ase_ray.train.corrections import corrections_path, with_corrections

    path = corrections_path(config)
    if not path.is_file():
        raise DataError(f"train.corrections is on but there is no corrections table at {path} "
                        "(the review page writes it; serve.corrections_path moves it)")
    meta = store_meta(config)
    normal = task_normal_class(store_dir(config), config.train.task, classes)
    return with_corrections(splits, classes, config.train.task, path, meta, config.features, normal, columns)


def with_image_tail(config: AppConfig, splits: dict[str, Arrays]) -> tuple[AppConfig, dict[str, Arrays]]:
    """With ``train.finetune`` on: ``train.model.image_tail`` from the store's image encoder settings.
    Off: the splits without ``image_stem``."""
    cfg = config.train
    if cfg.model.image_pooling == "defect_maps":
        if STEM not in store_meta(config).get("shapes", {}):
            raise DataError("train.model.image_pooling defect_maps reads the stride-16 maps (image_stem): "
                            "extract with --set features.image_encoder.stem=true")
        if not cfg.finetune.enabled:
            return config, splits
    if not cfg.finetune.enabled:
        return config, {name: without_stem(arrays) for name, arrays in splits.items()}
    meta = store_meta(config)
    model = cfg.model.model_copy(update={"image_tail": image_tail_spec(meta)})
    return config.model_copy(update={"train": cfg.model_copy(update={"model": model})}), splits


def with_defect_targets(config: AppConfig, splits: dict[str, Arrays], classes: list[str]) -> dict[str, Arrays]:
    """With defect maps: the training rows' cell targets from their masks (``mask_path``), an input
    computed here like the numeric block (int8, one byte a cell); never for validation or test rows."""
    cfg = config.train
    if cfg.model.image_pooling != "defect_maps":
        return splits
    train = splits["train"]
    normal = task_normal_class(store_dir(config), cfg.task, classes)
    targets = defect_targets(store_meta(config), train.rows, train.labels, classes, normal).astype(np.int8)
    known = int((targets >= 0).any(axis=(1, 2)).sum())
    logger.info("defect maps: %d of %d training rows have a mask", known, len(train))
    if not known:
        logger.warning("defect maps: no training row has a mask (manifest column mask_path): the maps learn "
                       "from the image labels only")
    return {**splits, "train": Arrays({**train.features, DEFECT_TARGET: targets}, train.labels, train.rows,
                                      train.added)}


def without_constant_sources(config: AppConfig, train: Arrays) -> tuple[AppConfig, list[str]]:
    """``config`` with the store's constant (or absent) text sources left out of
    ``train.model.text_sources`` (see :func:`ase_ray.train.data.usable_text_sources`), and those left out."""
    model = config.train.model
    kept, dropped = usable_text_sources(model.text_sources, constant_text_sources(store_dir(config), train))
    if not dropped:
        return config, []
    train_cfg = config.train.model_copy(update={"model": model.model_copy(update={"text_sources": kept})})
    return config.model_copy(update={"train": train_cfg}), dropped


def with_numeric_block(config: AppConfig, splits: dict[str, Arrays]) -> tuple[dict[str, Arrays], dict[str, Any]]:
    """Every split with the numeric block fitted on the training rows (``train.model.numeric_sources``),
    and what the model must record of it and of the metadata columns (``model.json`` extra.inputs)."""

    metadata = store_metadata(store_meta(config))
    block = fit_numeric(splits["train"], config.train.model.numeric_sources, metadata)
    if config.train.model.numeric_sources and not block.fields:
        logger.warning("train.model.numeric_sources %s: no numeric field on the training rows (skipped: %s); "
                       "the model has no numeric block", config.train.model.numeric_sources, block.skipped or "none")
    out = {name: with_numeric(arrays, block, metadata) for name, arrays in splits.items()}
    return out, model_input_record(block, metadata, config.train.model.text_sources)


def _best_record(checkpoint_dir: Path, val_rows: int) -> dict[str, Any]:
    """Which epoch the exported model is, and by which rule (BEST_RULE)."""
    from ase_ray.train.loop import BEST_RULE, read_loop_state

    next_epoch, best = read_loop_state(checkpoint_dir)
    return {"epoch": best.epoch, "epochs_trained": next_epoch, "val_macro_f1": best.val_macro_f1,
            "val_log_loss": best.val_log_loss, "rule": BEST_RULE if val_rows else "last epoch (no validation rows)"}


def _fit_and_release(trainer):
    """``trainer.fit()``, then the SIGINT handler back as it was. Ray Train's handler keeps a reference
    to the run's controller actor, which then outlives the run until this process exits (a pipeline
    goes on to Tune and Serve in the same process)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return trainer.fit()
    previous = signal.getsignal(signal.SIGINT)
    try:
        return trainer.fit()
    finally:
        signal.signal(signal.SIGINT, previous)


def _record_feature_settings(config: AppConfig, model_dir: Path) -> None:
    """Keep the store's feature settings with the model, so Serve extracts what training saw."""
    from ase_ray.serving_model import write_feature_settings

    meta = store_meta(config)
    if meta:
        write_feature_settings(model_dir, meta)


MIN_CALIBRATION_ROWS = 10


def calibrate_model_dir(model_dir: Path, splits: dict[str, Arrays], enabled: bool = True) -> dict[str, Any]:
    """Fit the model's temperature on the validation rows and write it into the model folder
    (``weights.pt``, and ``model.json`` extra.calibration); returns the record: the temperature and the
    expected calibration error and NLL before and after, on validation and test, or why it was skipped.
    Only validation rows are fitted on; the test figures say how well it holds."""
    from ase_ray.models.calibration import expected_calibration_error, fit_temperature, nll, softmax
    from ase_ray.models.io import load_model, save_model

    module, meta = load_model(model_dir)
    val = splits["val"]
    skipped = ("train.calibrate is off" if not enabled else
               f"{len(val)} validation rows (at least {MIN_CALIBRATION_ROWS} needed)"
               if len(val) < MIN_CALIBRATION_ROWS else None)
    if skipped:
        logger.warning("the model is not calibrated: %s", skipped)
        record: dict[str, Any] = {"skipped": skipped}
        save_model(module, model_dir, module.settings, module.dims, meta["classes"], {**meta["extra"], "calibration": record})
        return record
    logits = {name: _logits(module, splits[name]) for name in ("val", "test") if len(splits[name])}
    temperature = fit_temperature(logits["val"], val.labels)
    record = {"temperature": temperature, "fitted_on": "val", "val_rows": len(val)}
    for name, z in logits.items():
        labels = splits[name].labels
        record[f"{name}_ece_before"] = expected_calibration_error(softmax(z), labels)
        record[f"{name}_ece_after"] = expected_calibration_error(softmax(z, temperature), labels)
        record[f"{name}_nll_before"] = nll(z, labels)
        record[f"{name}_nll_after"] = nll(z, labels, temperature)
    module.temperature.fill_(temperature)
    save_model(module, model_dir, module.settings, module.dims, meta["classes"],
               {**meta["extra"], "calibration": record})
    return record


def decide_model_dir(model_dir: Path, splits: dict[str, Arrays], normal_class: str | None,
                     max_escape_rate: float, review_fraction: float) -> dict[str, Any]:
    """Choose the line's reject threshold (escape target) and the review threshold (review budget)
    on the validation rows' calibrated probabilities; write them into ``model.json`` extra.decision,
    where Serve, ``predict`` and ``evaluate`` read them."""
    from ase_ray.models.decision import choose_decision
    from ase_ray.models.io import load_model, save_model

    module, meta = load_model(model_dir)
    val = splits["val"]
    probs = _probs(module, val, len(meta["classes"]))
    decision = choose_decision(probs, val.labels, meta["classes"], normal_class, max_escape_rate, review_fraction)
    save_model(module, model_dir, module.settings, module.dims, meta["classes"], {**meta["extra"], "decision": decision})
    return decision


def evaluate_model_dir(model_dir: Path, splits: dict[str, Arrays], classes: list[str],
                       decision: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per split (val, test): classification metrics, and with a decision record the line's escape and
    overkill rates at its reject threshold and the review figures at its review threshold."""
    from ase_ray.models.decision import split_line_figures
    from ase_ray.models.io import load_model

    module, _ = load_model(model_dir)
    out = {}
    for split in ("val", "test"):
        arrays = splits[split]
        probs = _probs(module, arrays, len(classes))
        out[split] = classification_metrics(arrays.labels, probs.argmax(1), classes)
        if decision:
            out[split].update(split_line_figures(probs, arrays.labels, classes, decision))
    return out


def _line_summary(metrics: dict[str, Any]) -> str:
    line = metrics.get("line")
    if not line:
        return ""
    return (f", escape {line['escape_rate']:.3f} / overkill {line['overkill_rate']:.3f} at P(defect) >= "
            f"{line['threshold']:.3f}")


def _open_run(config: AppConfig, plan, tags: dict[str, str] | None, parent_run_id: str | None) -> str:
    """A new MLflow run, or the one that the resumed run logs into."""
    from ase_ray.tracking import config_params, ran_model_params, setup_mlflow

    mlflow = setup_mlflow(config)
    if plan.mlflow_run_id:
        mlflow.tracking.MlflowClient().update_run(plan.mlflow_run_id, status="RUNNING")
        return plan.mlflow_run_id
    run_tags = {"ase_ray.stage": "train", **(tags or {})}
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    with mlflow.start_run(run_name=plan.name, tags=run_tags) as run:
        mlflow.log_params(config_params(config, ("train", "data", "features", "project")))
        mlflow.log_params(ran_model_params(_store_models(config)))  # what made the features it trains on
    mlflow.tracking.MlflowClient().update_run(run.info.run_id, status="RUNNING")
    return run.info.run_id


def _store_models(config: AppConfig) -> dict[str, dict[str, Any]]:
    backends = store_meta(config).get("backends", {})
    return {stage: info for stage, info in backends.items() if isinstance(info, dict)}


def _end_run(config: AppConfig, run_id: str, status: str) -> None:
    from ase_ray.tracking import setup_mlflow

    setup_mlflow(config).tracking.MlflowClient().set_terminated(run_id, status)


def _log_reliability(mlflow, config: AppConfig, model_dir: Path, splits: dict[str, Arrays],
                     calibration: dict[str, Any]) -> None:
    """The validation split's reliability diagram, before and after temperature scaling."""
    import matplotlib.pyplot as plt

    from ase_ray.models.calibration import softmax
    from ase_ray.models.io import load_model
    from ase_ray.train.metrics import reliability_figure

    val = splits["val"]
    if not len(val):
        return
    module, _ = load_model(model_dir)
    temperature = float(calibration.get("temperature", 1.0))
    raw = _logits(module, val) * temperature  # the saved model divides by T already
    curves = {"uncalibrated": softmax(raw)}
    if "temperature" in calibration:
        curves[f"calibrated (T={temperature:.2f})"] = softmax(raw, temperature)
    fig = reliability_figure(curves, val.labels, f"{config.train.task} validation reliability")
    mlflow.log_figure(fig, "reliability_val.png")
    plt.close(fig)


def _write_results(config, run_id, train_run, model_dir, metrics, classes, best, dropped=(), calibration=None,
                   decision=None, corrections=None) -> str:
    """``<storage_uri or work_dir>/results/train_<run>.json``."""
    from ase_ray import storage

    out = storage.storage_location(config, "results", f"train_{run_id or train_run}.json")
    if _remote_storage(config):
        model_dir = storage.storage_location(config, "models", run_id or train_run)  # where it is kept
    storage.write_text(out, json.dumps({"run_id": run_id, "train_run": train_run, "model_dir": str(model_dir),
                               "classes": classes, "task": config.train.task, "kind": config.train.model.kind,
                               "text_sources": config.train.model.text_sources,
                               "dropped_text_sources": list(dropped), "best_epoch": best, "metrics": metrics,
                               "calibration": calibration or {}, "decision": decision or {},
                               "corrections": corrections},
                              indent=2))
    return out if storage.is_uri(out) else Path(out)


def _log_final(config, run_id, model_dir, metrics, splits, results_path, best, calibration=None,
               example: dict[str, np.ndarray] | None = None) -> None:
    import matplotlib.pyplot as plt

    from ase_ray.serving_model import log_pyfunc_model
    from ase_ray.tracking import setup_mlflow

    mlflow = setup_mlflow(config)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({"best_epoch": float(best["epoch"]), "epochs_trained": float(best["epochs_trained"])})
        mlflow.set_tags({"ase_ray.best_epoch": str(best["epoch"]), "ase_ray.best_rule": best["rule"]})
        calibration = calibration or {}
        mlflow.log_metrics({f"calibration_{k}": float(v) for k, v in calibration.items()
                            if isinstance(v, float)})
        mlflow.set_tag("ase_ray.temperature", f"{calibration['temperature']:.4f}" if "temperature" in calibration
                       else f"not calibrated: {calibration.get('skipped', 'no record')}")
        _log_reliability(mlflow, config, model_dir, splits, calibration)
        for split in ("val", "test"):
            mlflow.log_metrics(flat_metrics(metrics[split], f"final_{split}_"))
            mlflow.log_text(report_text(metrics[split]), f"classification_report_{split}.txt")
            fig = confusion_figure(metrics[split], f"{config.train.task} {split} confusion matrix")
            mlflow.log_figure(fig, f"confusion_matrix_{split}.png")
            plt.close(fig)
        from ase_ray import storage

        mlflow.log_text(storage.read_text(results_path), storage.name(results_path))
        if example is None:
            example = (splits["val"] if len(splits["val"]) else splits["train"]).features
        log_pyfunc_model(model_dir, example)
    mlflow.tracking.MlflowClient().set_terminated(run_id, "FINISHED")
