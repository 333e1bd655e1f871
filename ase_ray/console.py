"""How much reaches the console: the CLI is quiet by default, ``--verbose`` gives Ray's full output.

Quiet means: our own lines (one per stage, the results) on the console; Ray's, Ray Data's, Ray
Train's, Tune's, Serve's and MLflow's own lines in log files only. Ray workers keep writing their
output to Ray's session log folder (``<session>/logs/worker-*.out|err``, Ray Data's
``ray-data/ray-data.log``), which :func:`announce_logs` names once per process.

:func:`configure_console` is called once, by the CLI callback, before anything imports Ray. Library
use (no call) keeps Ray's defaults: ``log_to_driver`` on, progress bars and INFO logs as Ray has them.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

log = logging.getLogger(__name__)  # ase_ray.console: its own handler, no propagation

# Read by Ray Data / MLflow when they are imported (driver and, inherited, a local cluster's workers);
# an explicit value in the environment wins.
RAY_DATA_LOGGING = Path(__file__).with_name("ray_data_logging.yaml")
QUIET_ENV = {
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_DATA_LOGGING_CONFIG": str(RAY_DATA_LOGGING),  # Ray Data's own config, console handler at ERROR
    "MLFLOW_LOGGING_LEVEL": "ERROR",  # its warnings here are fixed notices (cloudpickle, signatures)
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # "Downloading artifacts" bars when a model loads
}
# Driver-side loggers that are set when already imported, and again when Ray starts (ensure_ray):
# Ray and Serve configure theirs when imported or started, after the CLI callback ran.
# Ray's warnings in a local run are about its own tuning (searcher types, worker counts): errors only.
QUIET_LOGGERS = {
    "ray": logging.ERROR,
    "ray.train": logging.ERROR,
    "ray.tune": logging.ERROR,
    "ray.serve": logging.ERROR,
    "mlflow": logging.ERROR,
    "alembic": logging.WARNING,  # MLflow's database migrations
}

_quiet = False  # set by configure_console
_announced: set[str] = set()


def configure_console(verbose: bool) -> bool:
    """Quiet (``verbose=False``) or full console output for this process; returns whether quiet.

    Quiet: Ray Data progress bars off, Ray Data's console handler, the driver's Ray loggers and
    MLflow's at ERROR, MLflow's download bars off, worker output not forwarded
    (``log_to_driver`` follows, unless ``ray.log_to_driver`` is set), Tune's status tables off.
    This module's logger prints its INFO lines (the log folder) as plain lines on stderr either way."""
    global _quiet
    _quiet = not verbose
    _own_handler()
    if _quiet:
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)
        _quiet_imported_ray_data()
        quiet_loggers()
    return _quiet


def is_quiet() -> bool:
    return _quiet


def log_to_driver(configured: bool | None) -> bool:
    """The effective ``ray.init(log_to_driver=...)``: the config's value, else on unless quiet."""
    return (not _quiet) if configured is None else configured


def ray_init_options(configured_log_to_driver: bool | None) -> dict:
    """Console options of ``ray.init``; verbose (or no CLI) passes Ray's defaults."""
    options: dict = {"log_to_driver": log_to_driver(configured_log_to_driver)}
    if _quiet:
        options["logging_level"] = QUIET_LOGGERS["ray"]
    return options


def tune_verbosity() -> int | None:
    """``tune.RunConfig(verbose=...)``: 0 (no status tables) when quiet, else Tune's default."""
    return 0 if _quiet else None


@contextmanager
def mlflow_prints_off():
    """When quiet: silence what MLflow prints to stderr itself, not through logging (``register_model``'s
    "Registered model ... already exists" / "Created version ..."); a no-op otherwise."""
    if not _quiet:
        yield
        return
    from mlflow.utils.logging_utils import MLFLOW_LOGGING_STREAM

    was = MLFLOW_LOGGING_STREAM.enabled
    MLFLOW_LOGGING_STREAM.enabled = False
    try:
        yield
    finally:
        MLFLOW_LOGGING_STREAM.enabled = was


@contextmanager
def driver_prints_to_log(name: str):
    """When quiet: what the driver prints to stdout meanwhile (Tune's experiment box and paths, Ray's
    raylet notices) goes to ``<session logs>/<name>.log``; yields that path (None when verbose)."""
    if not _quiet:
        yield None
        return
    import tempfile

    import ray

    path = Path(_session_logs(ray) or tempfile.gettempdir()) / f"{name}.log"
    with open(path, "a") as out, redirect_stdout(out):
        yield path


def quiet_loggers() -> None:
    """Raise the driver's Ray / MLflow loggers to QUIET_LOGGERS (when quiet; a no-op otherwise)."""
    if not _quiet:
        return
    for name, level in QUIET_LOGGERS.items():
        logger = logging.getLogger(name)
        if logger.level < level:
            logger.setLevel(level)


def announce_logs(ray) -> str | None:
    """Name Ray's session log folder once per process (where quiet output went); returns it."""
    folder = _session_logs(ray)
    if folder and folder not in _announced:
        _announced.add(folder)
        log.info("logs: %s", folder)
    return folder


def _session_logs(ray) -> str | None:
    try:
        node = ray._private.worker._global_node
        return node.get_logs_dir_path() if node is not None else None
    except Exception:  # a Ray client connection (ray://) has no local node
        return None


def _quiet_imported_ray_data() -> None:
    """Ray Data read its environment when imported: an earlier import gets the settings directly."""
    if "ray.data.context" in sys.modules:
        sys.modules["ray.data.context"].DataContext.get_current().enable_progress_bars = False
    if "ray.data" in sys.modules:
        for handler in logging.getLogger("ray.data").handlers:
            if handler.get_name() == "console":
                handler.setLevel(logging.ERROR)


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (a test runner swaps it between commands)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _own_handler() -> None:
    """Plain ``message`` lines on stderr for this module's logger (once; no propagation to root)."""
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        log.addHandler(_StderrHandler())
    log.setLevel(logging.INFO)
    log.propagate = False
