"""Pixel masks -> the per-cell class targets of a defect map (``ase_ray.models.defect_maps``).

A mask (``mask_path`` in the manifest; any image, non-zero = defect) goes through the same geometry as
its image (``features.image_encoder``: ``resize`` squash or pad to ``image_size``), then each cell of the
stride-16 map gets the image's class where the mask covers more than ``MASK_COVER`` of it and the normal
class elsewhere (the padding included: the map learns that it is not a defect). A row without a mask
gets -1 everywhere (no cell term). Masks are labels: only training rows' targets are ever built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ase_ray.errors import DataError

MASK_COVER = 0.1  # fraction of a cell: a thin crack covers ~10-30% of the 16x16-pixel cells it crosses
STRIDE = 16


def mask_cover(path: str | Path, image_size: int, resize: str) -> np.ndarray:
    """(G, G) float32, G = ceil(image_size / 16): the fraction of each cell the mask covers."""
    try:
        with Image.open(path) as image:
            mask = image.convert("L")
    except (OSError, UnidentifiedImageError) as error:
        raise DataError(f"cannot read the mask {path}: {error}") from error
    grid = -(-image_size // STRIDE)
    canvas = np.zeros((grid * STRIDE, grid * STRIDE), np.float32)
    if resize == "squash":
        w = h = image_size
        top = left = 0
    else:
        scale = image_size / max(mask.size)
        w, h = (max(1, round(side * scale)) for side in mask.size)
        top, left = (image_size - h) // 2, (image_size - w) // 2
    resized = np.asarray(mask.resize((w, h), Image.Resampling.BILINEAR), np.float32)
    canvas[top: top + h, left: left + w] = resized > 127
    return canvas.reshape(grid, STRIDE, grid, STRIDE).mean(axis=(1, 3))


def has_mask(path) -> bool:
    """Whether a ``mask_path`` value names a mask (the store keeps a missing one as "None" or "nan")."""
    return isinstance(path, str) and path.strip() not in ("", "None", "nan")


def cell_targets(mask_paths: Sequence, labels: np.ndarray, normal_index: int | None, image_size: int,
                 resize: str) -> np.ndarray:
    """(N, G, G) int64: each row's cell classes (see the module doc); -1 for a row without a mask, and
    for the cells outside the mask when there is no normal class."""
    grid = -(-image_size // STRIDE)
    out = np.full((len(labels), grid, grid), -1, np.int64)
    background = -1 if normal_index is None else normal_index
    for i, (path, label) in enumerate(zip(mask_paths, labels)):
        if not has_mask(path):
            continue
        defect = mask_cover(path, image_size, resize) > MASK_COVER
        out[i] = background
        if label != normal_index:
            out[i][defect] = label
    return out
