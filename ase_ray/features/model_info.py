"""Which model each stage runs: what stores, MLflow runs and Serve's /metadata record.

A stage's ``model_id`` is only used by its hub backend (``instructblip``, ``hf``, ``resnet``, ``bert``);
the offline backends load what a package ships, and ``tiny`` builds a random model. So the model that
ran is decided by the backend, never read from ``model_id`` alone. The backend is chosen from the
settings alone (``ase_ray.features.backends``) and the settings are part of every cache key, so
this also holds for outputs served from the cache. Light: no model imports.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

from ase_ray.features.backends import backend, hub_backends

# The backend of each stage that loads ``model_id`` at ``revision`` from the hub (or models_dir).
HUB_BACKENDS = hub_backends()
HUB_ONLY_FIELDS = ("model_id", "revision")  # settings that only the hub backend reads


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
    entry = backend(stage, settings.backend)
    if entry.model is None:
        raise KeyError(f"no model record for {stage} backend {settings.backend!r}")
    source = f"PyPI {entry.package} {package_version(entry.package)}: {entry.what}" if entry.package else entry.what
    return {"backend": settings.backend, "model": entry.model, "source": source}


def package_version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "(not installed)"


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
