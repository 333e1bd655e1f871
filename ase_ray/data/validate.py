"""Manifest validation: every bad row is reported at once, nothing is dropped."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image

from ase_ray.data.manifest import BINARY_LABEL, DEFECT, IMAGE_PATH, LABEL, MASK_PATH, NORMAL, SPLIT, SPLITS
from ase_ray.data.splits import leaking_groups


@dataclass(frozen=True)
class Problem:
    row: int  # 0-based position in the manifest (CSV line = row + 2)
    image_path: str
    kind: str  # missing-file | unreadable-image | unknown-label | duplicate-path | empty-field | bad-value | group-leak
    message: str

    def __str__(self) -> str:
        where = f"row {self.row} (line {self.row + 2})" if self.row >= 0 else "manifest"
        return f"{where}: {self.kind}: {self.message} [{self.image_path}]"


def validate_manifest(
    df: pd.DataFrame, classes: list[str] | None = None, check_images: bool = True, workers: int = 4
) -> list[Problem]:
    """All problems of a manifest read by ``read_manifest`` (absolute paths), sorted by row."""
    problems: list[Problem] = []
    paths = df[IMAGE_PATH].tolist()
    problems += _empty_fields(df)
    problems += _duplicate_paths(paths)
    if classes is not None:
        problems += _unknown_labels(df, classes)
    problems += _bad_values(df)
    if check_images:
        problems += _image_problems(paths, workers)
        if MASK_PATH in df.columns:
            problems += _mask_problems(df, workers)
    problems += _group_leaks(df)
    return sorted(problems, key=lambda p: (p.row, p.kind))


def check_image(path: str) -> str | None:
    """None when ``path`` is a decodable, non-empty image, else why not."""
    p = Path(path)
    if not p.is_file():
        return "file not found"
    if p.stat().st_size == 0:
        return "file is empty"
    try:
        with Image.open(p) as img:
            img.load()  # verify() misses truncated data; a full decode does not
            if img.width == 0 or img.height == 0:
                return "image has zero size"
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError...)
        return f"cannot decode image: {type(exc).__name__}: {exc}"
    return None


def _empty_fields(df: pd.DataFrame) -> list[Problem]:
    out = []
    for col in (IMAGE_PATH, LABEL):
        for i, value in enumerate(df[col]):
            if pd.isna(value) or str(value).strip() == "":
                out.append(Problem(i, str(df[IMAGE_PATH].iloc[i]), "empty-field", f"{col} is empty"))
    return out


def _duplicate_paths(paths: list[str]) -> list[Problem]:
    first: dict[str, int] = {}
    out = []
    for i, path in enumerate(paths):
        if not isinstance(path, str) or not path:
            continue
        if path in first:
            out.append(Problem(i, path, "duplicate-path", f"same image as row {first[path]}"))
        else:
            first[path] = i
    return out


def _unknown_labels(df: pd.DataFrame, classes: list[str]) -> list[Problem]:
    known = set(classes)
    out = []
    for i, label in enumerate(df[LABEL]):
        if pd.isna(label) or str(label).strip() == "":
            continue
        if str(label) not in known:
            out.append(
                Problem(i, str(df[IMAGE_PATH].iloc[i]), "unknown-label",
                        f"label {label!r} is not one of {sorted(known)}")
            )
    return out


def _bad_values(df: pd.DataFrame) -> list[Problem]:
    out = []
    allowed = {BINARY_LABEL: {NORMAL, DEFECT}, SPLIT: set(SPLITS)}
    for col, valid in allowed.items():
        if col not in df.columns:
            continue
        for i, value in enumerate(df[col]):
            if str(value) not in valid:
                out.append(Problem(i, str(df[IMAGE_PATH].iloc[i]), "bad-value",
                                   f"{col} {value!r} is not one of {sorted(valid)}"))
    return out


def _image_problems(paths: list[str], workers: int) -> list[Problem]:
    checkable = [(i, p) for i, p in enumerate(paths) if isinstance(p, str) and p]
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decodes without the GIL
        reasons = list(pool.map(lambda item: check_image(item[1]), checkable))
    out = []
    for (i, path), reason in zip(checkable, reasons):
        if reason is None:
            continue
        kind = "missing-file" if reason == "file not found" else "unreadable-image"
        out.append(Problem(i, path, kind, reason))
    return out


def _mask_problems(df: pd.DataFrame, workers: int) -> list[Problem]:
    """A ``mask_path`` that is given must be a readable image (an empty cell: no mask, fine)."""
    from ase_ray.data.masks import has_mask

    masks = [(i, m) for i, m in enumerate(df[MASK_PATH]) if has_mask(m)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(lambda item: check_image(item[1]), masks))
    return [Problem(i, str(df[IMAGE_PATH].iloc[i]), "missing-file" if reason == "file not found" else "unreadable-image",
                    f"mask_path {mask}: {reason}") for (i, mask), reason in zip(masks, reasons) if reason is not None]


def _group_leaks(df: pd.DataFrame) -> list[Problem]:
    return [
        Problem(-1, "", "group-leak", f"group {g!r} has rows in more than one split")
        for g in leaking_groups(df)
    ]
