"""The manifest: one table (CSV or Parquet) that names every image of a dataset.

Columns
- ``image_path`` (required): path to the image; relative paths are relative to the manifest's folder.
- ``label`` (required): the class name.
- ``binary_label`` (optional): ``normal`` or ``defect``; derived from the dataset's normal class.
- ``group`` (optional): items that must stay on one side of a split (e.g. one physical tile).
- ``split`` (optional): ``train``, ``val`` or ``test``, written by ``ase-ray data split``.
- ``augmented`` / ``source_image`` (optional): written by TDA for the images it synthesised.
- ``mask_path`` (optional): the image's pixel mask (non-zero = defect), a training target of the defect
  maps (``ase_ray.data.masks``); like ``label`` it is never a model input. Relative like ``image_path``.
- any other column is metadata (free text or numbers) that travels with the image.

Beside the manifest, ``dataset.yaml`` records the class list and the normal class, so that
validation can flag unknown labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from ase_ray.errors import ManifestError

IMAGE_PATH = "image_path"
LABEL = "label"
BINARY_LABEL = "binary_label"
GROUP = "group"
SPLIT = "split"
AUGMENTED = "augmented"  # written by TDA: True for synthesised rows
SOURCE_IMAGE = "source_image"  # written by TDA: the image a synthesised row was made from
MASK_PATH = "mask_path"  # a pixel mask: a training target, never an input
REQUIRED_COLUMNS = (IMAGE_PATH, LABEL)
RESERVED_COLUMNS = (IMAGE_PATH, LABEL, BINARY_LABEL, GROUP, SPLIT, AUGMENTED, SOURCE_IMAGE, MASK_PATH)
NORMAL, DEFECT = "normal", "defect"
DATASET_INFO = "dataset.yaml"
SPLITS = ("train", "val", "test")


@dataclass
class DatasetInfo:
    """What ``dataset.yaml`` beside a manifest says about the dataset."""

    classes: list[str]
    normal_class: str | None = None
    source: str = "unknown"
    extra: dict = field(default_factory=dict)

    def binary_of(self, label: str) -> str:
        if self.normal_class is None:
            raise ManifestError("dataset has no normal class: binary labels are undefined")
        return NORMAL if label == self.normal_class else DEFECT


def read_manifest(path: str | Path, resolve_paths: bool = True) -> pd.DataFrame:
    """Read a CSV or Parquet manifest; image paths come back absolute when ``resolve_paths``."""
    path = Path(path)
    df = read_table(path, "manifest", {IMAGE_PATH: str, LABEL: str, GROUP: str})
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(
            f"manifest {path} misses required column(s) {missing}; it has {list(df.columns)}"
        )
    if len(df) == 0:
        raise ManifestError(f"manifest {path} has no rows (only a header)")
    if resolve_paths:
        df[IMAGE_PATH] = [resolve_image_path(p, path.parent) for p in df[IMAGE_PATH]]
        if MASK_PATH in df.columns:
            df[MASK_PATH] = [resolve_image_path(p, path.parent) if isinstance(p, str) and p else None
                             for p in df[MASK_PATH]]
    return df


def read_table(path: Path, what: str, dtype=None) -> pd.DataFrame:
    """A CSV (UTF-8) or Parquet table by suffix; every way it can fail is a :class:`ManifestError`."""
    if path.is_dir():
        raise ManifestError(f"{what} {path} is a folder, not a CSV or Parquet file")
    if not path.is_file():
        raise ManifestError(f"{what} not found: {path}")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
        return pd.read_csv(path, dtype=dtype)
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{what} {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at position "
                            f"{exc.start}): save it as UTF-8 CSV, or as Parquet") from None
    except pd.errors.EmptyDataError:
        raise ManifestError(f"{what} {path} is empty: it needs a header line and one row per image") from None
    except Exception as exc:  # pandas and pyarrow raise many types for a broken file
        raise ManifestError(f"cannot read {what} {path}: {one_line(exc)}") from None


def one_line(exc: Exception) -> str:
    """An exception's text on one line (pandas' parser messages end with a newline)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def missing_images(df: pd.DataFrame) -> list[str]:
    """The image paths (already resolved) that name no file."""
    return [p for p in df[IMAGE_PATH] if not (isinstance(p, str) and p and Path(p).is_file())]


def check_some_images_exist(df: pd.DataFrame, path: Path) -> None:
    """Fail before any work when no row of a manifest names an existing image (wrong folder, paths
    relative to another place); rows with some images missing are the pipeline's per-row errors."""
    missing = missing_images(df)
    if len(missing) == len(df):
        raise ManifestError(f"none of the {len(df)} image(s) of manifest {path} exists (e.g. {missing[0]!r}); "
                            "relative paths are read from the manifest's folder")


def resolve_image_path(value, base: Path) -> str:
    if not isinstance(value, str) or not value.strip():
        return "" if not isinstance(value, str) else value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def write_manifest(df: pd.DataFrame, path: str | Path, relative_to_manifest: bool = True) -> Path:
    """Write CSV or Parquet by suffix; paths under the manifest's folder are stored relative."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"cannot write a manifest without column(s) {missing}")
    out = df.copy()
    if relative_to_manifest:
        out[IMAGE_PATH] = [_maybe_relative(p, path.parent.resolve()) for p in out[IMAGE_PATH]]
        if MASK_PATH in out.columns:
            out[MASK_PATH] = [_maybe_relative(p, path.parent.resolve()) if isinstance(p, str) and p else p
                              for p in out[MASK_PATH]]
    if path.suffix.lower() in (".parquet", ".pq"):
        out.to_parquet(path, index=False)
    else:
        out.to_csv(path, index=False)
    return path


def _maybe_relative(value: str, base: Path) -> str:
    p = Path(value)
    if not p.is_absolute():
        return value
    try:
        return str(p.resolve().relative_to(base))
    except ValueError:
        return str(p)


def write_dataset_info(directory: str | Path, info: DatasetInfo) -> Path:
    path = Path(directory) / DATASET_INFO
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"classes": list(info.classes), "normal_class": info.normal_class, "source": info.source}
    body.update(info.extra)
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def read_dataset_info(manifest_path: str | Path) -> DatasetInfo | None:
    """The ``dataset.yaml`` beside a manifest, or None when there is none."""
    path = Path(manifest_path).parent / DATASET_INFO
    if not path.is_file():
        return None
    try:
        body = yaml.safe_load(path.read_text()) or {}
        classes = [str(c) for c in body.pop("classes")]
    except Exception as exc:
        raise ManifestError(f"{path} is not a valid dataset description: {exc}") from None
    normal = body.pop("normal_class", None)
    source = body.pop("source", "unknown")
    return DatasetInfo(classes=classes, normal_class=normal, source=source, extra=body)


def metadata_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c not in RESERVED_COLUMNS]


def add_binary_labels(df: pd.DataFrame, info: DatasetInfo) -> pd.DataFrame:
    out = df.copy()
    out[BINARY_LABEL] = [info.binary_of(label) for label in out[LABEL]]
    return out


def chunks(df: pd.DataFrame, size: int) -> list[pd.DataFrame]:
    """Consecutive row blocks of at most ``size`` rows (e.g. Ray Data blocks)."""
    size = max(1, size)
    return [df.iloc[start:start + size] for start in range(0, len(df), size)]
