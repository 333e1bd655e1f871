"""``ase-ray tune``: a Ray Tune search over the training of ``ase_ray.train.fit``.

- One trial = a driver function that builds the trial's config (base + the space's ``fixed`` + the sampled
  values) and runs ``fit``, i.e. a ``TorchTrainer``; a ``TuneReportCallback`` (``ase_ray.tune.report``)
  passes every epoch's metrics (``val_macro_f1``, ``epochs_done``...) to Tune, where ASHA stops the weak
  trials early.
- Trials run ``tune.max_concurrent`` at a time (0: the cluster's CPUs // the CPUs of one trial), failed
  trials are retried ``tune.max_failures`` times, and every trial has a deterministic name
  (``trial_000``...) that is also its Ray Train run name: a retried or resumed trial continues from its
  own last checkpoint and logs into the same MLflow run.
- MLflow: one parent run per search (the space, then the best params and metric), one nested child run
  per trial (``mlflow.parentRunId``); the best completed trial is registered (``ase_ray.registry``).
- Files: ``<storage_uri or work_dir>/tune/<name>/`` (a path or a URI: ``ase_ray.storage``) holds
  ``search.json`` (parent run, space), ``config.yaml`` (the base config the trials use), ``trials.md``
  and ``trials.json``; Tune's own state is in ``<ray_results>/tune-<name>`` and the trials' Ray Train
  runs in ``<ray_results>/tune-<name>-trials``.
- ``resume=True`` continues an interrupted search (``tune.name``, else the latest) with the stored base
  config and space: finished trials are kept, unfinished and errored ones run again from their checkpoints.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from ase_ray.config import AppConfig, apply_overrides, dump_config, validate_config
from ase_ray.console import driver_prints_to_log, tune_verbosity
from ase_ray.errors import ConfigError, DataError, SearchError
from ase_ray import storage
from ase_ray.storage import join, parent, storage_location
from ase_ray.tune.space import PIPELINE_SPACE, SearchSpace, load_space, parse_space, plain, trial_config

SEARCH_FILE = "search.json"
CONFIG_FILE = "config.yaml"
LATEST_FILE = "LATEST"
DONE_KEY = "fit_done"  # in the last report of a trial whose fit() returned (model logged)
EPOCHS_KEY = "epochs_done"  # = ase_ray.tune.report.EPOCHS_KEY (that module imports Ray)


@dataclass
class TrialRow:
    trial: str
    params: dict[str, Any]
    status: str  # completed | stopped early | error
    metric: float | None  # tune.metric: the final value (completed) or the last reported one
    val_macro_f1: float | None
    epochs: int  # epochs reported to Tune
    run_id: str | None
    error: str = ""


@dataclass
class SearchResult:
    name: str
    parent_run_id: str
    metric: str
    mode: str
    rows: list[TrialRow]
    best: TrialRow
    table: str
    table_path: str  # a path or a URI
    json_path: str
    registration: Any = None  # ase_ray.registry.Registration


# ------------------------------------------------------------------------------------------- driver
def run_search(config: AppConfig, space_path: str | Path | None = None, resume: bool = False,
               echo=print, space_data: dict[str, Any] | None = None) -> SearchResult:
    """Run (or resume) a search; ``space_data`` gives a space as a mapping instead of a file."""
    from ase_ray.ray_env import ensure_ray

    root = tune_root(config)
    name = _resume_name(config, root) if resume else _new_name(config, root)
    out_dir = join(root, name)
    if resume:
        state = json.loads(storage.read_text(join(out_dir, SEARCH_FILE)))
        base = validate_config(yaml.safe_load(storage.read_text(join(out_dir, CONFIG_FILE))))
        space = parse_space(state["space"], state["space_source"], base)
        check_store(base.train.store_dir)
    else:
        base = _base_config(config, name)
        space = _load(space_path, space_data, base)
        check_store(base.train.store_dir)  # every trial reads it: fail once, before anything starts
        storage.write_text(join(out_dir, CONFIG_FILE), dump_config(base))
        state = {"name": name, "space_source": space.source, "space": space.raw, "created": time.time()}
        _write_state(out_dir, state)
    storage.write_text(join(root, LATEST_FILE), name)
    base = _with_objective(base, space)
    t = base.tune
    num_samples = t.num_samples or space.num_samples or 1
    ray = ensure_ray(config.ray)
    concurrency = t.max_concurrent or derive_concurrency(base, space, ray.cluster_resources(), num_samples)
    parent_run_id = state.get("parent_run_id") or _open_parent(base, name, space, num_samples, concurrency)
    state["parent_run_id"] = parent_run_id
    _write_state(out_dir, state)
    _set_status(base, parent_run_id, "RUNNING")
    echo(f"search {name}: {space.trial_count(num_samples)} trial(s) from {space.source}, {concurrency} at a time, "
         f"ASHA on {t.metric} ({t.mode}); MLflow parent run {parent_run_id}")
    try:
        with driver_prints_to_log(f"ase-ray-tune-{name}"):  # Tune's own box and paths, when quiet
            grid = _tuner(base, space, name, parent_run_id, num_samples, concurrency, resume).fit()
        unfinished = unfinished_trials(grid)
        if unfinished:  # Ctrl-C: Tune saved its state and returned
            _set_status(base, parent_run_id, "KILLED")
            raise SearchError(f"search {name!r} was interrupted with {unfinished} trial(s) unfinished: continue it "
                              f"with `ase-ray tune --resume --set tune.name={name}`")
        rows = _rows(base, grid, parent_run_id)
        result = _finish(base, name, out_dir, space, rows, parent_run_id, echo)
    except SearchError:
        raise
    except BaseException:
        _set_status(base, parent_run_id, "FAILED")
        raise
    _set_status(base, parent_run_id, "FINISHED")
    return result


def unfinished_trials(grid) -> int:
    """Trials an interrupted search left to run. After Ctrl-C Tune marks every trial TERMINATED in memory,
    but the experiment state it saved for ``Tuner.restore`` keeps them PENDING: read that."""
    from ray.tune import ExperimentAnalysis

    saved = ExperimentAnalysis(grid.experiment_path, storage_filesystem=grid.filesystem).trials
    return sum(t.status not in ("TERMINATED", "ERROR") for t in saved)


def tune_root(config: AppConfig) -> str:
    """The searches' files: ``<storage_uri or work_dir>/tune`` (a path or a URI)."""
    return storage_location(config, "tune")


def _new_name(config: AppConfig, root: str) -> str:
    name = config.tune.name or time.strftime("search-%Y%m%d-%H%M%S")
    if storage.exists(join(root, name)):
        raise ConfigError(f"search {name!r} already exists in {join(root, name)}: continue it with "
                          "--resume, or give another --set tune.name=...")
    return name


def _resume_name(config: AppConfig, root: str) -> str:
    latest = join(root, LATEST_FILE)
    name = config.tune.name or (storage.read_text(latest).strip() if storage.is_file(latest) else None)
    if name is None:
        raise ConfigError(f"no search to resume in {root} (set tune.name or start one without --resume)")
    if not storage.is_file(join(root, name, SEARCH_FILE)):
        raise ConfigError(f"no search {name!r} to resume in {root}")
    return name


def _store(config: AppConfig) -> str:
    from ase_ray.train.fit import store_dir

    return storage.resolved(store_dir(config))


def check_store(location: str | Path) -> None:
    """A one-line error when ``location`` (a path or a URI) is not a feature store."""
    from ase_ray.features.store import ERRORS_FILE, FEATURES_FILE, META_FILE

    for name in (FEATURES_FILE, ERRORS_FILE, META_FILE):
        if not storage.exists(join(location, name)):  # the tables are files or folders of shards
            raise DataError(f"not a feature store: {join(location, name)} is missing (run `ase-ray features`, or "
                            "pass --store)")


def _base_config(config: AppConfig, name: str) -> AppConfig:
    """Absolute paths everywhere (Tune runs each trial in its own folder) and the trials' Ray Train root."""
    from ase_ray.train.fit import storage_path

    return apply_overrides(config, {
        "project.work_dir": str(Path(config.project.work_dir).resolve()),
        "train.store_dir": _store(config),
        "train.storage_path": join(storage_path(config), f"tune-{name}-trials"),
        "tune.name": name,
    })


def _experiment_location(base: AppConfig, name: str) -> str:
    """Tune's experiment folder, beside the trials' Ray Train root that _base_config set."""
    return join(parent(base.train.storage_path), f"tune-{name}")


def _load(space_path, space_data, base: AppConfig) -> SearchSpace:
    if space_data is not None:
        return parse_space(space_data, str(space_path or "built-in"), base)
    if space_path is None:
        raise ConfigError("no search space: pass --space tune_spaces/<file>.yaml")
    return load_space(space_path, base)


def _with_objective(base: AppConfig, space: SearchSpace) -> AppConfig:
    values = {k: v for k, v in (("tune.metric", space.metric), ("tune.mode", space.mode)) if v is not None}
    return apply_overrides(base, values) if values else base


def _write_state(out_dir: str, state: dict[str, Any]) -> None:
    storage.write_text(join(out_dir, SEARCH_FILE), json.dumps(state, indent=2, default=str))


def trial_cpus(base: AppConfig, space: SearchSpace) -> float:
    """CPUs one trial holds at most: its workers (the largest setting the space can pick) + its driver."""
    workers = space.largest("train.num_workers", base.train.num_workers)
    per_worker = space.largest("train.cpus_per_worker", base.train.cpus_per_worker)
    return workers * per_worker + base.tune.driver_cpus


def derive_concurrency(base: AppConfig, space: SearchSpace, resources: dict[str, float], num_samples: int) -> int:
    """Trials that fit on the cluster at once (at least 1, at most the number of trials)."""
    fits = math.floor(resources.get("CPU", 1.0) / trial_cpus(base, space) + 1e-9)
    if space.largest("train.use_gpu", base.train.use_gpu):
        workers = space.largest("train.num_workers", base.train.num_workers)
        fits = min(fits, math.floor(resources.get("GPU", 0.0) / workers))
    return max(1, min(fits, space.trial_count(num_samples)))


# ------------------------------------------------------------------------------------------- trials
def trial_name(trial) -> str:
    """``trial_000``...: the counter Tune's default search algorithm puts at the end of the trial id."""
    return f"trial_{int(trial.trial_id.rsplit('_', 1)[-1]):03d}"


def run_trial(params: dict[str, Any], *, base: dict[str, Any], fixed: dict[str, Any], search: str,
              parent_run_id: str) -> None:
    """One trial (runs in a Tune actor): ``fit`` with the sampled params, every epoch reported to Tune."""
    import ray.data
    import ray.tune

    from ase_ray.train.fit import fit
    from ase_ray.tune.report import EpochReportCallback

    ray.data.DataContext.get_current().enable_progress_bars = False  # bars of parallel trials garble the console
    name = ray.tune.get_context().get_trial_name()
    config = trial_config(AppConfig.model_validate(base), fixed, params, {"train.run_name": name})
    tags = {"ase_ray.stage": "tune_trial", "ase_ray.search": search, "ase_ray.trial": name}
    # The trial's own Ray Train run: a retried or resumed trial continues it.
    result = fit(config, tags=tags, parent_run_id=parent_run_id, callbacks=[EpochReportCallback()], run_name=name)
    val = result.metrics["val"]
    ray.tune.report({"val_macro_f1": val["macro_f1"], "val_accuracy": val["accuracy"],
                     "test_macro_f1": result.metrics["test"]["macro_f1"], "mlflow_run_id": result.run_id,
                     EPOCHS_KEY: config.train.epochs, DONE_KEY: 1})


def scheduler(base: AppConfig, space: SearchSpace):
    """ASHA on ``tune.metric`` over epochs trained (``epochs_done``, right after a resume too). Its rungs
    stay below the last epoch (``max_t`` = epochs - 1), so that no trial is stopped once its training is
    done; when trials are no longer than the grace period there is nothing to stop early: FIFO."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    t = base.tune
    epochs = int(space.largest("train.epochs", base.train.epochs))
    if epochs <= t.grace_period:
        return FIFOScheduler()
    return ASHAScheduler(time_attr=EPOCHS_KEY, max_t=epochs - 1, grace_period=t.grace_period,
                         reduction_factor=t.reduction_factor, stop_last_trials=False)


def _tuner(base: AppConfig, space: SearchSpace, name: str, parent_run_id: str, num_samples: int,
           concurrency: int, resume: bool):
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    t = base.tune
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base.model_dump(mode="json"), fixed=space.fixed, search=name,
                             parent_run_id=parent_run_id),
        {"CPU": t.driver_cpus},
    )
    experiment = _experiment_location(base, name)
    if resume and tune.Tuner.can_restore(experiment):
        return tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=space.param_space(),
        tune_config=tune.TuneConfig(
            metric=t.metric, mode=t.mode, scheduler=scheduler(base, space), num_samples=num_samples,
            max_concurrent_trials=concurrency, search_alg=BasicVariantGenerator(random_state=base.project.seed),
            trial_name_creator=trial_name, trial_dirname_creator=trial_name,
        ),
        run_config=tune.RunConfig(name=f"tune-{name}", storage_path=parent(experiment),
                                  failure_config=tune.FailureConfig(max_failures=t.max_failures),
                                  verbose=tune_verbosity()),
    )


# ------------------------------------------------------------------------------------------ results
def _rows(base: AppConfig, grid, parent_run_id: str) -> list[TrialRow]:
    children = _child_runs(base, parent_run_id)
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        name = Path(result.path).name
        run = children.get(name)
        run_id = metrics.get("mlflow_run_id") or (run.info.run_id if run else None)
        if result.error is not None:
            status = "error"
        elif metrics.get(DONE_KEY):
            status = "completed"
        else:
            status = "stopped early"
        value = metrics.get(base.tune.metric)
        rows.append(TrialRow(
            trial=name, params={k: plain(v) for k, v in (result.config or {}).items()}, status=status,
            metric=None if value is None else float(value),
            val_macro_f1=None if metrics.get("val_macro_f1") is None else float(metrics["val_macro_f1"]),
            epochs=int(metrics.get(EPOCHS_KEY, 0)), run_id=run_id,
            error=_one_line(result.error) if result.error is not None else "",
        ))
        if run is not None and run.info.status == "RUNNING" and status != "completed":
            _set_status(base, run.info.run_id, "KILLED" if status == "stopped early" else "FAILED")
    return sorted(rows, key=lambda r: r.trial)


def _child_runs(base: AppConfig, parent_run_id: str) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    from ase_ray.tracking import tracking_uri

    client = MlflowClient(tracking_uri(base))
    experiment = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return {r.data.tags.get("ase_ray.trial", r.info.run_name): r for r in runs}


def best_row(rows: list[TrialRow], mode: str) -> TrialRow | None:
    done = [r for r in rows if r.status == "completed" and r.metric is not None and r.run_id]
    if not done:
        return None
    return (max if mode == "max" else min)(done, key=lambda r: r.metric)


def _finish(base: AppConfig, name: str, out_dir: str, space: SearchSpace, rows: list[TrialRow],
            parent_run_id: str, echo) -> SearchResult:
    t = base.tune
    best = best_row(rows, t.mode)
    table = results_table(name, rows, best, t.metric, [p.path for p in space.params])
    table_path, json_path = join(out_dir, "trials.md"), join(out_dir, "trials.json")
    storage.write_text(table_path, table)
    payload = {"search": name, "metric": t.metric, "mode": t.mode, "parent_run_id": parent_run_id,
               "space": space.raw, "trials": [asdict(r) for r in rows], "best": asdict(best) if best else None}
    storage.write_text(json_path, json.dumps(payload, indent=2, default=str))
    echo(table)
    if best is None:
        _log_parent(base, parent_run_id, None, [table_path, json_path])
        _set_status(base, parent_run_id, "FAILED")
        raise SearchError(f"no trial of search {name!r} completed (table: {table_path}; trial logs under "
                          f"{_experiment_location(base, name)})")
    registration = None
    if t.register_best:
        from ase_ray.registry import register_run

        registration = register_run(base, best.run_id, echo=echo)
        payload["registration"] = asdict(registration)
        storage.write_text(json_path, json.dumps(payload, indent=2, default=str))
    _log_parent(base, parent_run_id, best, [table_path, json_path], registration)
    return SearchResult(name, parent_run_id, t.metric, t.mode, rows, best, table, table_path, json_path, registration)


def results_table(name: str, rows: list[TrialRow], best: TrialRow | None, metric: str, paths: list[str]) -> str:
    head = ["trial", *paths, metric, "epochs", "status", "MLflow run"]
    lines = [f"Search {name}: {len(rows)} trial(s).", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for r in rows:
        mark = " (best)" if best is not None and r.trial == best.trial else ""
        cells = [r.trial + mark, *[_fmt(r.params.get(p)) for p in paths], _fmt(r.metric), str(r.epochs),
                 r.status + (f": {r.error}" if r.error else ""), r.run_id or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    if best is not None:
        lines += ["", f"best: {best.trial} ({metric} {best.metric:.4f}), "
                      + ", ".join(f"{p}={_fmt(best.params.get(p))}" for p in paths) + f", run {best.run_id}"]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if 1e-3 <= abs(value) < 1e4 or value == 0 else f"{value:.3g}"
    return str(value)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[-1] if text else type(error).__name__)[:200]


# ------------------------------------------------------------------------------------------- MLflow
def _open_parent(base: AppConfig, name: str, space: SearchSpace, num_samples: int, concurrency: int) -> str:
    from ase_ray.tracking import safe_params, setup_mlflow

    mlflow = setup_mlflow(base)
    t = base.tune
    params = {"tune.name": name, "tune.space": space.source, "tune.num_samples": num_samples,
              "tune.max_concurrent": concurrency, "tune.metric": t.metric, "tune.mode": t.mode,
              "tune.grace_period": t.grace_period, "tune.reduction_factor": t.reduction_factor,
              "tune.max_failures": t.max_failures, "train.task": base.train.task,
              **{f"space.{p.path}": p.describe() for p in space.params},
              **{f"fixed.{k}": v for k, v in space.fixed.items()}}
    with mlflow.start_run(run_name=f"tune {name}", tags={"ase_ray.stage": "tune", "ase_ray.search": name}) as run:
        mlflow.log_params(safe_params(params))
        mlflow.log_dict(space.raw, "search_space.yaml")
    return run.info.run_id


def _log_parent(base: AppConfig, parent_run_id: str, best: TrialRow | None, files: list[str],
                registration=None) -> None:
    from ase_ray.tracking import safe_params, setup_mlflow

    mlflow = setup_mlflow(base)
    client = mlflow.tracking.MlflowClient()
    existing = client.get_run(parent_run_id).data.params
    for location in files:
        client.log_text(parent_run_id, storage.read_text(location), storage.name(location))
    if best is None:
        return
    params = safe_params({f"best.{k}": v for k, v in best.params.items()})
    for key, value in params.items():
        if key not in existing:  # a resumed search may log them again: MLflow refuses a changed param
            client.log_param(parent_run_id, key, value)
    client.log_metric(parent_run_id, f"best_{base.tune.metric}", best.metric)
    if best.val_macro_f1 is not None and base.tune.metric != "val_macro_f1":
        client.log_metric(parent_run_id, "best_val_macro_f1", best.val_macro_f1)
    tags = {"ase_ray.best_trial": best.trial, "ase_ray.best_run_id": best.run_id}
    if registration is not None:
        tags.update({"ase_ray.registered_model": registration.name, "ase_ray.registered_version": registration.version,
                     "ase_ray.registered_alias": registration.alias})
    for key, value in tags.items():
        client.set_tag(parent_run_id, key, value)


def _set_status(base: AppConfig, run_id: str, status: str) -> None:
    from mlflow.tracking import MlflowClient

    from ase_ray.tracking import tracking_uri

    client = MlflowClient(tracking_uri(base))
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, status)


def pipeline_space() -> dict[str, Any]:
    """The built-in small space of ``ase-ray pipeline`` (a copy)."""
    return json.loads(json.dumps(PIPELINE_SPACE))
