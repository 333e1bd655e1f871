"""Static files the Serve app ships: the review page (``ase_ray/serve/ui``) and the API docs' Swagger
UI and ReDoc bundles (from the ``fastapi-offline`` package), served from the installed packages so
that ``/ui``, ``/docs`` and ``/redoc`` work without internet. Only the files named here are served."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ase_ray.errors import RequestError

ASSET_PREFIX = "/assets"
_UI = ("review.html", "review.js", "review.css")
_DOCS = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")
MEDIA = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".png": "image/png"}


def asset_path(name: str) -> Path:
    """The file behind ``/assets/<name>``; a 404 for any other name."""
    if name in _UI:
        return Path(str(resources.files("ase_ray.serve") / "ui" / name))
    if name in _DOCS:
        return Path(str(resources.files("fastapi_offline") / "static" / name))
    raise RequestError(404, "not_found", f"no asset {name!r}")


def asset_url(name: str) -> str:
    asset_path(name)  # a typo fails at once, not as a blank page
    return f"{ASSET_PREFIX}/{name}"


def media_type(name: str) -> str:
    return MEDIA.get(Path(name).suffix, "application/octet-stream")
