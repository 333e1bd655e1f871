"""Which training run an invocation is: a new one every time, or, when asked, one to resume.

Each run has a record under ``<storage_uri or work_dir>/runs/<storage>/<name>/`` (a path or a URI):
the MLflow run it logs into and the settings it started with. ``<storage>`` is a hash of Ray Train's
storage path (a path or a URI), and ``<name>`` the run's Ray Train name,
``<train.run_name>-<UTC time>-<6 hex>`` for a new run. A resume continues the record's Ray Train run
(its latest checkpoint) and MLflow run, with the record's settings; a change the resume cannot honour
stops it with the keys named.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from ase_ray import storage as files
from ase_ray.config import AppConfig, apply_overrides, flatten_config
from ase_ray.errors import ConfigError

RUN_ID_FILE = "mlflow_run_id.txt"
SETTINGS_FILE = "settings.json"
LATEST = "latest"
# Settings that a resume may change: how long to train and how to survive failures.
RESUMABLE_KEYS = ("train.epochs", "train.max_failures", "train.checkpoints_to_keep", "train.checkpoint_every")
# Settings that change the model's parameters (its shape): a checkpoint cannot be loaded across them.
SHAPE_PREFIXES = ("train.task", "train.model.", "train.pfa.enabled", "train.pfa.proj_dim")


@dataclass
class RunPlan:
    name: str  # Ray Train's run name
    record_dir: str  # a path or a URI
    config: AppConfig  # the settings the run trains with (a resume: the record's, plus allowed changes)
    resuming: bool
    mlflow_run_id: str | None  # the run a previous attempt opened


def runs_root(config: AppConfig, storage: str) -> str:
    digest = hashlib.sha256(storage.encode()).hexdigest()[:12]
    return files.storage_location(config, "runs", digest)


def new_run_name(prefix: str) -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def plan_run(config: AppConfig, storage: str, resume: bool | str = False, name: str | None = None) -> RunPlan:
    """``resume``: False (a new run), True or ``"latest"`` (the newest run of this storage) or a run's
    name or MLflow run id. ``name``: a fixed Ray Train name (a Tune trial), continued if its record
    exists: Tune restarts a failed or resumed trial that way."""
    root = runs_root(config, storage)
    if name is not None:
        record = files.join(root, name)
        if files.is_file(files.join(record, SETTINGS_FILE)):
            return _resumed(config, record)
        return RunPlan(name, record, config, False, None)
    if not resume:
        run_name = new_run_name(config.train.run_name)
        return RunPlan(run_name, files.join(root, run_name), config, False, None)
    return _resumed(config, find_record(root, LATEST if resume is True else str(resume)))


def find_record(root: str, wanted: str) -> str:
    records = [p for p in files.list_dirs(root) if files.is_file(files.join(p, SETTINGS_FILE))]
    if not records:
        raise ConfigError(f"no training run to resume in {files.parent(root)} (start one without --resume)")
    started = {p: files.modified(files.join(p, SETTINGS_FILE)) for p in records}
    if wanted == LATEST:
        return max(records, key=started.__getitem__)
    for record in records:
        if wanted in (files.name(record), _run_id(record)):
            return record
    newest = sorted(records, key=started.__getitem__)[-5:]
    raise ConfigError(f"no training run {wanted!r} to resume (the latest: {', '.join(files.name(p) for p in newest)})")


def _run_id(record: str) -> str | None:
    location = files.join(record, RUN_ID_FILE)
    return files.read_text(location).strip() if files.is_file(location) else None


def write_record(plan: RunPlan, mlflow_run_id: str | None, data: dict[str, Any]) -> None:
    """The settings a new run starts with and the data it saw (checked again on resume)."""
    if mlflow_run_id:
        files.write_text(files.join(plan.record_dir, RUN_ID_FILE), mlflow_run_id)
    if not plan.resuming:
        body = {"train": plan.config.train.model_dump(mode="json"), "data": data}
        files.write_text(files.join(plan.record_dir, SETTINGS_FILE), json.dumps(body, indent=2))


def check_same_data(plan: RunPlan, data: dict[str, Any]) -> None:
    if not plan.resuming:
        return
    before = json.loads(files.read_text(files.join(plan.record_dir, SETTINGS_FILE))).get("data", {})
    changed = sorted(k for k in set(before) | set(data) if before.get(k) != data.get(k))
    if changed:
        raise ConfigError(f"cannot resume run {plan.name}: its training data changed ({', '.join(changed)}); "
                          "start a new run without --resume")


def _resumed(config: AppConfig, record: str) -> RunPlan:
    stored = json.loads(files.read_text(files.join(record, SETTINGS_FILE)))["train"]
    given = config.train.model_dump(mode="json")
    explicit = explicit_keys(config.train, "train.")
    changes = {}
    before_flat = flatten_config({"train": stored})
    for key, value in flatten_config({"train": given}).items():
        before = before_flat.get(key)
        if key in explicit and before != value:
            changes[key] = (before, value)
    shape = {k: v for k, v in changes.items() if k.startswith(SHAPE_PREFIXES)}
    other = {k: v for k, v in changes.items() if k not in shape and k not in RESUMABLE_KEYS}
    if shape or other:
        parts = []
        if shape:
            parts.append(f"these change the model's shape: {_describe(shape)}")
        if other:
            parts.append(f"a resume keeps the run's settings, and these differ: {_describe(other)}")
        raise ConfigError(f"cannot resume run {files.name(record)}: {'; '.join(parts)}. Start a new run without "
                          f"--resume to change them (a resume may change only {', '.join(RESUMABLE_KEYS)})")
    allowed = {k: new for k, (_, new) in changes.items()}
    merged = apply_overrides(config, {"train": stored, **allowed})
    return RunPlan(files.name(record), record, merged, True, _run_id(record))


def explicit_keys(model: BaseModel, prefix: str = "") -> set[str]:
    """Dotted keys that a config file or ``--set`` gave (pydantic's fields_set), not defaults."""
    keys: set[str] = set()
    for name in model.model_fields_set:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            keys |= explicit_keys(value, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def _describe(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} (run: {a!r}, given: {b!r})" for k, (a, b) in sorted(changes.items()))
