"""One local Ray per test session (starting Ray costs ~5-15 s and ~0.7 GB)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    from ase_ray.config import RayConfig
    from ase_ray.ray_env import ensure_ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    ray = ensure_ray(RayConfig(num_cpus=2, log_to_driver=False))
    yield ray
    ray.shutdown()
