"""The quiet console (ase_ray.console): what configure_console sets, and that Ray reads it."""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml

from ase_ray import console
from ase_ray.config import RayConfig
from tests.unit.test_cli import run


@pytest.fixture
def fresh_console(monkeypatch):
    """configure_console changes process-wide state: put it all back after the test."""
    from ray.data import DataContext

    env = {key: os.environ.get(key) for key in console.QUIET_ENV}
    for key in console.QUIET_ENV:
        os.environ.pop(key, None)
    levels = {name: logging.getLogger(name).level for name in console.QUIET_LOGGERS}
    ray_data_handlers = [(h, h.level) for h in logging.getLogger("ray.data").handlers]
    own = (list(console.log.handlers), console.log.level, console.log.propagate)
    ctx = DataContext.get_current()
    bars = ctx.enable_progress_bars
    ctx.enable_progress_bars = True  # Ray's default: an earlier in-process CLI call may have turned it off
    monkeypatch.setattr(console, "_quiet", False)
    monkeypatch.setattr(console, "_announced", set())
    yield ctx
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    for handler, level in ray_data_handlers:
        handler.setLevel(level)
    console.log.handlers[:] = own[0]
    console.log.setLevel(own[1])
    console.log.propagate = own[2]
    ctx.enable_progress_bars = bars


def test_library_use_keeps_rays_defaults(fresh_console):
    assert RayConfig().log_to_driver is None  # "follow the console"
    assert not console.is_quiet()
    assert console.ray_init_options(None) == {"log_to_driver": True}
    assert console.tune_verbosity() is None


def test_quiet_console_sets_the_knobs(fresh_console):
    assert console.configure_console(verbose=False) is True
    assert fresh_console.enable_progress_bars is False  # ray.data was imported first: set directly
    assert os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1"
    assert os.environ["RAY_DATA_LOGGING_CONFIG"] == str(console.RAY_DATA_LOGGING)
    assert os.environ["MLFLOW_LOGGING_LEVEL"] == "ERROR"
    for name in ("ray", "ray.train", "ray.tune", "ray.serve", "mlflow"):
        assert logging.getLogger(name).level == logging.ERROR, name
    ray_data_console = [h for h in logging.getLogger("ray.data").handlers if h.get_name() == "console"]
    assert ray_data_console and all(h.level == logging.ERROR for h in ray_data_console)
    # the effective ray.init options of the default RayConfig; an explicit setting still wins
    assert console.ray_init_options(RayConfig().log_to_driver) == {
        "log_to_driver": False, "logging_level": logging.ERROR}
    assert console.log_to_driver(True) is True
    assert console.tune_verbosity() == 0


def test_verbose_console_leaves_ray_alone(fresh_console):
    ray_level = logging.getLogger("ray").level
    assert console.configure_console(verbose=True) is False
    assert fresh_console.enable_progress_bars is True
    assert not any(key in os.environ for key in console.QUIET_ENV)
    assert logging.getLogger("ray").level == ray_level
    assert console.ray_init_options(RayConfig().log_to_driver) == {"log_to_driver": True}
    assert console.log_to_driver(False) is False
    assert console.tune_verbosity() is None


def test_an_explicit_environment_wins(fresh_console):
    os.environ["MLFLOW_LOGGING_LEVEL"] = "DEBUG"
    console.configure_console(verbose=False)
    assert os.environ["MLFLOW_LOGGING_LEVEL"] == "DEBUG"


def test_the_log_folder_is_named_once(fresh_console, capsys):
    node = SimpleNamespace(get_logs_dir_path=lambda: "/tmp/ray/session_x/logs")
    ray = SimpleNamespace(_private=SimpleNamespace(worker=SimpleNamespace(_global_node=node)))
    console.configure_console(verbose=False)
    assert console.announce_logs(ray) == "/tmp/ray/session_x/logs"
    console.announce_logs(ray)
    assert capsys.readouterr().err.splitlines() == ["logs: /tmp/ray/session_x/logs"]
    no_node = SimpleNamespace(_private=SimpleNamespace(worker=SimpleNamespace(_global_node=None)))
    assert console.announce_logs(no_node) is None


def test_ray_data_logging_config_is_rays_own_with_a_quieter_console():
    from ray.data._internal.logging import DEFAULT_CONFIG

    expected = copy.deepcopy(DEFAULT_CONFIG)
    expected["handlers"]["console"]["level"] = "ERROR"
    assert yaml.safe_load(console.RAY_DATA_LOGGING.read_text()) == expected


PROBE = """
import json, logging
from ase_ray.console import configure_console
configure_console(verbose=False)
import mlflow, ray.data
handlers = {h.get_name(): logging.getLevelName(h.level) for h in logging.getLogger("ray.data").handlers}
print(json.dumps({"bars": ray.data.DataContext.get_current().enable_progress_bars, "ray_data": handlers,
                  "mlflow": logging.getLevelName(logging.getLogger("mlflow").getEffectiveLevel())}))
"""


def test_ray_data_and_mlflow_imported_later_read_the_quiet_settings():
    env = {k: v for k, v in os.environ.items() if k not in console.QUIET_ENV}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"bars": False, "ray_data": {"file": "NOTSET", "console": "ERROR"}, "mlflow": "ERROR"}


def test_verbose_is_a_global_option_of_the_cli():
    assert "--verbose" in run("--help").stdout
    result = run("--verbose", "config", "show", "--flat", "--set", "project.seed=9")
    assert result.returncode == 0, result.stderr
    assert "project.seed=9" in result.stdout.splitlines()
    assert "ray.log_to_driver=null" in result.stdout.splitlines()


def test_driver_prints_go_to_a_log_file_when_quiet(fresh_console, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(console, "_session_logs", lambda ray: str(tmp_path))
    with console.driver_prints_to_log("tune-x") as path:
        print("verbose passes it through")
    assert path is None and "verbose passes it through" in capsys.readouterr().out
    console.configure_console(verbose=False)
    with console.driver_prints_to_log("tune-x") as path:
        print("Configuration for experiment")
    assert path == tmp_path / "tune-x.log" and path.read_text() == "Configuration for experiment\n"
    assert capsys.readouterr().out == ""


def test_mlflow_prints_are_off_only_when_quiet(fresh_console, capsys):
    from mlflow.utils.logging_utils import eprint

    with console.mlflow_prints_off():
        eprint("Created version '1'")
    assert "Created version" in capsys.readouterr().err
    console.configure_console(verbose=False)
    with console.mlflow_prints_off():
        eprint("Created version '2'")
    eprint("after")
    assert capsys.readouterr().err == "after\n"


def test_the_pipeline_shows_a_stage_table_as_its_first_and_last_lines_when_quiet(fresh_console):
    from ase_ray.pipeline import _brief

    seen: list[str] = []
    assert _brief(seen.append) == seen.append
    console.configure_console(verbose=False)
    brief = _brief(seen.append)
    brief("Search s: 2 trial(s).\n\n| trial |\n|---|\n| t0 |\n\nbest: t0\n")
    brief("one line")
    assert seen == ["Search s: 2 trial(s).\nbest: t0", "one line"]
