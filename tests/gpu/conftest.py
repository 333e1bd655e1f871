"""Tests in tests/gpu need a CUDA GPU: without one every test here is skipped ("needs a CUDA GPU").

They must run on a CUDA machine that has torch, transformers, numpy, pandas, pillow, pyyaml and
pytest but no Ray, DeepSpeed or MLflow (pydantic comes from wheels, see scripts/gpu_check.sh): so
nothing here or in what these tests import may import those at module level
(tests/unit/test_gpu_imports.py checks it).

Every test in this folder also gets the ``gpu`` marker (on top of its own ``@pytest.mark.gpu``), so
``pytest -m gpu`` selects it, and the ``gpu_device`` fixture gives the device to test on.

``ASE_RAY_GPU_TESTS_DEVICE=cpu`` runs them on the CPU instead: a dry run of the test code only (the
"GPU" and the reference are then the same device), which proves nothing about CUDA.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
DEVICE_ENV = "ASE_RAY_GPU_TESTS_DEVICE"
SKIP_REASON = "needs a CUDA GPU"


def _test_device() -> str | None:
    """The device the tests run on, or None when they must be skipped."""
    if os.environ.get(DEVICE_ENV) == "cpu":
        return "cpu"
    try:
        import torch
    except ImportError:
        return None
    return "cuda" if torch.cuda.is_available() else None


@pytest.hookimpl(tryfirst=True)  # before -m selection, so the added marker counts
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    device = _test_device()
    for item in items:
        if HERE not in Path(item.path).resolve().parents:
            continue
        item.add_marker(pytest.mark.gpu)
        if device is None:
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@pytest.fixture(scope="session")
def gpu_device():
    """``torch.device("cuda")`` (or the CPU in a dry run, see the module docstring)."""
    import torch

    device = _test_device()
    if device is None:  # not reached: the items are skipped
        pytest.skip(SKIP_REASON)
    if device == "cpu":
        # Dry run: torch 2.13's oneDNN bf16 matmul on the CPU returns garbage (NaN) when torch has more
        # threads than OMP_THREAD_LIMIT allows (ase_ray.torch_threads caps them where the project
        # loads models); oneDNN off keeps the bf16 cases safe here whatever the test set up. A CUDA
        # run never runs bf16 on the CPU.
        torch.backends.mkldnn.enabled = False
    return torch.device(device)


@pytest.fixture(scope="session")
def dry_run(gpu_device) -> bool:
    """True when the tests run on the CPU (ASE_RAY_GPU_TESTS_DEVICE=cpu)."""
    return gpu_device.type == "cpu"
