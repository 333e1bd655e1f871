"""Features of images held in memory (Ray Serve, batch prediction): the pipeline's own stages.

:class:`FeatureExtractor` runs the same :mod:`ase_ray.features.stages` classes (and so the same
backends, prompts and settings) as the Ray Data extraction, in-process and in order, on a batch of
decoded images, and returns the texts per image plus the array columns of the feature store
(``ase_ray.features.store.array_columns``), ready for the classifier. There is no second copy of
the feature code: only where the image comes from (memory instead of ``image_path``) and whether a
disk cache is used differ.

A trained model records the feature settings it was trained on (``features.json`` beside
``model.json``, written from the store's ``store.json``); :func:`features_from_settings` rebuilds
them so that serving extracts exactly what training saw.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from PIL import Image

from ase_ray.features.cache import fingerprint
from ase_ray.features.stages import IMAGE_COLUMN, stage_plan_of

if TYPE_CHECKING:
    from ase_ray.config import FeaturesConfig

STAGE_SECTIONS = ("ocr", "describe", "reason", "image_encoder", "text_encoder")
TEXT_OUTPUTS = ("ocr_text", "ocr_fields", "description", "reasoning", "metadata_text")


# ------------------------------------------------------------------------------------- settings
def feature_settings(features: "FeaturesConfig") -> dict[str, Any]:
    """The five stage sections as JSON (what a store and a model record)."""
    return {name: getattr(features, name).model_dump(mode="json") for name in STAGE_SECTIONS}


def features_from_settings(base: "FeaturesConfig", settings: dict[str, Any] | None) -> "FeaturesConfig":
    """``base`` with its stage sections replaced by recorded ``settings`` (None: ``base`` unchanged)."""
    from ase_ray.config import FeaturesConfig

    if not settings:
        return base
    data = base.model_dump(mode="json")
    data.update({name: settings[name] for name in STAGE_SECTIONS if name in settings})
    return FeaturesConfig.model_validate(data)


def features_key(features: "FeaturesConfig") -> str:
    """Identifies what the stages compute (settings minus resources/devices, like the cache key)."""
    parts = [fingerprint(cls.name, settings) for cls, settings in stage_plan_of(features)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------- decoding
@dataclass
class DecodedImage:
    """An RGB image and its content address (sha256 of the bytes, as in the store's ``image_id``)."""

    image: Image.Image
    image_id: str

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def decode_image_bytes(data: bytes) -> DecodedImage:
    """Decode (fully) and convert to RGB; raises what PIL raises for a bad image."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if img.width == 0 or img.height == 0:
            raise ValueError("image has zero size")
        rgb = img.convert("RGB")
    return DecodedImage(rgb, hashlib.sha256(data).hexdigest())


# ----------------------------------------------------------------------------------- extraction
@dataclass
class ExtractedFeatures:
    """One entry per input image, in order.

    ``texts[i]``: ``ocr_text``, ``ocr_fields`` (dict), ``description``, ``reasoning``;
    ``errors[i]``: ``""`` when fine, else ``"<stage>: <message>"``; ``arrays``: every store array
    column stacked over the images WITHOUT error (``ok`` gives their positions).
    """

    image_ids: list[str]
    texts: list[dict[str, Any]]
    errors: list[str]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> list[int]:
        return [i for i, e in enumerate(self.errors) if not e]

    def row_arrays(self, position: int) -> dict[str, np.ndarray]:
        """The arrays of one image (by its position among the ``ok`` ones)."""
        return {name: values[position] for name, values in self.arrays.items()}


class FeatureExtractor:
    """The extraction stages over in-memory images; backends load once (``load()`` or first use)."""

    def __init__(self, features: "FeaturesConfig", cache_root: str | None = None) -> None:
        from ase_ray.features.hub import resolved_models_dir

        self.features = features
        self.key = features_key(features)
        models_dir = resolved_models_dir(features)
        self.stages = [cls(settings, cache_root, models_dir) for cls, settings in stage_plan_of(features)]

    def ran_models(self) -> dict[str, dict[str, Any]]:
        """Per stage, the model it runs (and its device once loaded): see ``Stage.ran_model``."""
        return {stage.name: stage.ran_model for stage in self.stages}

    def load(self) -> "FeatureExtractor":
        """Load every backend now (a server should pay this at start, not on its first request)."""
        for stage in self.stages:
            stage.backend  # noqa: B018 - the property loads the model
        return self

    def __call__(self, images: list[DecodedImage], metadata_texts: list[str] | None = None) -> ExtractedFeatures:
        """``metadata_texts[i]``: image i's metadata text source (``ase_ray.data.metadata.metadata_text``
        of its record); None: every image has an empty one."""
        from ase_ray.data.metadata import TEXT_COLUMN
        from ase_ray.features.store import OPTIONAL_COLUMNS, array_columns

        if metadata_texts is not None and len(metadata_texts) != len(images):
            raise ValueError(f"{len(images)} images but {len(metadata_texts)} metadata texts")
        batch = pd.DataFrame({
            "row_id": np.arange(len(images), dtype=np.int64),
            "image_id": [d.image_id for d in images],
            "image_path": ["<memory>"] * len(images),
            IMAGE_COLUMN: [d.image for d in images],
            "error_stage": [""] * len(images),
            "error_message": [""] * len(images),
            TEXT_COLUMN: list(metadata_texts) if metadata_texts is not None else [""] * len(images),
        })
        outputs: dict[str, dict[int, dict[str, Any]]] = {}
        for stage in self.stages:
            batch, outputs[stage.name] = stage.run_with_outputs(batch)
        errors = [f"{s}: {m}" if s else "" for s, m in zip(batch["error_stage"], batch["error_message"])]
        ok = [i for i, e in enumerate(errors) if not e]
        arrays = {}
        for column, (stage, entry) in array_columns().items():
            if column in OPTIONAL_COLUMNS and any(entry not in outputs[stage][i] for i in ok):
                continue
            values = [np.asarray(outputs[stage][i][entry]) for i in ok]
            arrays[column] = np.stack(values) if values else np.zeros((0,), np.float32)
        texts = [_texts(batch.iloc[i]) if not errors[i] else {} for i in range(len(images))]
        seconds = {s.name: float(batch[f"t_{s.name}"].sum()) for s in self.stages}
        return ExtractedFeatures([d.image_id for d in images], texts, errors, arrays, seconds)


def _texts(row: pd.Series) -> dict[str, Any]:
    out = {name: str(row.get(name, "")) for name in TEXT_OUTPUTS}
    try:
        out["ocr_fields"] = json.loads(out["ocr_fields"]) if out["ocr_fields"] else {}
    except json.JSONDecodeError:
        out["ocr_fields"] = {}
    return out
