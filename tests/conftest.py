"""Shared fixtures: small images and manifests made on the fly (no network, no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_THREAD_LIMIT", "1")

REPO = Path(__file__).resolve().parents[1]
MAGNETIC_TILE = (REPO.parent / "shared" / "data" / "magnetic_tile").resolve()


def pytest_configure(config):
    # Tests that run torch without the classifier or a feature stage (which cap it themselves) would
    # otherwise run more torch threads than OpenMP allows: see ase_ray.torch_threads.
    from ase_ray.torch_threads import respect_omp_thread_limit

    respect_omp_thread_limit()


def write_png(path: Path, seed: int = 0, size: tuple[int, int] = (32, 24)) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """tmp/<class>/<n>.png for classes normal (4 images), scratch (3), stain (2)."""
    root = tmp_path / "folder"
    for cls, n in (("normal", 4), ("scratch", 3), ("stain", 2)):
        for i in range(n):
            write_png(root / cls / f"{cls}_{i}.png", seed=hash((cls, i)) % 1000)
    return root


@pytest.fixture
def grouped_frame() -> pd.DataFrame:
    """60 rows, 3 classes, groups of 3 rows of one class each (no files)."""
    rows = []
    for g in range(20):
        label = ["a", "b", "c"][g % 3]
        for k in range(3):
            rows.append({"image_path": f"/x/{g}_{k}.png", "label": label, "group": f"g{g}"})
    return pd.DataFrame(rows)


def synthetic_with_a_corrupt_image(root: Path, scale: float, seed: int) -> Path:
    """A synthetic data set under ``root/synth`` plus one image that does not decode (the errors
    table's row); returns its manifest."""
    from ase_ray.config import load_config
    from ase_ray.data.manifest import write_manifest
    from ase_ray.data.synthetic import generate_synthetic

    cfg = load_config(overrides=[f"data.synth.scale={scale}", f"data.synth.seed={seed}"])
    df = generate_synthetic(cfg.data.synth, root / "synth")
    corrupt = root / "synth" / "images" / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    df = pd.concat([df, pd.DataFrame([{**df.iloc[0].to_dict(), "image_path": str(corrupt)}])], ignore_index=True)
    write_manifest(df, root / "synth" / "manifest.csv")
    return root / "synth" / "manifest.csv"
