"""The GPU tests (tests/gpu) must run on a CUDA machine that has torch, transformers, numpy, pandas,
pillow, pyyaml and pytest (pydantic from wheels, scripts/gpu_check.sh) but no Ray, DeepSpeed or
MLflow. This runs them here, on the CPU (their dry-run mode), in a Python that cannot import those
(nor scikit-learn, SciPy or pyarrow, which that machine does not promise either): any module-level or
lazy import of them on the way fails the run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BLOCKED = ("ray", "deepspeed", "mlflow", "sklearn", "scikit_learn", "scipy", "pyarrow")
# The modules written to run on the GPU machine without scikit-learn, SciPy or pyarrow.
GPU_TESTS = ("tests/gpu/test_gpu_stages.py", "tests/gpu/test_gpu_serve.py")
# The training loop's test uses the loop's metrics (scikit-learn) and a Parquet store (pyarrow), which
# the H200 image has (device KINDS.md): it is held to the Ray/DeepSpeed/MLflow list only.
TRAIN_TEST, TRAIN_BLOCKED = "tests/gpu/test_gpu_train.py", BLOCKED[:3]


def blocked(entry: str, names: tuple[str, ...] = BLOCKED) -> bool:
    name = re.split(r"[-.]", entry, maxsplit=1)[0].lower().replace("-", "_")
    return any(name == b or name.startswith(b + "_") for b in names) or entry.endswith(".pth") \
        or entry.startswith("__editable__")


def site_without_blocked(target: Path, names: tuple[str, ...] = BLOCKED) -> Path:
    """A folder of links to this environment's packages, minus the blocked ones (and .pth files)."""
    target.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in sorted(os.listdir(site)):
        if not blocked(entry, names):
            (target / entry).symlink_to(site / entry)
    return target


def test_blocked_names() -> None:
    assert blocked("ray") and blocked("ray-2.60.0.dist-info") and blocked("mlflow_skinny-3.17.2.dist-info")
    assert blocked("scikit_learn-1.9.1.dist-info") and blocked("sklearn") and blocked("pyarrow")
    assert not blocked("rapidocr") and not blocked("raylib") and not blocked("torch") and not blocked("pydantic")


def _dry_run(tmp_path: Path, tests: tuple[str, ...], names: tuple[str, ...]) -> None:
    site = site_without_blocked(tmp_path / "site", names)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=f"{REPO}{os.pathsep}{site}", ASE_RAY_GPU_TESTS_DEVICE="cpu", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    check = "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in %r))" % (names[:4],)
    assert subprocess.run([sys.executable, "-S", "-c", check], env=env, cwd=REPO).returncode == 0, \
        "the blocked packages are still importable"
    run = subprocess.run(
        [sys.executable, "-S", "-m", "pytest", *tests, "-m", "gpu", "-q", "-p", "no:cacheprovider"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "error" not in run.stdout.lower().split("short test summary")[-1]


def test_gpu_tests_run_without_ray_deepspeed_mlflow(tmp_path: Path) -> None:
    _dry_run(tmp_path, GPU_TESTS, BLOCKED)


def test_gpu_training_test_runs_without_ray_deepspeed_mlflow(tmp_path: Path) -> None:
    _dry_run(tmp_path, (TRAIN_TEST,), TRAIN_BLOCKED)
