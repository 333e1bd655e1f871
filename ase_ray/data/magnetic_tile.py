"""Adapter for the Magnetic-tile surface-defect dataset (Huang, Qiu and Yuan, The Visual Computer 2020).

Layout: ``MT_<Class>/Imgs/exp<k>_num_<n>.jpg`` with a pixel mask ``exp<k>_num_<n>.png`` beside each
image. The masks reveal the label (Free masks are empty): the manifest carries them as ``mask_path``, a
training target of the defect maps (reserved: never metadata, never a model input).

Every physical tile was photographed at six exposures whose frame numbers ``n`` are close together,
while different tiles are far apart. Splitting by image would put one tile on both sides of a split,
so images are grouped by frame-number proximity *across all classes* (a few tiles have exposures
filed under two classes): sorted by ``n``, a new group starts where the gap to the previous frame
exceeds ``max_gap``. A group may hold two neighbouring tiles; it never splits one.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from ase_ray.data.manifest import (
    BINARY_LABEL,
    GROUP,
    IMAGE_PATH,
    LABEL,
    MASK_PATH,
    DatasetInfo,
    write_dataset_info,
    write_manifest,
)
from ase_ray.errors import DataError
from ase_ray.outputs import check_output_dir

CLASSES = ("Free", "Blowhole", "Break", "Crack", "Fray", "Uneven")
NORMAL_CLASS = "Free"
_NAME = re.compile(r"^exp(?P<exposure>\d+)_num_(?P<frame>\d+)\.jpg$", re.IGNORECASE)


def scan_magnetic_tile(root: str | Path) -> pd.DataFrame:
    """One row per image: absolute path, class, exposure and frame number."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"Magnetic-tile folder not found: {root}")
    rows = []
    for cls in CLASSES:
        folder = root / f"MT_{cls}" / "Imgs"
        if not folder.is_dir():
            raise DataError(f"Magnetic-tile class folder missing: {folder}")
        for path in sorted(folder.glob("*.jpg")):
            match = _NAME.match(path.name)
            if match is None:
                raise DataError(f"unexpected Magnetic-tile file name (want exp<k>_num_<n>.jpg): {path}")
            rows.append(
                {
                    IMAGE_PATH: str(path),
                    MASK_PATH: str(path.with_suffix(".png")) if path.with_suffix(".png").is_file() else None,
                    LABEL: cls,
                    "exposure": int(match["exposure"]),
                    "frame": int(match["frame"]),
                }
            )
    if not rows:
        raise DataError(f"no images under {root}/MT_*/Imgs")
    return pd.DataFrame(rows)


def group_by_tile(frames: pd.Series, max_gap: int) -> pd.Series:
    """Group ids ``tile_0000``... from frame numbers: a gap over ``max_gap`` starts a new group."""
    order = np.argsort(frames.to_numpy(), kind="stable")
    sorted_frames = frames.to_numpy()[order]
    starts = np.concatenate([[True], np.diff(sorted_frames) > max_gap])
    group_index = np.cumsum(starts) - 1
    groups = np.empty(len(frames), dtype=object)
    groups[order] = [f"tile_{g:04d}" for g in group_index]
    return pd.Series(groups, index=frames.index, name=GROUP)


def build_magnetic_tile_manifest(root: str | Path, max_gap: int) -> pd.DataFrame:
    """Manifest with multi-class ``label``, ``binary_label``, ``group`` (by physical tile) and ``mask_path``.

    ``exposure`` stays as label-free metadata; the frame number is dropped because its ranges differ
    between classes (collection batches) and would leak the label.
    """
    df = scan_magnetic_tile(root)
    df[GROUP] = group_by_tile(df["frame"], max_gap)
    df[BINARY_LABEL] = np.where(df[LABEL] == NORMAL_CLASS, "normal", "defect")
    return df[[IMAGE_PATH, LABEL, BINARY_LABEL, GROUP, MASK_PATH, "exposure"]].reset_index(drop=True)


def import_magnetic_tile(root: str | Path, out_dir: str | Path, max_gap: int) -> pd.DataFrame:
    """Write ``out_dir/manifest.csv`` and ``dataset.yaml``; images stay where they are."""
    out_dir = check_output_dir(Path(out_dir))
    df = build_magnetic_tile_manifest(root, max_gap)
    write_manifest(df, out_dir / "manifest.csv")
    info = DatasetInfo(
        classes=list(CLASSES),
        normal_class=NORMAL_CLASS,
        source="magnetic-tile",
        extra={
            "root": str(Path(root).expanduser().resolve()),
            "group_max_gap": max_gap,
            "domain": "magnetic tile surface image",  # the LLM prompt's {domain}
            "citation": "Huang, Qiu and Yuan, Surface defect saliency of magnetic tile, "
            "The Visual Computer 36 (2020)",
        },
    )
    write_dataset_info(out_dir, info)
    return df
