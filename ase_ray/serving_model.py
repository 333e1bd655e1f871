"""The trained classifier as an MLflow pyfunc model: feature-store columns in, label + probabilities out.

Input: a DataFrame with the store's array columns (``image_pooled``, ``image_tokens``, ``llm_hidden``,
``text_<src>_pooled/_tokens/_mask``), each cell a flat list or array; they are reshaped with the
dimensions in ``model.json``. Output: ``label`` and ``prob_<class>`` per row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ARTIFACT_KEY = "model_dir"


def feature_shapes(meta: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    d = meta["dims"]
    shapes: dict[str, tuple[int, ...]] = {
        "image_pooled": (d["image_dim"],),
        "image_tokens": (d["image_tokens"], d["image_dim"]),
    }
    if d.get("llm_dim"):
        shapes["llm_hidden"] = (d["llm_dim"],)
    for src in meta["settings"]["text_sources"]:
        shapes[f"text_{src}_pooled"] = (d["text_dim"],)
        shapes[f"text_{src}_tokens"] = (d["text_len"], d["text_dim"])
        shapes[f"text_{src}_mask"] = (d["text_len"],)
    return shapes


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


def features_to_frame(features: dict[str, np.ndarray], meta: dict[str, Any], rows: int) -> pd.DataFrame:
    return pd.DataFrame({c: [features[c][i].reshape(-1).tolist() for i in range(rows)] for c in feature_shapes(meta)})


def _pyfunc_base():
    import mlflow.pyfunc

    return mlflow.pyfunc.PythonModel


class DefectClassifierModel(_pyfunc_base()):
    def load_context(self, context) -> None:
        from ase_ray.models.io import load_model

        self.module, self.meta = load_model(context.artifacts[ARTIFACT_KEY])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from ase_ray.train.loop import predict_proba

        probs = predict_proba(self.module, frame_to_features(model_input, self.meta))
        classes = self.meta["classes"]
        out = pd.DataFrame(probs, columns=[f"prob_{c}" for c in classes])
        out.insert(0, "label", [classes[i] for i in probs.argmax(1)])
        return out


def log_pyfunc_model(model_dir: Path, example_arrays) -> None:
    """Log the model folder as ``model`` of the active run, with an input example of one row."""
    import json

    import mlflow

    meta = json.loads((Path(model_dir) / "model.json").read_text())
    example = features_to_frame(example_arrays.features, meta, 1)
    mlflow.pyfunc.log_model(
        name="model",
        python_model=DefectClassifierModel(),
        artifacts={ARTIFACT_KEY: str(model_dir)},
        input_example=example,
        pip_requirements=["ase-ray"],
    )
