"""Task-specific data augmentation (TDA): new training images with pink dots at plausible positions.

AOI images carry pink dot markers where the inspection machine flagged something, and where the
dots sit differs by class. TDA (Hsu et al. 2024) fits, per class, a bivariate Gaussian to the dot
positions of the *train* split (normalised by image width/height), then makes new images: take a
train image of the class, erase its dots, draw k new dots (k drawn from the class's empirical
dots-per-image distribution) at positions sampled from the Gaussian.

Pixel convention: a dot centre ``(x, y)`` is in pixel-index units (column, row), so a disk drawn
around pixel ``(10, 20)`` is detected back at exactly ``(10.0, 20.0)``. Normalised coordinates are
``(x / width, y / height)``.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

from ase_ray.config import TdaConfig
from ase_ray.data.manifest import (
    AUGMENTED,
    SOURCE_IMAGE,
    GROUP,
    IMAGE_PATH,
    LABEL,
    MASK_PATH,
    SPLIT,
    DatasetInfo,
    write_dataset_info,
    write_manifest,
)
from ase_ray.errors import DataError
from ase_ray.outputs import check_output_dir

TRAIN = "train"
FIT_FILE = "tda_fit.json"
MANIFEST_FILE = "manifest.csv"
MIN_DOTS_TO_FIT = 3

_EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=bool)
_GRAY_PIL_MODES = ("1", "L", "LA", "I", "F")
_ERASE_GROW_PX = 2  # covers anti-aliased halo pixels that miss the colour tolerance
_ERASE_RING_PX = 3  # width of the background ring that the fill is drawn from
_PLACEMENT_BATCH = 64
_PLACEMENT_MAX_CANDIDATES = 20_000


# ------------------------------------------------------------------------------------ detection
@dataclass
class DotComponents:
    """Pink connected components that are large enough to be dots, sorted by (y, x)."""

    centres: np.ndarray  # (k, 2) float (x, y) px
    areas: np.ndarray  # (k,) int px

    @property
    def radii(self) -> np.ndarray:
        return np.sqrt(self.areas / np.pi)


def to_rgb_array(image: np.ndarray | Image.Image) -> np.ndarray | None:
    """An ``HxWx3`` array with 0..255 values, or None for a grayscale image (which carries no dots)."""
    if isinstance(image, Image.Image):
        if image.mode in _GRAY_PIL_MODES or image.mode.startswith("I;"):
            return None
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 2)):
        return None
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise DataError(f"expected an HxW, HxWx3 or HxWx4 image, got an array of shape {arr.shape}")
    return arr[..., :3]


def pink_mask(rgb: np.ndarray, config: TdaConfig) -> np.ndarray:
    """Pixels whose every channel is within ``color_tolerance`` of ``dot_color``."""
    distance = np.abs(rgb.astype(np.int16) - np.asarray(config.dot_color, dtype=np.int16))
    return np.all(distance <= config.color_tolerance, axis=-1)


def find_dot_components(image: np.ndarray | Image.Image, config: TdaConfig) -> DotComponents:
    """Centroids and areas of the pink components with at least ``min_dot_area`` pixels."""
    rgb = to_rgb_array(image)
    if rgb is None:
        return DotComponents(np.empty((0, 2)), np.empty(0, dtype=np.int64))
    labels, count = ndimage.label(pink_mask(rgb, config), structure=_EIGHT_NEIGHBOURS)
    if count == 0:
        return DotComponents(np.empty((0, 2)), np.empty(0, dtype=np.int64))
    ys, xs = np.nonzero(labels)
    ids = labels[ys, xs]
    areas = np.bincount(ids, minlength=count + 1)
    cx = np.bincount(ids, weights=xs, minlength=count + 1)
    cy = np.bincount(ids, weights=ys, minlength=count + 1)
    keep = np.flatnonzero(areas >= config.min_dot_area)
    keep = keep[keep > 0]  # label 0 is the background
    centres = np.column_stack([cx[keep] / areas[keep], cy[keep] / areas[keep]])
    order = np.lexsort((centres[:, 0], centres[:, 1]))
    return DotComponents(centres[order], areas[keep][order])


def detect_dots(image: np.ndarray | Image.Image, config: TdaConfig) -> np.ndarray:
    """``(k, 2)`` float (x, y) pixel centroids of the pink dots, sorted by (y, x)."""
    return find_dot_components(image, config).centres


def dot_radii(image: np.ndarray | Image.Image, config: TdaConfig) -> np.ndarray:
    """Radius ``sqrt(area / pi)`` in px of each detected dot, in the order of :func:`detect_dots`."""
    return find_dot_components(image, config).radii


# -------------------------------------------------------------------------------- erase / draw
def erase_dots(image: np.ndarray | Image.Image, config: TdaConfig) -> np.ndarray:
    """A copy of the image with every detected dot replaced by background from a ring around it.

    Each hole pixel copies a random pixel of the ring (seeded by ``config.seed``, so the result is
    deterministic) rather than the ring's median: a flat patch would be a texture cue that only
    augmented images carry.
    """
    rgb = to_rgb_array(image)
    if rgb is None:
        return np.array(image, copy=True)
    out = np.array(rgb, dtype=np.uint8, copy=True)
    dots = _dot_pixels(rgb, config)
    if not dots.any():
        return out
    covered = ndimage.binary_dilation(dots, structure=_EIGHT_NEIGHBOURS, iterations=_ERASE_GROW_PX)
    regions, count = ndimage.label(covered, structure=_EIGHT_NEIGHBOURS)
    rng = np.random.default_rng(config.seed)
    for region_id in range(1, count + 1):
        region = regions == region_id
        ring = ndimage.binary_dilation(region, structure=_EIGHT_NEIGHBOURS, iterations=_ERASE_RING_PX)
        background = out[ring & ~covered]
        if len(background) == 0:
            background = out[~covered]
        if len(background) == 0:
            background = np.zeros((1, 3), dtype=np.uint8)  # the whole image is dots
        out[region] = background[rng.integers(len(background), size=int(region.sum()))]
    return out


def _dot_pixels(rgb: np.ndarray, config: TdaConfig) -> np.ndarray:
    labels, count = ndimage.label(pink_mask(rgb, config), structure=_EIGHT_NEIGHBOURS)
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    is_dot = areas >= config.min_dot_area
    is_dot[0] = False
    return is_dot[labels]


def disk_mask(shape: tuple[int, int], centres_px: np.ndarray, radius: float) -> np.ndarray:
    """Boolean ``(h, w)`` mask of the pixels within ``radius`` of any centre (no anti-aliasing)."""
    height, width = shape
    mask = np.zeros((height, width), dtype=bool)
    r = float(radius)
    for cx, cy in np.asarray(centres_px, dtype=float).reshape(-1, 2):
        x0, x1 = max(int(np.floor(cx - r)), 0), min(int(np.ceil(cx + r)), width - 1)
        y0, y1 = max(int(np.floor(cy - r)), 0), min(int(np.ceil(cy + r)), height - 1)
        if x0 > x1 or y0 > y1:
            continue  # entirely outside the image
        ys, xs = np.ogrid[y0 : y1 + 1, x0 : x1 + 1]
        mask[y0 : y1 + 1, x0 : x1 + 1] |= (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r + 1e-9  # sqrt(13)**2 < 13
    return mask


def radius_for_area(area_px: float) -> float:
    """The radius whose pixel disk (see :func:`disk_mask`) has the area closest to ``area_px``.

    Drawing with ``sqrt(area / pi)`` itself would shrink dots: a radius-4 disk has 49 px, but
    ``sqrt(49 / pi) = 3.95`` keeps only 45. Ties go to the smaller radius.
    """
    reach = int(np.ceil(np.sqrt(max(area_px, 1.0) / np.pi))) + 2
    offsets = np.arange(-reach, reach + 1)
    squared = np.sort((offsets[:, None] ** 2 + offsets[None, :] ** 2).ravel())
    candidates = np.unique(squared)  # disk areas only change at these squared radii
    areas = np.searchsorted(squared, candidates, side="right")
    best = int(np.argmin(np.abs(areas - area_px)))
    return float(max(np.sqrt(candidates[best]), 1.0))


def draw_dots(
    image: np.ndarray | Image.Image,
    centres_px: np.ndarray,
    radius: float,
    color: tuple[int, int, int],
) -> np.ndarray:
    """A uint8 ``HxWx3`` copy of the image with filled circles of exactly ``color`` (gray becomes RGB)."""
    rgb = to_rgb_array(image)
    if rgb is None:
        gray = np.asarray(image.convert("L") if isinstance(image, Image.Image) else image)
        gray = gray[..., 0] if gray.ndim == 3 else gray
        rgb = np.repeat(gray[..., None], 3, axis=2)
    out = np.array(rgb, dtype=np.uint8, copy=True)
    out[disk_mask(out.shape[:2], centres_px, radius)] = np.asarray(color, dtype=np.uint8)
    return out


# ---------------------------------------------------------------------------------------- fit
@dataclass(eq=False)
class DotDistribution:
    """Where one class's dots fall (a Gaussian in normalised coords) and how many an image has."""

    label: str
    mean: np.ndarray  # (2,) normalised (x, y)
    cov: np.ndarray  # (2, 2)
    count_values: np.ndarray  # dots per image, distinct values
    count_probs: np.ndarray  # their empirical probabilities
    radius_px: float  # median detected dot radius
    n_dots: int
    n_images: int

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``(n, 2)`` normalised (x, y) positions drawn from the Gaussian."""
        return rng.multivariate_normal(self.mean, self.cov, size=n)

    def sample_count(self, rng: np.random.Generator) -> int:
        return int(rng.choice(self.count_values, p=self.count_probs))

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "mean": self.mean.tolist(),
            "cov": self.cov.tolist(),
            "count_values": self.count_values.tolist(),
            "count_probs": self.count_probs.tolist(),
            "radius_px": self.radius_px,
            "n_dots": self.n_dots,
            "n_images": self.n_images,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DotDistribution":
        return cls(
            label=str(data["label"]),
            mean=np.asarray(data["mean"], dtype=float).reshape(2),
            cov=np.asarray(data["cov"], dtype=float).reshape(2, 2),
            count_values=np.asarray(data["count_values"], dtype=int),
            count_probs=np.asarray(data["count_probs"], dtype=float),
            radius_px=float(data["radius_px"]),
            n_dots=int(data["n_dots"]),
            n_images=int(data["n_images"]),
        )


@dataclass
class DotFit:
    """The per-class distributions, the classes that got none (with why), and where dots may go.

    ``dot_area`` is the normalised box ``(x0, y0, x1, y1)`` around every fitted dot of every class:
    new dots are kept inside it so that a Gaussian tail never puts one over the printed text band.
    """

    distributions: dict[str, DotDistribution]
    skipped: dict[str, str]
    dot_area: tuple[float, float, float, float] | None
    split: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "dot_area": list(self.dot_area) if self.dot_area is not None else None,
            "distributions": {label: d.to_dict() for label, d in self.distributions.items()},
            "skipped": dict(self.skipped),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DotFit":
        area = data.get("dot_area")
        return cls(
            distributions={k: DotDistribution.from_dict(v) for k, v in data["distributions"].items()},
            skipped={str(k): str(v) for k, v in data.get("skipped", {}).items()},
            dot_area=tuple(float(v) for v in area) if area is not None else None,
            split=data.get("split"),
        )


def read_fit(path: str | Path) -> DotFit:
    """A fit saved by :func:`augment_manifest` (``tda_fit.json``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"TDA fit file not found: {path}")
    try:
        return DotFit.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path} is not a valid TDA fit: {exc}") from None


def fit_dot_distributions(
    manifest: pd.DataFrame, config: TdaConfig, split: str | None = TRAIN
) -> dict[str, DotDistribution]:
    """Per class, the dot-position Gaussian fitted on the rows of ``split`` (None: all rows).

    Classes without enough dots are left out; :func:`fit_dots` also says why.
    """
    return fit_dots(manifest, config, split).distributions


def fit_dots(manifest: pd.DataFrame, config: TdaConfig, split: str | None = TRAIN) -> DotFit:
    """Like :func:`fit_dot_distributions`, plus the skipped classes with reasons and the dot area."""
    _check_columns(manifest)
    rows = _rows_of_split(manifest, split)
    where = f"{split} image(s)" if split is not None else "image(s)"
    distributions: dict[str, DotDistribution] = {}
    skipped: dict[str, str] = {}
    all_coords: list[np.ndarray] = []
    for label in pd.unique(manifest[LABEL]):
        paths = rows.loc[rows[LABEL] == label, IMAGE_PATH]
        if len(paths) == 0:
            skipped[label] = f"no {where}"
            continue
        coords, counts, radii = _observe_images(paths, config)
        if len(coords) < MIN_DOTS_TO_FIT:
            skipped[label] = (
                f"only {len(coords)} pink dot(s) in {len(paths)} {where}; "
                f"at least {MIN_DOTS_TO_FIT} are needed to fit a 2-D Gaussian"
            )
            continue
        distributions[label] = _fit_distribution(label, coords, counts, radii)
        all_coords.append(coords)
    return DotFit(distributions, skipped, _bounding_box(all_coords), split)


def _observe_images(paths: pd.Series, config: TdaConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised dot coords (n, 2), dots per image (m,) and dot radii (n,) over the images."""
    coords, counts, radii = [], [], []
    for path in paths:
        image = load_image(path)
        found = find_dot_components(image, config)
        coords.append(found.centres / np.asarray(image.size, dtype=float))  # PIL size is (w, h)
        counts.append(len(found.centres))
        radii.append(found.radii)
    return np.concatenate(coords), np.asarray(counts, dtype=int), np.concatenate(radii)


def _fit_distribution(
    label: str, coords: np.ndarray, counts: np.ndarray, radii: np.ndarray
) -> DotDistribution:
    cov = np.cov(coords, rowvar=False)
    values, occurrences = np.unique(counts, return_counts=True)
    return DotDistribution(
        label=label,
        mean=coords.mean(axis=0),
        cov=(cov + cov.T) / 2,
        count_values=values,
        count_probs=occurrences / occurrences.sum(),
        radius_px=float(np.median(radii)),
        n_dots=len(coords),
        n_images=len(counts),
    )


def _bounding_box(coords: list[np.ndarray]) -> tuple[float, float, float, float] | None:
    if not coords:
        return None
    points = np.concatenate(coords)
    (x0, y0), (x1, y1) = points.min(axis=0), points.max(axis=0)
    return float(x0), float(y0), float(x1), float(y1)


def load_image(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


# ------------------------------------------------------------------------------------ augment
@dataclass
class AugmentResult:
    """What :func:`augment_manifest` made: the combined manifest and how each class fared."""

    manifest: pd.DataFrame
    fit: DotFit
    added: dict[str, int]
    skipped: dict[str, str]
    manifest_path: Path
    fit_path: Path

    @property
    def distributions(self) -> dict[str, DotDistribution]:
        return self.fit.distributions

    def skip_messages(self) -> list[str]:
        return [f"TDA skipped for class {label}: {reason}" for label, reason in self.skipped.items()]


def augment_manifest(
    manifest: pd.DataFrame,
    out_dir: str | Path,
    config: TdaConfig,
    classes: list[str] | None = None,
    dataset_info: DatasetInfo | None = None,
) -> AugmentResult:
    """Fit on the train split, write new images for each class, return the combined manifest.

    New rows copy their source row, with ``split='train'``, the source's ``group`` (a synthetic
    image must stay on its source's side of any later split), ``augmented=True`` and
    ``source_image``. Rows without a group (or a manifest without the column) get their own image
    path as group, so that the augmented copies share it. Writes ``out_dir/manifest.csv``,
    ``out_dir/tda_fit.json`` and, when given, ``out_dir/dataset.yaml``. ``config.enabled`` is the
    caller's switch: this function always augments.
    """
    out_dir = check_output_dir(Path(out_dir).absolute(), "data augment --out")
    _check_augmentable(manifest)
    originals = _with_groups(_with_absolute_paths(manifest))
    train = _rows_of_split(originals, TRAIN)
    wanted = _wanted_classes(originals, classes)
    fit = fit_dots(originals, config, TRAIN)
    plan = plan_counts(train[LABEL].value_counts().to_dict(), wanted, fit, config)

    new_rows: list[dict[str, Any]] = []
    added: dict[str, int] = {}
    for label in wanted:
        if label not in fit.distributions:
            continue
        made = _augment_class(label, train[train[LABEL] == label], plan[label], fit, out_dir, config)
        new_rows.extend(made)
        added[label] = len(made)
    skipped = {label: fit.skipped[label] for label in wanted if label in fit.skipped}

    combined = _combine(originals, new_rows)
    manifest_path = write_manifest(combined, out_dir / MANIFEST_FILE)
    fit_path = _write_fit(out_dir / FIT_FILE, fit, added, config)
    if dataset_info is not None:
        write_dataset_info(out_dir, dataset_info)
    return AugmentResult(combined, fit, added, skipped, manifest_path, fit_path)


def plan_counts(
    train_counts: dict[str, int], classes: list[str], fit: DotFit, config: TdaConfig
) -> dict[str, int]:
    """How many images to add per class that has a distribution.

    'balance': up to the largest train class, but the class never ends up above ``max_factor``
    times its own train size. 'count': ``per_class`` each.
    """
    largest = max(train_counts.values(), default=0)
    plan = {}
    for label in classes:
        if label not in fit.distributions:
            continue
        own = int(train_counts.get(label, 0))
        if config.mode == "count":
            plan[label] = config.per_class
        else:
            plan[label] = max(0, min(largest, int(np.floor(config.max_factor * own))) - own)
    return plan


def _augment_class(
    label: str, sources: pd.DataFrame, n: int, fit: DotFit, out_dir: Path, config: TdaConfig
) -> list[dict[str, Any]]:
    folder = out_dir / "images" / label
    folder.mkdir(parents=True, exist_ok=True)
    distribution = fit.distributions[label]
    if config.dot_radius is not None:
        radius = float(config.dot_radius)
    else:
        radius = radius_for_area(np.pi * distribution.radius_px**2)
    rng = class_rng(config.seed, label)
    rows = []
    for i in range(n):
        source = sources.iloc[int(rng.integers(len(sources)))]
        image = erase_dots(load_image(source[IMAGE_PATH]).convert("RGB"), config)
        height, width = image.shape[:2]
        k = distribution.sample_count(rng)
        centres = sample_dot_centres(distribution, rng, k, width, height, radius, fit.dot_area)
        path = folder / f"tda_{label}_{i:04d}.png"
        Image.fromarray(draw_dots(image, centres, radius, config.dot_color)).save(path)
        # No mask: the drawn dots move what a mask of the source image marks.
        rows.append({**source.to_dict(), IMAGE_PATH: str(path), SPLIT: TRAIN, SOURCE_IMAGE: source[IMAGE_PATH],
                     **({MASK_PATH: None} if MASK_PATH in source else {})})
    return rows


def class_rng(seed: int, label: str) -> np.random.Generator:
    """One generator per class, so a class's images do not depend on which other classes run."""
    return np.random.default_rng([seed, zlib.crc32(label.encode("utf-8"))])


def sample_dot_centres(
    distribution: DotDistribution,
    rng: np.random.Generator,
    k: int,
    width: int,
    height: int,
    radius: float,
    dot_area: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    """``(k, 2)`` integer-valued (x, y) px centres: inside the margins (and ``dot_area``), apart.

    Candidates outside, or closer than ``2 * radius + 3`` px to a placed dot, are redrawn.
    """
    low, high = placement_bounds(width, height, radius, dot_area)
    min_gap = 2 * radius + 3
    size = np.asarray([width, height], dtype=float)
    placed: list[np.ndarray] = []
    drawn = 0
    while len(placed) < k:
        if drawn >= _PLACEMENT_MAX_CANDIDATES:
            raise DataError(
                f"cannot place {k} dot(s) of radius {radius} px for class {distribution.label!r} in a "
                f"{width}x{height} image after {drawn} tries; the image or dot area is too small"
            )
        candidates = np.rint(distribution.sample(rng, _PLACEMENT_BATCH) * size)
        drawn += _PLACEMENT_BATCH
        for point in candidates:
            inside = np.all(point >= low) and np.all(point <= high)
            apart = all(np.hypot(*(point - p)) >= min_gap for p in placed)
            if inside and apart:
                placed.append(point)
                if len(placed) == k:
                    break
    return np.asarray(placed, dtype=float).reshape(-1, 2)


def placement_bounds(
    width: int, height: int, radius: float, dot_area: tuple[float, float, float, float] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest allowed (x, y) px centre: a whole dot plus 1 px fits inside the image."""
    margin = int(np.ceil(radius)) + 1
    low = np.asarray([margin, margin], dtype=float)
    high = np.asarray([width - 1 - margin, height - 1 - margin], dtype=float)
    if dot_area is not None:
        x0, y0, x1, y1 = dot_area
        low = np.maximum(low, np.ceil(np.asarray([x0 * width, y0 * height])))
        high = np.minimum(high, np.floor(np.asarray([x1 * width, y1 * height])))
    return low, high


# --------------------------------------------------------------------------------- validation
def _check_columns(manifest: pd.DataFrame) -> None:
    missing = [c for c in (IMAGE_PATH, LABEL) if c not in manifest.columns]
    if missing:
        raise DataError(f"manifest misses column(s) {missing}; it has {list(manifest.columns)}")
    no_label = manifest[LABEL].isna()
    if no_label.any():
        raise DataError(f"manifest rows {_first_rows(no_label)} have no label")
    no_path = manifest[IMAGE_PATH].isna() | (manifest[IMAGE_PATH].astype(str).str.strip() == "")
    if no_path.any():
        raise DataError(f"manifest rows {_first_rows(no_path)} have no image path")


def _first_rows(mask: pd.Series, limit: int = 5) -> str:
    rows = [str(i) for i in mask[mask].index[:limit]]
    more = f" (and {int(mask.sum()) - limit} more)" if mask.sum() > limit else ""
    return ", ".join(rows) + more


def _rows_of_split(manifest: pd.DataFrame, split: str | None) -> pd.DataFrame:
    if split is None:
        return manifest
    if SPLIT not in manifest.columns:
        raise DataError(
            f"manifest has no '{SPLIT}' column, so its {split} rows are unknown; "
            "run 'ase-ray data split' first (or fit on all rows with split=None)"
        )
    rows = manifest[manifest[SPLIT] == split]
    if rows.empty:
        found = sorted(str(s) for s in manifest[SPLIT].dropna().unique())
        raise DataError(f"manifest has no '{split}' rows (splits present: {found or 'none'})")
    return rows


def _check_augmentable(manifest: pd.DataFrame) -> None:
    _check_columns(manifest)
    if SPLIT not in manifest.columns:
        raise DataError(
            f"manifest has no '{SPLIT}' column: TDA fits on the train split only, so split first "
            "('ase-ray data split')"
        )
    present = [c for c in (AUGMENTED, SOURCE_IMAGE) if c in manifest.columns]
    if present:
        raise DataError(
            f"manifest already has column(s) {present}: it was augmented before; augment the original"
        )


def _wanted_classes(manifest: pd.DataFrame, classes: list[str] | None) -> list[str]:
    known = list(pd.unique(manifest[LABEL]))
    unknown = [c for c in classes or [] if c not in known]
    if unknown:
        raise DataError(f"TDA class(es) {unknown} are not in the manifest (classes: {known})")
    wanted = known if classes is None else list(dict.fromkeys(classes))
    for label in wanted:
        name = str(label)
        if not name.strip() or name in (".", "..") or "/" in name or "\\" in name:
            raise DataError(f"class name {name!r} cannot be used as a folder name for TDA images")
    return wanted


# ------------------------------------------------------------------------------------- output
def _with_absolute_paths(manifest: pd.DataFrame) -> pd.DataFrame:
    """Relative image paths would break once the manifest is written to another folder."""
    out = manifest.copy()
    out[IMAGE_PATH] = [os.path.abspath(p) for p in out[IMAGE_PATH]]
    return out


def _with_groups(manifest: pd.DataFrame) -> pd.DataFrame:
    """A row without a group is its own group, named by its image path."""
    out = manifest.copy()
    if GROUP not in out.columns:
        out[GROUP] = out[IMAGE_PATH]
        return out
    missing = out[GROUP].isna() | (out[GROUP].astype(str).str.strip() == "")
    out[GROUP] = out[GROUP].astype(object)
    out.loc[missing, GROUP] = out.loc[missing, IMAGE_PATH]
    return out


def _combine(originals: pd.DataFrame, new_rows: list[dict[str, Any]]) -> pd.DataFrame:
    base = originals.assign(**{AUGMENTED: False, SOURCE_IMAGE: None})
    if not new_rows:
        return base.reset_index(drop=True)
    extra = pd.DataFrame(new_rows).assign(**{AUGMENTED: True})[list(base.columns)]
    return pd.concat([base, extra], ignore_index=True)


def _write_fit(path: Path, fit: DotFit, added: dict[str, int], config: TdaConfig) -> Path:
    body = {**fit.to_dict(), "added": added, "config": config.model_dump(mode="json")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=2))
    return path
