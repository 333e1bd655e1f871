"""Save and load a trained classifier: ``weights.pt`` (state_dict) and ``model.json`` (how to rebuild it)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ase_ray.errors import DataError
from ase_ray.models.classifier import DefectClassifier
from ase_ray.models.projections import FeatureDims
from ase_ray.models.settings import ModelSettings

WEIGHTS_FILE = "weights.pt"
META_FILE = "model.json"
# 2: ModelSettings.text_pooling (format 1 models pooled their texts by the mean); 3: cmaf_pooled_image (a format
# 2 CMAF over defect maps did not read the map's pooled vector)
FORMAT_VERSION = 3


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside DistributedDataParallel (``.module``) or torch.compile (``._orig_mod``)."""
    for attribute in ("module", "_orig_mod"):
        inner = getattr(model, attribute, None)
        if isinstance(inner, nn.Module):
            return unwrap(inner)
    return model


def save_model(
    model: nn.Module,
    directory: str | Path,
    settings: ModelSettings,
    dims: FeatureDims,
    classes: Sequence[str],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``weights.pt`` and ``model.json`` (settings, dims, classes, align_dim, extra) to ``directory``."""
    bare = unwrap(model)
    if not isinstance(bare, DefectClassifier):
        raise TypeError(f"expected a DefectClassifier, got {type(bare).__name__}")
    if settings != bare.settings or dims != bare.dims or len(classes) != bare.num_classes:
        raise ValueError("settings, dims and classes must be the ones the model was built with")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in bare.state_dict().items()}
    torch.save(state, directory / WEIGHTS_FILE)
    meta = {
        "format": FORMAT_VERSION,
        "settings": settings.model_dump(mode="json"),
        "dims": asdict(dims),
        "classes": [str(c) for c in classes],
        "align_dim": bare.align_dim,
        "extra": extra or {},
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def load_model(
    directory: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[DefectClassifier, dict[str, Any]]:
    """Rebuild the classifier from ``model.json``, load ``weights.pt`` (weights_only) and return it in
    eval mode with the metadata dict. A missing or unreadable file is a DataError naming it."""
    directory = Path(directory)
    for name in (META_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise DataError(f"incomplete saved model: {directory / name} is missing (the model folder holds "
                            f"{sorted(p.name for p in directory.iterdir()) if directory.is_dir() else 'nothing'})")
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except (ValueError, OSError) as exc:
        raise DataError(f"damaged saved model: {directory / META_FILE} is not readable JSON ({exc})") from None
    if meta.get("format", 1) < 2:
        meta["settings"].setdefault("text_pooling", "mean")
    if meta.get("format", 1) < 3:
        meta["settings"].setdefault("cmaf_pooled_image", False)
    model = DefectClassifier(
        ModelSettings.model_validate(meta["settings"]),
        FeatureDims(**meta["dims"]),
        len(meta["classes"]),
        meta.get("align_dim"),
    )
    try:
        state = torch.load(directory / WEIGHTS_FILE, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated or overwritten: torch raises RuntimeError, EOFError, pickle errors
        raise DataError(f"damaged saved model: {directory / WEIGHTS_FILE} cannot be loaded "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    state.setdefault("temperature", torch.ones(()))  # saved before models were calibrated
    model.load_state_dict(state)
    model.to(map_location)
    return model.eval(), meta
