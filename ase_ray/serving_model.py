"""The trained classifier as an MLflow pyfunc model: feature-store columns in, label + probabilities out.

Input: a DataFrame with the store's array columns (``image_pooled``, ``image_tokens``, ``llm_hidden``,
``text_<src>_pooled/_tokens/_mask``), each cell a flat list or array; they are reshaped with the
dimensions in ``model.json``. Output: ``label`` and ``prob_<class>`` per row.

``features.json`` beside ``model.json`` (when the store recorded it) holds the feature-extraction
settings the model was trained on; Ray Serve and ``ase-ray predict`` extract with exactly those.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ase_ray.models.inference import (  # noqa: F401 - re-exported: callers import them from here
    FEATURES_FILE,
    ClassifierPredictor,
    check_features,
    feature_shapes,
    read_feature_settings,
)

ARTIFACT_KEY = "model_dir"


def frame_to_features(frame: pd.DataFrame, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    from ase_ray.errors import DataError

    out = {}
    for column, shape in feature_shapes(meta).items():
        if column not in frame.columns:
            raise DataError(f"input has no column {column!r} (needs {sorted(feature_shapes(meta))})")
        try:
            values = np.stack([np.asarray(v, dtype=np.float32).reshape(shape) for v in frame[column]])
        except ValueError as exc:
            raise DataError(f"column {column!r} cannot be read as shape {shape}: {exc}") from None
        out[column] = values.astype(np.int64) if column.endswith("_mask") else values
    return out


def write_feature_settings(model_dir: str | Path, store_meta: dict[str, Any]) -> Path | None:
    """Record the store's feature settings and backends beside the model (None: the store has none)."""
    import json

    if not store_meta.get("features"):
        return None
    path = Path(model_dir) / FEATURES_FILE
    body = {"features": store_meta["features"], "backends": store_meta.get("backends", {}),
            "shapes": store_meta.get("shapes", {})}
    path.write_text(json.dumps(body, indent=2))
    return path


def features_to_frame(features: dict[str, np.ndarray], meta: dict[str, Any], rows: int) -> pd.DataFrame:
    return pd.DataFrame({c: [features[c][i].reshape(-1).tolist() for i in range(rows)] for c in feature_shapes(meta)})


def _pyfunc_base():
    import mlflow.pyfunc

    return mlflow.pyfunc.PythonModel


class DefectClassifierModel(ClassifierPredictor, _pyfunc_base()):
    """The MLflow pyfunc: :class:`~ase_ray.models.inference.ClassifierPredictor` (the prediction code,
    ``predict_proba``) behind MLflow's ``load_context`` / ``predict``."""

    def load_context(self, context) -> None:
        # On the CPU; Serve and batch prediction move it to the replica's GPU when it has one
        # (ase_ray.serve.predictor.load_model).
        self.load_dir(context.artifacts[ARTIFACT_KEY])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        return self.predict_arrays(frame_to_features(model_input, self.meta))

    def predict_arrays(self, features: dict[str, np.ndarray]) -> pd.DataFrame:
        probs = self.predict_proba(features)
        classes = self.meta["classes"]
        out = pd.DataFrame(probs, columns=[f"prob_{c}" for c in classes])
        out.insert(0, "label", [classes[i] for i in probs.argmax(1)])
        return out


def log_pyfunc_model(model_dir: Path, example_arrays) -> None:
    """Log the model folder as ``model`` of the active run, with an input example of one row
    (``example_arrays``: ``Arrays``, or its ``features`` dict)."""
    import json

    import mlflow

    meta = json.loads((Path(model_dir) / "model.json").read_text())
    example = features_to_frame(getattr(example_arrays, "features", example_arrays), meta, 1)
    mlflow.pyfunc.log_model(
        name="model",
        python_model=DefectClassifierModel(),
        artifacts={ARTIFACT_KEY: str(model_dir)},
        input_example=example,
        pip_requirements=["ase-ray"],
    )
