"""Build a manifest from a CSV of paths and labels, or from a folder per class."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ase_ray.data.manifest import (
    BINARY_LABEL,
    IMAGE_PATH,
    LABEL,
    DatasetInfo,
    add_binary_labels,
    read_table,
    resolve_image_path,
    write_dataset_info,
    write_manifest,
)
from ase_ray.errors import DataError, ManifestError
from ase_ray.outputs import check_output_dir

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass
class ImportResult:
    manifest: pd.DataFrame
    info: DatasetInfo
    manifest_path: Path
    ignored_files: list[str] = field(default_factory=list)  # non-image files found (reported, not rows)


def import_csv(
    csv_path: str | Path,
    out_dir: str | Path,
    classes: list[str] | None = None,
    normal_class: str | None = None,
    path_column: str = IMAGE_PATH,
    label_column: str = LABEL,
) -> ImportResult:
    """Copy a CSV of image paths and labels into the manifest format (paths made absolute)."""
    csv_path = Path(csv_path)
    check_output_dir(out_dir)
    df = read_table(csv_path, "CSV", {path_column: str, label_column: str})
    missing = [c for c in (path_column, label_column) if c not in df.columns]
    if missing:
        raise ManifestError(f"CSV {csv_path} misses column(s) {missing}; it has {list(df.columns)}")
    df = df.rename(columns={path_column: IMAGE_PATH, label_column: LABEL})
    df[IMAGE_PATH] = [resolve_image_path(p, csv_path.parent) for p in df[IMAGE_PATH]]
    classes = classes or sorted(str(v) for v in df[LABEL].dropna().unique())
    return _finish(df, out_dir, classes, normal_class, source=f"csv:{csv_path.resolve()}")


def import_folder(root: str | Path, out_dir: str | Path, normal_class: str | None = None) -> ImportResult:
    """``root/<class>/**/<image>``: one class per sub-folder, images found recursively."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"folder not found: {root}")
    check_output_dir(out_dir)
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(f"no class sub-folders in {root} (want {root}/<class>/<images>)")
    rows, ignored = [], []
    for class_dir in class_dirs:
        for path in sorted(p for p in class_dir.rglob("*") if p.is_file()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                rows.append({IMAGE_PATH: str(path), LABEL: class_dir.name})
            else:
                ignored.append(str(path))
    if not rows:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    df = pd.DataFrame(rows)
    classes = [d.name for d in class_dirs]
    result = _finish(df, out_dir, classes, normal_class, source=f"folder:{root}")
    result.ignored_files = ignored
    return result


def _finish(
    df: pd.DataFrame, out_dir: str | Path, classes: list[str], normal_class: str | None, source: str
) -> ImportResult:
    if normal_class is None and "normal" in classes:
        normal_class = "normal"
    if normal_class is not None and normal_class not in classes:
        raise DataError(f"normal class {normal_class!r} is not one of {classes}")
    info = DatasetInfo(classes=classes, normal_class=normal_class, source=source)
    if normal_class is not None and BINARY_LABEL not in df.columns:
        df = add_binary_labels(df.fillna({LABEL: ""}), info)
    out_dir = Path(out_dir)
    path = write_manifest(df, out_dir / "manifest.csv")
    write_dataset_info(out_dir, info)
    return ImportResult(manifest=df, info=info, manifest_path=path)
