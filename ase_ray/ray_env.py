"""Start or join Ray: a local cluster on loopback by default, an existing one when RAY_ADDRESS is set."""

from __future__ import annotations

import os

from ase_ray.config import RayConfig

WORKER_ENV = {
    "OMP_THREAD_LIMIT": "1",  # tesseract's OpenMP threads fight each other otherwise
    "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
    "TRANSFORMERS_OFFLINE": os.environ.get("TRANSFORMERS_OFFLINE", "1"),
    "TOKENIZERS_PARALLELISM": "false",
}


def ensure_ray(config: RayConfig):
    """Connect once per process; returns the ``ray`` module."""
    import ray

    if ray.is_initialized():
        return ray
    address = config.address or os.environ.get("RAY_ADDRESS")
    env = {**WORKER_ENV, **config.env_vars}
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=config.log_to_driver)
        return ray
    # Without this Ray binds the machine's external address; with it, everything stays on loopback.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(
        num_cpus=config.num_cpus,
        include_dashboard=True,  # needed to clean up placement groups of stopped trainers
        dashboard_host="127.0.0.1",
        runtime_env={"env_vars": env},
        log_to_driver=config.log_to_driver,
        _temp_dir=str(config.temp_dir) if config.temp_dir else None,
    )
    return ray
