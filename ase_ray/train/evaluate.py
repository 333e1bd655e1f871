"""``ase-ray evaluate``: score a trained model (a folder, a run or a registry alias) on a store's split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ase_ray.config import AppConfig
from ase_ray.data.manifest import SPLITS
from ase_ray.errors import DataError
from ase_ray.models.io import META_FILE
from ase_ray.train.data import load_task_arrays, with_model_numeric
from ase_ray.train.loop import predict_proba
from ase_ray.train.metrics import classification_metrics, report_text


def resolve_model_dir(config: AppConfig, model_uri: str) -> Path:
    """A local model folder for ``model_uri``: a folder with model.json, ``runs:/...`` or ``models:/...``."""
    local = Path(model_uri)
    if local.is_dir():
        found = _find_model_json(local)
        if found is None:
            raise DataError(f"{model_uri} holds no {META_FILE}: not a saved ase-ray model")
        return found
    if not model_uri.startswith(("runs:/", "models:/")):
        raise DataError(f"model {model_uri!r} is neither a folder nor a runs:/ or models:/ URI")
    from ase_ray.tracking import lookup_tracking_uri, setup_mlflow

    try:
        lookup_tracking_uri(config)  # a missing store or a dead server: one line now, not after retries
    except DataError as exc:
        raise DataError(f"cannot fetch model {model_uri}: {exc}") from None
    mlflow = setup_mlflow(config)
    try:
        downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    except Exception as exc:  # MLflow raises several types for unknown runs, names and aliases
        raise DataError(f"cannot fetch model {model_uri}: {exc}") from None
    found = _find_model_json(downloaded)
    if found is None:
        raise DataError(f"{model_uri} is not an ase-ray model (no {META_FILE} inside)")
    return found


def _find_model_json(root: Path) -> Path | None:
    if (root / META_FILE).is_file():
        return root
    hits = sorted(root.rglob(META_FILE))
    return hits[0].parent if hits else None


def evaluate(config: AppConfig, model_uri: str, store_dir: str | Path, split: str = "test") -> dict[str, Any]:
    """Classification metrics of the model on the split, and the line's figures: ``escape_rate`` and
    ``overkill_rate`` at the model's reject threshold (chosen again on the store's validation split
    when ``evaluate.max_escape_rate`` differs from the target the model was trained for, or when the
    model has no threshold), and the review figures at its review threshold."""
    from ase_ray.features.store import check_store
    from ase_ray.models.decision import split_line_figures

    if split not in SPLITS:  # the cheap checks first: a model may have to be fetched from MLflow
        raise DataError(f"unknown split {split!r} (valid: {', '.join(SPLITS)})")
    check_store(store_dir)
    model_dir, probs, arrays, classes, task = evaluate_probabilities(config, model_uri, store_dir, split)
    metrics = classification_metrics(arrays.labels, probs.argmax(1), classes)
    metrics.update({"model": model_uri, "model_dir": str(model_dir), "split": split, "task": task})
    decision = evaluation_decision(config, str(model_dir), store_dir, task, classes)  # fetched once
    metrics.update(split_line_figures(probs, arrays.labels, classes, decision))
    line = metrics.get("line") or {}
    metrics.update({"escape_rate": line.get("escape_rate"), "overkill_rate": line.get("overkill_rate"),
                    "decision": decision})
    return metrics


def evaluation_decision(config: AppConfig, model_uri: str, store_dir: str | Path, task: str,
                        classes: list[str]) -> dict[str, Any]:
    """The model's decision record when it was chosen for ``evaluate.max_escape_rate``; else one chosen
    now on the store's validation split (``source`` says which)."""
    from ase_ray.models.decision import choose_decision
    from ase_ray.models.io import load_model
    from ase_ray.train.data import task_normal_class

    model_dir = resolve_model_dir(config, model_uri)
    _, meta = load_model(model_dir)
    recorded = dict(meta.get("extra", {}).get("decision") or {})
    target = config.evaluate.max_escape_rate
    if recorded.get("defect_threshold") is not None and abs(recorded.get("max_escape_rate", -1) - target) < 1e-12:
        return {**recorded, "source": "model"}
    try:
        _, probs, arrays, _, _ = evaluate_probabilities(config, model_uri, store_dir, "val")
    except DataError as exc:
        return {"note": f"no threshold: {exc}"}
    review_fraction = recorded.get("review_fraction", config.serve.review_fraction)
    chosen = choose_decision(probs, arrays.labels, classes, task_normal_class(store_dir, task, classes), target,
                             review_fraction)
    return {**chosen, "source": "store val split (the model's target differs or it has none)"}


def evaluate_probabilities(config: AppConfig, model_uri: str, store_dir: str | Path, split: str = "test"):
    """(model folder, class probabilities (N, C), the split's arrays, classes, task): the model on the
    store's split, its numeric block from the rows' OCR fields and metadata as the model recorded it."""
    from ase_ray.models.io import load_model

    model_dir = resolve_model_dir(config, model_uri)
    module, meta = load_model(model_dir)
    task = meta.get("extra", {}).get("task", config.train.task)
    splits, classes = load_task_arrays(store_dir, task, use_augmented=False)
    if classes != meta["classes"]:
        raise DataError(f"the model's classes {meta['classes']} differ from the store's {classes}")
    if split not in splits:
        raise DataError(f"unknown split {split!r} (train, val, test)")
    arrays = splits[split]
    if len(arrays) == 0:
        raise DataError(f"the store has no {split} rows" + (": the line's thresholds are chosen on validation rows"
                                                            if split == "val" else ""))
    arrays = with_model_numeric(arrays, meta)
    return model_dir, predict_proba(module, arrays.features), arrays, classes, task


def write_evaluation(metrics: dict[str, Any], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2))
    return out


def evaluation_text(metrics: dict[str, Any]) -> str:
    text = f"{metrics['task']} on {metrics['split']} ({metrics['n']} images), model {metrics['model']}\n" + report_text(metrics)
    decision = metrics.get("decision") or {}
    if metrics.get("line"):
        text += (f"\nthreshold chosen on {decision.get('source', 'model')} for max_escape_rate "
                 f"{decision.get('max_escape_rate')}")
    elif decision.get("note"):
        text += f"\nescape_rate / overkill_rate: n/a ({decision['note']})"
    return text
