"""MLflow Model Registry: one registered model per task, and the alias that Serve follows.

- ``model_name(task)``: ``ase-ray-multiclass`` / ``ase-ray-binary`` (prefix: ``registry.prefix``).
- ``register_run(config, run_id)`` registers the run's ``model`` as a new version and gives it the alias
  ``champion`` only when it beats the current champion's validation macro-F1 **on the same validation
  data**; otherwise it gets ``challenger`` (the champion stays).
- Same validation data: every training run carries the tag ``ase_ray.val_fingerprint`` (a hash of the
  validation rows' image ids and labels, see :func:`ase_ray.train.data.split_fingerprint`), and every
  version keeps its run's fingerprint and val macro-F1 as version tags. When the champion was scored on
  other validation data, it is re-scored on the new run's validation split, read from the feature
  store (``store``, default: the configured one) after checking that the store's validation split has
  the new run's fingerprint. When that is impossible (no such store, other classes) the two are not
  comparable: the new version becomes challenger and the champion stays (``force=True`` promotes anyway).
- ``resolve_champion_uri(config)``: ``models:/<name>@champion``, checked to exist (for Serve).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ase_ray.config import AppConfig
from ase_ray.console import mlflow_prints_off
from ase_ray.errors import ConfigError, DataError
from ase_ray.tracking import VAL_FINGERPRINT_TAG

DEFAULT_PREFIX = "ase-ray"
METRIC = "final_val_macro_f1"  # logged by fit() on every finished training run
VERSION_METRIC_TAG = "ase_ray.val_macro_f1"
VERSION_FINGERPRINT_TAG = VAL_FINGERPRINT_TAG
DECISION_TAG = "ase_ray.decision"
TASKS = ("binary", "multiclass")


@dataclass
class Registration:
    name: str
    version: str
    alias: str  # registry.champion_alias or registry.challenger_alias
    champion: bool  # this version is the champion now
    run_id: str
    val_macro_f1: float
    reason: str
    previous_champion: str | None = None  # version number
    champion_val_macro_f1: float | None = None  # the previous champion, on the same validation data

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}"

    def text(self) -> str:
        return f"registered {self.name} version {self.version} as @{self.alias}: {self.reason}"


def model_name(task: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The registered model of a task: ``<prefix>-<task>``."""
    return f"{prefix}-{task}"


def champion_uri(config: AppConfig, task: str | None = None) -> str:
    """``models:/<name>@<champion alias>`` for ``task`` (default: ``train.task``); not checked."""
    name = model_name(task or config.train.task, config.registry.prefix)
    return f"models:/{name}@{config.registry.champion_alias}"


def served_model_uri(config: AppConfig) -> str:
    """What Serve and ``ase-ray predict`` load: ``serve.model_uri``, else the task's champion."""
    return config.serve.model_uri or champion_uri(config)


def resolve_champion_uri(config: AppConfig, task: str | None = None) -> str:
    """The champion's ``models:/`` URI; :class:`DataError` when no champion is registered yet."""
    if champion_version(config, task) is None:
        name = model_name(task or config.train.task, config.registry.prefix)
        raise DataError(f"no @{config.registry.champion_alias} version of model {name!r} in the registry at "
                        f"{_tracking_uri(config)}: run `ase-ray tune` or `ase-ray register --run-id RUN` first")
    return champion_uri(config, task)


def champion_version(config: AppConfig, task: str | None = None):
    """The champion's ``ModelVersion`` (None when there is none)."""
    from mlflow.exceptions import MlflowException

    name = model_name(task or config.train.task, config.registry.prefix)
    try:
        return _client(config).get_model_version_by_alias(name, config.registry.champion_alias)
    except MlflowException:
        return None


def register_run(config: AppConfig, run_id: str, task: str | None = None, store: str | Path | None = None,
                 force: bool = False, echo=print) -> Registration:
    """Register ``runs:/<run_id>/model`` and set ``champion`` or ``challenger`` (see the module docstring)."""
    from mlflow.exceptions import MlflowException

    from ase_ray.tracking import lookup_tracking_uri

    if task is not None and task not in TASKS:
        raise ConfigError(f"unknown task {task!r} (valid: {', '.join(TASKS)})")
    if not run_id.strip() or "/" in run_id:
        raise ConfigError(f"--run-id {run_id!r} is not an MLflow run id (the hex id `ase-ray train` prints)")
    lookup_tracking_uri(config)  # nothing to register from a store that does not exist or answer
    client = _client(config)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise DataError(f"no MLflow run {run_id!r} at {_tracking_uri(config)}") from None
    run_task = run.data.params.get("train.task")
    if task is not None and run_task is not None and task != run_task:
        raise DataError(f"run {run_id} trained the {run_task} task, not {task}")
    task = task or run_task or config.train.task
    if METRIC not in run.data.metrics:
        raise DataError(f"run {run_id} has no {METRIC} (status {run.info.status}): only finished training runs "
                        "with a logged model can be registered")
    score = float(run.data.metrics[METRIC])
    fingerprint = run.data.tags.get(VAL_FINGERPRINT_TAG)
    name = model_name(task, config.registry.prefix)
    reg = config.registry
    current = champion_version(config, task)
    found = _version_of_run(client, name, run_id) or _new_version(client, name, run, task, score, fingerprint)
    version = str(found.version)
    before = str(current.version) if current is not None else None
    if before == version:
        decision = Registration(name, version, reg.champion_alias, True, run_id, score, "already the champion")
    elif force:
        decision = Registration(name, version, reg.champion_alias, True, run_id, score, "promoted by hand (force)",
                                before)
    elif current is None:
        decision = Registration(name, version, reg.champion_alias, True, run_id, score, f"first version of {name}")
    else:
        decision = _compare(config, version, run_id, score, fingerprint, current, task, store, echo)
    client.set_registered_model_alias(name, decision.alias, version)
    if decision.champion and _alias_version(client, name, reg.challenger_alias) == version:
        client.delete_registered_model_alias(name, reg.challenger_alias)  # a promoted challenger is not one
    client.set_model_version_tag(name, version, DECISION_TAG, decision.reason)
    client.set_tag(run_id, "ase_ray.registered", f"{name}/{version}@{decision.alias}")
    echo(decision.text())
    return decision


def _compare(config, version, run_id, score, fingerprint, current, task, store, echo) -> Registration:
    """Champion or challenger: the new score against the champion's on the same validation data."""
    reg = config.registry
    name = current.name
    theirs = current.tags.get(VERSION_METRIC_TAG)
    same_data = fingerprint is not None and current.tags.get(VERSION_FINGERPRINT_TAG) == fingerprint
    if same_data and theirs is not None:
        champion_score, basis = float(theirs), f"same validation data ({fingerprint})"
    else:
        champion_score, why_not = _rescore_champion(config, current, fingerprint, task, store)
        if champion_score is None:
            return Registration(name, version, reg.challenger_alias, False, run_id, score,
                                f"not comparable with champion v{current.version}: {why_not}", str(current.version))
        basis = f"champion re-scored on this run's validation data ({fingerprint})"
        echo(f"champion v{current.version} re-scored on the new validation data: macro-F1 {champion_score:.4f}")
    wins = score > champion_score
    alias = reg.champion_alias if wins else reg.challenger_alias
    verdict = "beats" if wins else "does not beat"
    reason = f"val macro-F1 {score:.4f} {verdict} champion v{current.version} ({champion_score:.4f}), {basis}"
    return Registration(name, version, alias, wins, run_id, score, reason, str(current.version), champion_score)


def _rescore_champion(config, current, fingerprint, task, store) -> tuple[float | None, str]:
    from ase_ray.train.data import load_task_rows, split_fingerprint
    from ase_ray.train.evaluate import evaluate
    from ase_ray.train.fit import store_dir

    if fingerprint is None:
        return None, "the run records no validation fingerprint"
    store = str(store) if store is not None else store_dir(config)
    try:
        splits, classes = load_task_rows(store, task, use_augmented=False)  # the rows only: a fingerprint
        if split_fingerprint(splits["val"], classes) != fingerprint:
            return None, f"the validation split of {store} is not the one the run was scored on"
        metrics = evaluate(config, f"models:/{current.name}/{current.version}", store, "val")
    except (DataError, OSError) as exc:
        return None, f"cannot score the champion on {store}: {exc}"
    return float(metrics["macro_f1"]), ""


def _alias_version(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _version_of_run(client, name: str, run_id: str):
    """The version this run was registered as before (registering twice makes no second version)."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException:
        return None
    return sorted(found, key=lambda v: int(v.version))[0] if found else None


def _model_uri(client, run) -> str:
    """``models:/<id>`` of the run's logged model named ``model`` (MLflow 3), else ``runs:/<run>/model``."""
    for output in getattr(run.outputs, "model_outputs", None) or []:
        if client.get_logged_model(output.model_id).name == "model":
            return f"models:/{output.model_id}"
    return f"runs:/{run.info.run_id}/model"


def _new_version(client, name: str, run, task: str, score: float, fingerprint: str | None):
    import mlflow
    from mlflow.exceptions import MlflowException

    run_id = run.info.run_id

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, tags={"ase_ray.task": task},
                                       description=f"ase-ray {task} defect classifier; @champion is served.")
    tags: dict[str, Any] = {VERSION_METRIC_TAG: f"{score:.6f}", "ase_ray.task": task, "ase_ray.run_id": run_id}
    if fingerprint:
        tags[VERSION_FINGERPRINT_TAG] = fingerprint
    try:
        with mlflow_prints_off():
            return mlflow.register_model(_model_uri(client, run), name, tags=tags)
    except MlflowException as exc:
        raise DataError(f"cannot register the model of run {run_id}: {exc}") from None


def _client(config: AppConfig):
    from mlflow.tracking import MlflowClient

    from ase_ray.tracking import setup_mlflow

    setup_mlflow(config)  # the global URI too: mlflow.register_model uses it
    uri = _tracking_uri(config)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _tracking_uri(config: AppConfig) -> str:
    from ase_ray.tracking import tracking_uri

    return tracking_uri(config)
