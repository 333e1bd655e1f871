"""Where runs keep what other nodes must see: a local path, a shared mount or a URI (s3://...)."""

from __future__ import annotations

from pathlib import Path

from ase_ray.config import AppConfig


def is_uri(location: str) -> bool:
    return "://" in location


def storage_location(config: AppConfig, *parts: str) -> str:
    """``project.storage_uri`` (or ``work_dir`` when unset) joined with ``parts``: a URI stays a
    URI (Ray and MLflow open it through their filesystem layers), a path becomes absolute."""
    base = config.project.storage_uri
    if base is None:
        return join(str(Path(config.project.work_dir).resolve()), *parts)
    return join(base if is_uri(base) else str(Path(base).resolve()), *parts)


def join(location: str, *parts: str) -> str:
    """``location`` (a path or a URI) with ``parts`` appended."""
    if is_uri(location):
        return "/".join([location.rstrip("/"), *parts])
    return str(Path(location).joinpath(*parts))


def parent(location: str) -> str:
    """The folder above ``location`` (a path or a URI)."""
    if is_uri(location):
        return location.rstrip("/").rsplit("/", 1)[0]
    return str(Path(location).parent)


def as_uri(location: str) -> str:
    """A URI for MLflow's artifact locations (a plain path becomes file://...)."""
    return location if is_uri(location) else Path(location).resolve().as_uri()
