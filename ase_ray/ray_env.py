"""Start or join Ray: a local cluster on loopback by default, an existing one when RAY_ADDRESS is set."""

from __future__ import annotations

import os
import sys

from ase_ray import console
from ase_ray.config import RayConfig

WORKER_ENV = {
    "OMP_THREAD_LIMIT": "1",  # tesseract's OpenMP threads fight each other otherwise
    "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
    "TRANSFORMERS_OFFLINE": os.environ.get("TRANSFORMERS_OFFLINE", "1"),
    "TOKENIZERS_PARALLELISM": "false",
    # Ray Train's controller takes a worker's report (a queue of one) when it polls, every 2 s by default,
    # so an epoch shorter than that waited for the poll: 2 s an epoch on the demo's 0.3-0.9 s epochs.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
}


JOB_RUNTIME_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in the driver of a submitted job


def ensure_ray(config: RayConfig):
    """Connect once per process; returns the ``ray`` module. The console options (``log_to_driver``,
    the driver's log level) follow :mod:`ase_ray.console`; the log folder is named once."""
    address = config.address or os.environ.get("RAY_ADDRESS")
    if not address:
        _keep_on_loopback()
    import ray

    if not ray.is_initialized():
        _init(ray, config, address)
    console.quiet_loggers()  # Ray, Train, Tune and Serve set theirs when imported or started
    console.announce_logs(ray)
    return ray


def _init(ray, config: RayConfig, address: str | None) -> None:
    options = console.ray_init_options(config.log_to_driver)
    env = {**WORKER_ENV, **config.env_vars}
    if os.environ.get(JOB_RUNTIME_ENV_VAR):
        # A driver of `ray job submit`: the job's runtime_env (jobs/runtime_env.yaml) is the workers'
        # environment, and Ray refuses a second one that sets the same variables.
        ray.init(address=address or "auto", **options)
    elif address:
        ray.init(address=address, runtime_env={"env_vars": env}, **options)
    else:
        ray.init(
            num_cpus=config.num_cpus,
            include_dashboard=True,  # needed to clean up placement groups of stopped trainers
            dashboard_host="127.0.0.1",
            runtime_env={"env_vars": env},
            _temp_dir=str(config.temp_dir) if config.temp_dir else None,
            **options,
        )


def _keep_on_loopback() -> None:
    """A local Ray binds the machine's external address unless this is off; the child processes
    (GCS, raylet, dashboard) read the variable, and this process reads it when ``ray`` is imported,
    so a ``ray`` imported earlier gets the constant set directly."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False
