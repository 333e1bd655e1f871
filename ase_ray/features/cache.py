"""Content-addressed cache of stage outputs: one ``.npz`` per (stage, input) that never changes.

A key hashes the stage's fingerprint (its settings: backend, model id, revision, prompts) with
the content of its inputs (the image bytes' hash, upstream texts). A re-run finds every unchanged
entry; an interrupted run keeps what it wrote, because each entry is written atomically.
Entries hold numpy arrays and strings only and are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

CACHE_VERSION = "1"  # bump when an output format changes, to orphan old entries
# Per stage, bumped when one stage's outputs change meaning (the others keep their entries). reason 2:
# forward mode pools the prompt's own tokens and has no text; text_encoder 2: entries carry <src>_cut.
STAGE_VERSIONS = {"reason": "2", "text_encoder": "2"}


def fingerprint(stage: str, settings: Any) -> str:
    """Hash of what decides a stage's output: its name, settings (minus how it runs) and format version."""
    body = settings.model_dump(mode="json", exclude={"resources", "device", "timeout_s", "parallel"})
    identity = {"stage": stage, "settings": body, "version": CACHE_VERSION}
    if stage in STAGE_VERSIONS:
        identity["stage_version"] = STAGE_VERSIONS[stage]
    text = json.dumps(identity, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def content_key(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


class StageCache:
    def __init__(self, root: str | Path, stage: str, stage_fingerprint: str):
        self.dir = Path(root) / stage
        self.fingerprint = stage_fingerprint

    def key(self, *inputs: str) -> str:
        return content_key(self.fingerprint, *inputs)

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.npz"

    def get(self, key: str) -> dict[str, Any] | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                return {name: _unwrap(data[name]) for name in data.files}
        except Exception:  # a damaged entry is a miss; it is rewritten
            return None

    def put(self, key: str, values: dict[str, Any]) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **{name: np.asarray(v) for name, v in values.items()})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


class NoCache(StageCache):
    """Keeps nothing: every lookup misses and nothing is written (Serve answers new images; writing
    an entry per request would grow the disk without bound)."""

    def __init__(self, stage: str, stage_fingerprint: str):
        self.dir = None
        self.fingerprint = stage_fingerprint

    def get(self, key: str) -> dict[str, Any] | None:
        return None

    def put(self, key: str, values: dict[str, Any]) -> None:
        return None


def _unwrap(value: np.ndarray) -> Any:
    if value.ndim == 0 and value.dtype.kind == "U":
        return str(value)
    return value
