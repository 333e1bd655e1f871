"""Content-addressed cache of stage outputs, as Parquet shards that work on a disk or on object storage.

Layout: ``<cache>/<stage>/<fingerprint[:16]>/part-<time>-<random>.parquet``, each shard a table of
``key`` (string) and ``value`` (binary: the outputs as an ``.npz``, read with ``allow_pickle=False``).
A key hashes the stage's fingerprint (its settings: backend, model id, revision, prompts) with the
content of its inputs (the image bytes' hash, upstream texts), so an entry never changes.

Why shards and not a file per entry, nor a key-value library: a million images would make six million
small files (slow on any file system, and a request each on S3), and a database would be one more
service to run beside Ray. A stage writes one shard per batch, new and never rewritten, so:
- an interrupted run keeps every batch it finished (a shard is whole or absent: written beside and
  renamed on a disk, one PUT on S3), and the rerun computes only the rest;
- two runs at once on one cache never write the same file (at worst both compute a row, and the key
  then has two equal entries; the first found is used);
- the lookup reads only the ``key`` column of the stage's shards (an index of 64 bytes an entry, built
  once per actor and refreshed for new shards on a miss) and then only the hit rows' values, before the
  model is loaded: a run served wholly from the cache never loads a model.
A shard that cannot be read (truncated, overwritten) is skipped with a warning: its rows are misses and
are computed and written again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import uuid
from typing import Any

import numpy as np

from ase_ray import storage

logger = logging.getLogger(__name__)

CACHE_VERSION = "2"  # bump when an output format changes, to orphan old entries (2: Parquet shards)
# Per stage, bumped when one stage's outputs change meaning (the others keep their entries). reason 2:
# forward mode pools the prompt's own tokens and has no text; text_encoder 2: entries carry <src>_cut.
STAGE_VERSIONS = {"reason": "2", "text_encoder": "2"}
SHARD_SUFFIX = ".parquet"
# Settings added after caches were written, at the value that reproduces the earlier output: at that value
# they stay out of the key, so those caches stay valid.
ADDED_SETTINGS = {"reason": {"cpu_int8": False}}


def fingerprint(stage: str, settings: Any) -> str:
    """Hash of what decides a stage's output: its name, settings (minus how it runs) and format version."""
    body = settings.model_dump(mode="json", exclude={"resources", "device", "timeout_s", "parallel", "engine"})
    for name, earlier in ADDED_SETTINGS.get(stage, {}).items():
        if body.get(name) == earlier:
            del body[name]
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


def pack(values: dict[str, Any]) -> bytes:
    """Outputs as ``.npz`` bytes (arrays and strings only)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.asarray(v) for name, v in values.items()})
    return buffer.getvalue()


def unpack(data: bytes) -> dict[str, Any]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {name: _unwrap(npz[name]) for name in npz.files}


class StageCache:
    """One stage's entries under one fingerprint (see the module's docstring)."""

    def __init__(self, root: str, stage: str, stage_fingerprint: str):
        self.dir = storage.join(storage.resolved(root), stage, stage_fingerprint[:16])
        self.fingerprint = stage_fingerprint
        self._index: dict[str, str] = {}  # key -> shard
        self._indexed: set[str] = set()  # shards read (or found unreadable)

    def key(self, *inputs: str) -> str:
        return content_key(self.fingerprint, *inputs)

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        """The packed outputs of the ``keys`` that have an entry."""
        wanted = set(keys)
        if wanted - self._index.keys():
            self._refresh()
        by_shard: dict[str, list[str]] = {}
        for key in wanted & self._index.keys():
            by_shard.setdefault(self._index[key], []).append(key)
        found: dict[str, bytes] = {}
        for shard, shard_keys in by_shard.items():
            found.update(self._read_values(shard, shard_keys))
        return found

    def get(self, key: str) -> dict[str, Any] | None:
        packed = self.get_many([key]).get(key)
        return None if packed is None else unpack(packed)

    def put_many(self, entries: dict[str, bytes]) -> str | None:
        """Write ``{key: packed outputs}`` as one new shard; returns it (None when there was nothing)."""
        if not entries:
            return None
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"key": pa.array(list(entries), pa.string()),
                          "value": pa.array(list(entries.values()), pa.binary())})
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        shard = storage.join(self.dir, f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:12]}{SHARD_SUFFIX}")
        storage.write_bytes(shard, buffer.getvalue())
        self._indexed.add(shard)
        for key in entries:
            self._index.setdefault(key, shard)
        return shard

    def put(self, key: str, values: dict[str, Any]) -> None:
        self.put_many({key: pack(values)})

    def shards(self) -> list[str]:
        return storage.list_files(self.dir, SHARD_SUFFIX)

    def _refresh(self) -> None:
        """Index the shards written since the last look (by this actor or by any other run)."""
        import pyarrow.parquet as pq

        for shard in self.shards():
            if shard in self._indexed:
                continue
            self._indexed.add(shard)
            try:
                fs, path = storage.filesystem(shard)
                keys = pq.read_table(path, columns=["key"], filesystem=fs)["key"].to_pylist()
            except Exception as exc:  # noqa: BLE001 - a damaged shard is a miss for its rows
                logger.warning("cache shard %s is not readable (%s): its entries are computed again", shard,
                               type(exc).__name__)
                continue
            for key in keys:
                self._index.setdefault(key, shard)

    def _read_values(self, shard: str, keys: list[str]) -> dict[str, bytes]:
        import pyarrow.parquet as pq

        try:
            fs, path = storage.filesystem(shard)
            table = pq.read_table(path, filesystem=fs)
        except Exception as exc:  # noqa: BLE001 - vanished or damaged since it was indexed: misses
            logger.warning("cache shard %s could not be read (%s): its entries are computed again", shard,
                           type(exc).__name__)
            for key in keys:
                self._index.pop(key, None)
            return {}
        wanted = set(keys)
        out = {}
        for key, value in zip(table["key"].to_pylist(), table["value"].to_pylist()):
            if key in wanted and key not in out:
                out[key] = value
        return out


class NoCache(StageCache):
    """Keeps nothing: every lookup misses and nothing is written (Serve answers new images; writing
    an entry per request would grow the storage without bound)."""

    def __init__(self, stage: str, stage_fingerprint: str):
        self.dir = None
        self.fingerprint = stage_fingerprint

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        return {}

    def put_many(self, entries: dict[str, bytes]) -> str | None:
        return None

    def shards(self) -> list[str]:
        return []


def _unwrap(value: np.ndarray) -> Any:
    if value.ndim == 0 and value.dtype.kind == "U":
        return str(value)
    return value
