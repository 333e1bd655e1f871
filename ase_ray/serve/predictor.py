"""The one prediction path: decoded images -> feature columns (the extraction stages) -> classifier.

- :func:`resolve_model_ref` turns a model URI into a pinned reference (``models:/name@alias`` ->
  the version it points to now) with its name, version, alias and run.
- :func:`load_model` loads the MLflow pyfunc once (per replica or actor) and with it the feature
  settings the model was trained on (``features.json``).
- :func:`serving_features` gives the feature config to extract with: the model's recorded settings,
  resources from the deployment.
- :func:`classify` turns per-image feature arrays into predictions (label, probabilities,
  ``needs_review``).

Ray Serve splits these over two deployments (features on the GPU pool, batched; the classifier
apart); :class:`Predictor` composes the same functions in one process for ``ase-ray predict``.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ase_ray.errors import DataError

if TYPE_CHECKING:
    import torch

    from ase_ray.config import AppConfig, FeaturesConfig
    from ase_ray.data.metadata import MetadataColumns
    from ase_ray.features.inmemory import (
        DecodedImage,
        ExtractedFeatures,
        FeatureExtractor,
    )
    from ase_ray.serve.settings import DeploymentSettings
    from ase_ray.serving_model import DefectClassifierModel

DEFAULT_REVIEW_THRESHOLD = 0.6  # a model trained before review thresholds were chosen on validation
_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)/?$")
_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)/?$")
_RUN = re.compile(r"^runs:/(?P<run_id>[^/]+)(/.*)?$")


@dataclass(frozen=True)
class ModelRef:
    """A model URI as asked, the URI it was pinned to, and what the registry says about it."""

    uri: str
    load_uri: str
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def set_tracking(tracking_uri: str) -> None:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)


def check_model_uri_form(model_uri: str) -> None:
    """A registry URI names a model, a run URI a run; anything else must be a local MLflow model folder."""
    forms = "models:/<name>@<alias>, models:/<name>/<version>, runs:/<run id>/model or a local model folder"
    if model_uri.startswith("models:/"):
        if not model_uri[len("models:/"):].strip("/") or model_uri.endswith("@"):
            raise DataError(f"model URI {model_uri!r} names no model (valid: {forms})")
    elif model_uri.startswith("runs:/"):
        if not _RUN.match(model_uri):
            raise DataError(f"model URI {model_uri!r} names no run (valid: {forms})")
    elif "://" in model_uri:
        return  # file://, s3://...: MLflow's artifact layer reads it
    elif not Path(model_uri).is_dir():
        raise DataError(f"model {model_uri!r} is not a models:/ or runs:/ URI and no such folder exists "
                        f"(valid: {forms})")
    elif not (Path(model_uri) / "MLmodel").is_file():
        raise DataError(f"model folder {model_uri} is not an MLflow model (no MLmodel file in it)")


def resolve_model_ref(model_uri: str, tracking_uri: str) -> ModelRef:
    """Pin ``model_uri``: an alias resolves to its current version; raises :class:`DataError` when the
    registry does not know it."""
    from mlflow.tracking import MlflowClient

    check_model_uri_form(model_uri)
    set_tracking(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        if match := _ALIAS.match(model_uri):
            name, alias = match["name"], match["alias"]
            mv = client.get_model_version_by_alias(name, alias)
            return ModelRef(model_uri, f"models:/{name}/{mv.version}", name, str(mv.version), alias, mv.run_id)
        if match := _VERSION.match(model_uri):
            mv = client.get_model_version(match["name"], match["version"])
            return ModelRef(model_uri, model_uri, match["name"], str(mv.version), None, mv.run_id)
        if match := _RUN.match(model_uri):
            run_id = match["run_id"]
            client.get_run(run_id)
            versions = client.search_model_versions(f"run_id = '{run_id}'")
            if len(versions) == 1:
                return ModelRef(model_uri, model_uri, versions[0].name, str(versions[0].version), None, run_id)
            return ModelRef(model_uri, model_uri, None, None, None, run_id)
    except Exception as exc:  # MLflow raises several types for unknown names, aliases and runs
        raise DataError(f"cannot resolve model {model_uri}: {_first_line(exc)}") from None
    if model_uri.startswith("models:/"):
        return ModelRef(model_uri, model_uri, model_uri.split("/")[1], None, None, None)
    return ModelRef(model_uri, model_uri)  # a local MLflow model folder


@dataclass
class LoadedModel:
    ref: ModelRef
    python_model: "DefectClassifierModel"
    loaded_at: float = field(default_factory=time.time)

    @property
    def classes(self) -> list[str]:
        return list(self.python_model.meta["classes"])

    @property
    def task(self) -> str | None:
        return self.python_model.meta.get("extra", {}).get("task")

    @property
    def feature_settings(self) -> dict[str, Any] | None:
        recorded = self.python_model.feature_settings
        return recorded.get("features") if recorded else None

    @property
    def decision(self) -> dict[str, Any]:
        """The decision record training chose on validation (``ase_ray.models.decision``): the reject
        threshold on P(defect) and the review threshold; empty for a model trained before it."""
        return dict(self.python_model.meta.get("extra", {}).get("decision") or {})

    def review_threshold(self, asked: float | None) -> float:
        """``asked`` when set (serve.review_threshold), else the model's own, else the old fixed 0.6."""
        if asked is not None:
            return float(asked)
        return float(self.decision.get("review_threshold", DEFAULT_REVIEW_THRESHOLD))

    @property
    def metadata_columns(self) -> "MetadataColumns":
        """The metadata keys every request must carry (text and numeric), as the model recorded them."""
        return model_metadata_columns(self.python_model.meta)

    def predict_proba(self, features: dict[str, np.ndarray]) -> np.ndarray:
        return self.python_model.predict_proba(features)

    def numeric_features(self, ocr_fields: list[Any], metadata: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        from ase_ray.models.inference import numeric_features

        return numeric_features(self.python_model.meta, ocr_fields, metadata)

    def describe(self) -> dict[str, Any]:
        return {**self.ref.describe(), "task": self.task, "classes": self.classes, "loaded_at": self.loaded_at,
                "metadata_columns": self.metadata_columns.to_json()}


def model_metadata_columns(meta: dict[str, Any]) -> "MetadataColumns":
    from ase_ray.data.metadata import STORE_KEY, MetadataColumns
    from ase_ray.models.inference import model_inputs

    return MetadataColumns.from_json(model_inputs(meta).get(STORE_KEY))


def require_metadata(columns: "MetadataColumns", records: list[dict[str, Any]]) -> None:
    """A 400 naming the keys when a request's metadata lacks one the model needs."""
    from ase_ray.data.metadata import missing_keys
    from ase_ray.errors import RequestError

    for i, record in enumerate(records):
        missing = missing_keys(record, columns)
        if missing:
            raise RequestError(400, "missing_metadata", missing_metadata_message(missing, columns, i, len(records)))


def missing_metadata_message(missing: list[str], columns: "MetadataColumns", index: int, count: int) -> str:
    where = f" (image {index})" if count > 1 else ""
    return (f"metadata{where} lacks {missing}: the model reads the records {columns.all} "
            f"(send null for an unknown value)")


def load_model(ref: ModelRef, tracking_uri: str, device: "str | torch.device" = "cpu") -> LoadedModel:
    """The pyfunc of ``ref`` (an ase-ray DefectClassifierModel), loaded once, its weights on ``device``
    (``replica_device(num_gpus)``: cuda in a replica that was given a GPU)."""
    import mlflow.pyfunc

    from ase_ray.serving_model import DefectClassifierModel

    set_tracking(tracking_uri)
    try:
        pyfunc = mlflow.pyfunc.load_model(ref.load_uri)
    except Exception as exc:
        raise DataError(f"cannot load model {ref.uri}: {_first_line(exc)}") from None
    python_model = pyfunc.unwrap_python_model()
    if not isinstance(python_model, DefectClassifierModel):
        raise DataError(f"{ref.uri} is not an ase-ray defect classifier ({type(python_model).__name__})")
    return LoadedModel(ref, python_model.to(device))


def model_serving_record(ref: ModelRef, tracking_uri: str) -> tuple[dict[str, Any] | None, "MetadataColumns"]:
    """(the feature settings recorded with a model, the metadata columns it reads), from its
    ``features.json`` and ``model.json``, without loading the weights."""
    import json

    import mlflow

    from ase_ray.data.metadata import MetadataColumns
    from ase_ray.models.io import META_FILE
    from ase_ray.serving_model import FEATURES_FILE, read_feature_settings

    set_tracking(tracking_uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref.load_uri))
    except Exception as exc:
        raise DataError(f"cannot fetch model {ref.uri}: {_first_line(exc)}") from None
    found = sorted(local.rglob(FEATURES_FILE))
    recorded = read_feature_settings(found[0].parent) if found else None
    metas = sorted(local.rglob(META_FILE))
    columns = model_metadata_columns(json.loads(metas[0].read_text())) if metas else MetadataColumns()
    return (recorded.get("features") if recorded else None), columns


def serving_features(base: "FeaturesConfig", recorded: dict[str, Any] | None,
                     resources: "DeploymentSettings | None" = None) -> "FeaturesConfig":
    """The model's recorded feature settings (``base`` where it has none), each stage's resources set
    to the replica's, so torch uses the replica's CPUs and the GPU when it has one, and each stage
    named in the replica's ``devices`` placed on that device (resources and devices are not part of
    what a stage computes: the features key stays the same)."""
    from ase_ray.features.inmemory import STAGE_SECTIONS, features_from_settings

    features = features_from_settings(base, recorded)
    if resources is None:
        return features
    devices = getattr(resources, "devices", {})
    update = {}
    for name in STAGE_SECTIONS:
        section = getattr(features, name)
        res = section.resources.model_copy(update={"num_cpus": max(1.0, resources.num_cpus),
                                                    "num_gpus": resources.num_gpus})
        placed = {"device": devices[name]} if name in devices else {}
        update[name] = section.model_copy(update={"resources": res, **placed})
    update["ocr"] = update["ocr"].model_copy(update={"parallel": getattr(resources, "ocr_parallel", 1)})
    return features.model_copy(update=update)


# ------------------------------------------------------------------------------------- classify
def classify(model: LoadedModel, rows: list[dict[str, np.ndarray]], threshold: float,
             ocr_fields: list[Any] | None = None, metadata: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Predictions for per-image feature arrays (and each image's OCR fields and metadata record, for the
    numeric block): ``label``, ``probabilities``, ``confidence``, ``needs_review`` (top probability
    under ``threshold``), and the line's ``p_defect`` and ``decision`` (pass / reject at the model's
    reject threshold; None for a model without one)."""
    from ase_ray.models.decision import defect_probability, line_decision

    if not rows:
        return []
    stacked = {name: np.stack([np.asarray(r[name]) for r in rows]) for name in rows[0]}
    stacked.update(model.numeric_features(ocr_fields if ocr_fields is not None else [{}] * len(rows),
                                          metadata if metadata is not None else [{}] * len(rows)))
    probs = model.predict_proba(stacked)
    classes = model.classes
    decision = model.decision
    reject_at, normal = decision.get("defect_threshold"), decision.get("normal_class")
    p_defect = defect_probability(probs, classes, normal) if reject_at is not None and normal in classes else None
    out = []
    for i, p in enumerate(probs):
        top = int(np.argmax(p))
        out.append({
            "label": classes[top],
            "probabilities": {c: float(v) for c, v in zip(classes, p)},
            "confidence": float(p[top]),
            "needs_review": bool(p[top] < threshold),
            "p_defect": None if p_defect is None else float(p_defect[i]),
            "decision": None if p_defect is None else line_decision(float(p_defect[i]), reject_at),
            "defect_threshold": reject_at,
        })
    return out


def feature_rows(extracted: "ExtractedFeatures") -> list[dict[str, Any]]:
    """Per image: ``{"error": ""|message, "texts": {...}, "arrays": {...}}`` (arrays for good images)."""
    rows, position = [], 0
    for i, error in enumerate(extracted.errors):
        if error:
            rows.append({"error": error, "texts": {}, "arrays": {}, "image_id": extracted.image_ids[i]})
            continue
        rows.append({"error": "", "texts": extracted.texts[i], "arrays": extracted.row_arrays(position),
                     "image_id": extracted.image_ids[i]})
        position += 1
    return rows


class Predictor:
    """Features + classifier in one process (batch prediction); Serve runs the same two halves apart."""

    def __init__(self, model: LoadedModel, extractor: "FeatureExtractor", review_threshold: float | None = None) -> None:
        self.model = model
        self.extractor = extractor
        self.review_threshold = model.review_threshold(review_threshold)

    @classmethod
    def load(cls, config: "AppConfig", ref: ModelRef, cache_root: str | None = None,
             resources: "DeploymentSettings | None" = None) -> "Predictor":
        from ase_ray.features.inmemory import FeatureExtractor
        from ase_ray.models.inference import replica_device
        from ase_ray.tracking import tracking_uri

        model = load_model(ref, tracking_uri(config), replica_device(resources.num_gpus if resources else 0))
        features = serving_features(config.features, model.feature_settings, resources)
        return cls(model, FeatureExtractor(features, cache_root).load(), config.serve.review_threshold)

    def predict(self, images: list["DecodedImage"], metadata: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """One dict per image: the prediction and texts, or ``error``. ``metadata[i]``: image i's record
        (it must carry the model's metadata columns: :func:`require_metadata`)."""
        from ase_ray.data.metadata import metadata_text

        if not images:
            return []
        metadata = metadata if metadata is not None else [{} for _ in images]
        columns = self.model.metadata_columns
        require_metadata(columns, metadata)
        rows = feature_rows(self.extractor(images, [metadata_text(m, columns.text) for m in metadata]))
        for row, record in zip(rows, metadata):
            row["metadata"] = record
        good = [r for r in rows if not r["error"]]
        predictions = iter(classify(self.model, [r["arrays"] for r in good], self.review_threshold,
                                    [r["texts"].get("ocr_fields", {}) for r in good], [r["metadata"] for r in good]))
        return [{"error": r["error"], "image_id": r["image_id"], **r["texts"],
                 **({} if r["error"] else next(predictions))} for r in rows]


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().split("\n")[0]
    return text[:300] or type(exc).__name__
