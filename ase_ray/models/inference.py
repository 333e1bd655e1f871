"""A trained classifier at prediction time (Ray Serve, ``ase-ray predict``): where it runs, its inputs
checked against ``model.json``, and its class probabilities.

Plain torch and numpy: no MLflow, Ray or training code is imported, so the same prediction code runs
(and is tested on a GPU, ``tests/gpu``) wherever torch runs. The MLflow pyfunc
(:class:`ase_ray.serving_model.DefectClassifierModel`) is this class plus MLflow's interface.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ase_ray.errors import DataError

FEATURES_FILE = "features.json"
EVAL_BATCH = 64


def replica_device(num_gpus: float) -> torch.device:
    """cuda when the replica or actor was given a GPU (``num_gpus`` > 0) and torch sees one, else cpu.

    The deployment's own setting decides, not whether the node has a GPU: a CPU replica on a GPU node
    must not take GPU memory that was not given to it."""
    return torch.device("cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------- inputs
def feature_shapes(meta: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The per-row shape of every feature column the model reads (from ``model.json``)."""
    d = meta["dims"]
    shapes: dict[str, tuple[int, ...]] = {
        "image_pooled": (d.get("image_pooled_dim") or d["image_dim"],),
        "image_tokens": (d["image_tokens"], d["image_dim"]),
    }
    if meta["settings"].get("image_tail") or meta["settings"].get("image_pooling") == "defect_maps":
        shapes["image_stem"] = (d["stem_dim"], d["stem_size"], d["stem_size"])
    if d.get("llm_dim"):
        shapes["llm_hidden"] = (d["llm_dim"],)
    for src in meta["settings"]["text_sources"]:
        shapes[f"text_{src}_pooled"] = (d["text_dim"],)
        shapes[f"text_{src}_tokens"] = (d["text_len"], d["text_dim"])
        shapes[f"text_{src}_mask"] = (d["text_len"],)
    if uses_numeric(meta):
        shapes["numeric"] = (d["numeric_dim"],)
    return shapes


def uses_numeric(meta: dict[str, Any]) -> bool:
    """Whether the model reads a numeric block (built so in ``DefectClassifier``)."""
    settings = meta["settings"]
    return bool(meta["dims"].get("numeric_dim")) and bool(settings.get("numeric_sources")) \
        and settings.get("kind") != "image_only"


def model_inputs(meta: dict[str, Any]) -> dict[str, Any]:
    """What a model needs beside the extracted arrays (``model.json`` ``extra.inputs``): the numeric
    block (``numeric``) and the metadata keys a request must carry (``metadata_columns``)."""
    return dict(meta.get("extra", {}).get("inputs") or {})


def numeric_features(meta: dict[str, Any], ocr_fields: list[Any], metadata: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """``{"numeric": (N, 2F)}`` from each image's OCR fields and metadata record, scaled as in training
    ({} for a model without a numeric block)."""
    from ase_ray.models.numeric import NUMERIC_KEY, NumericBlock

    if not uses_numeric(meta):
        return {}
    block = NumericBlock.from_json(model_inputs(meta).get("numeric"))
    values = block.transform(ocr_fields, metadata)
    if values.shape[1] != meta["dims"]["numeric_dim"]:
        raise DataError(f"the model's numeric block gives {values.shape[1]} values, its weights take "
                        f"{meta['dims']['numeric_dim']}")
    return {NUMERIC_KEY: values}


def check_features(features: dict[str, np.ndarray], meta: dict[str, Any]) -> dict[str, np.ndarray]:
    """The model's input arrays from in-memory features (float32, masks int64), shapes checked."""
    out = {}
    for column, shape in feature_shapes(meta).items():
        values = features.get(column)
        if values is None:
            raise DataError(f"features have no {column!r} (needs {sorted(feature_shapes(meta))})")
        values = np.asarray(values)
        if tuple(values.shape[1:]) != tuple(shape):
            raise DataError(f"feature {column!r} has shape {tuple(values.shape[1:])}, the model needs {tuple(shape)}")
        out[column] = values.astype(np.int64) if column.endswith("_mask") else values.astype(np.float32)
    return out


def read_feature_settings(model_dir: str | Path) -> dict[str, Any] | None:
    """``features.json`` beside ``model.json`` (the feature settings the model was trained on), or None."""
    path = Path(model_dir) / FEATURES_FILE
    return json.loads(path.read_text()) if path.is_file() else None


# ----------------------------------------------------------------------------------- prediction
def predict_proba(module: torch.nn.Module, features: dict[str, np.ndarray], device: torch.device | str | None = None,
                  batch_size: int = EVAL_BATCH) -> np.ndarray:
    """Class probabilities (N, C), float32 numpy on the host, in eval mode, ``batch_size`` rows at a
    time. Inputs go to ``device`` (default: where the module's weights are): floats as float32,
    integers (masks) as int64. Training scores its epochs with it too (``ase_ray.train.loop``). The
    logits are the model's own, so a calibrated model's temperature applies."""
    logits = predict_logits(module, features, device, batch_size)
    return torch.softmax(torch.from_numpy(logits), dim=-1).numpy()


@torch.no_grad()
def predict_logits(module: torch.nn.Module, features: dict[str, np.ndarray], device: torch.device | str | None = None,
                   batch_size: int = EVAL_BATCH) -> np.ndarray:
    """Logits (N, C), float32 numpy on the host; see :func:`predict_proba`."""
    if device is None:
        device = next(module.parameters()).device
    n = len(next(iter(features.values()))) if features else 0
    was_training = module.training
    module.eval()
    chunks = []
    try:
        for start in range(0, n, batch_size):
            batch = {}
            for key, value in features.items():
                tensor = torch.from_numpy(np.ascontiguousarray(value[start:start + batch_size]))
                batch[key] = tensor.to(device=device, dtype=torch.float32 if tensor.is_floating_point() else torch.long)
            chunks.append(module(batch)["logits"].float().cpu().numpy())
    finally:
        module.train(was_training)
    return np.concatenate(chunks) if chunks else np.zeros((0, getattr(module, "num_classes", 0)), np.float32)


class ClassifierPredictor:
    """The classifier of a model folder (``model.json`` + ``weights.pt``), its metadata and recorded
    feature settings, on one device. No ``__init__``: the MLflow pyfunc subclass is created empty
    and filled by ``load_context`` (:meth:`load_dir`)."""

    module: torch.nn.Module | None = None
    meta: dict[str, Any] | None = None
    feature_settings: dict[str, Any] | None = None

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: torch.device | str = "cpu") -> "ClassifierPredictor":
        predictor = cls()
        predictor.load_dir(model_dir, device)
        return predictor

    def load_dir(self, model_dir: str | Path, device: torch.device | str = "cpu") -> None:
        from ase_ray.models.io import load_model

        self.module, self.meta = load_model(model_dir, map_location=torch.device(device))
        self.feature_settings = read_feature_settings(model_dir)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def to(self, device: torch.device | str) -> "ClassifierPredictor":
        """Move the weights (e.g. to the replica's GPU, :func:`replica_device`); returns self."""
        self.module.to(torch.device(device))
        return self

    def predict_proba(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """Class probabilities (N, C) for in-memory arrays (no DataFrame round trip; Serve uses this)."""
        return predict_proba(self.module, check_features(features, self.meta), self.device)
