"""The corrections table: labels a person confirmed or corrected on the review page, and how
``ase-ray train --corrections`` takes them in.

The table is a CSV (``serve.corrections_path``, default ``<work_dir>/corrections/corrections.csv``),
one row per correction, appended, never rewritten: ``image_path``, ``image_id`` (sha256 of the
image bytes, as in the feature store), ``label`` (the person's), ``previous_label`` (the model's),
``model_uri``, ``model_version``, ``group``, ``corrected_at`` (UTC, ISO 8601), ``source`` (the
predictions it came from). The latest correction of an image wins.

Training takes a correction into its **training split only**, and never one whose image or group is
in the validation or test split of the run (that would be judging the model on what it was taught):

- an image already in the store's training rows gets the corrected label;
- a new image is extracted with the store's feature settings and added to the training rows;
- an image (or group) of the validation or test split is skipped, and the run says so.
"""

from __future__ import annotations

import csv
import json
import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ase_ray.errors import DataError

logger = logging.getLogger(__name__)

COLUMNS = ["image_path", "image_id", "label", "previous_label", "model_uri", "model_version", "group",
           "corrected_at", "source"]
_lock = threading.Lock()


def corrections_path(config) -> Path:
    """Where the table lives: ``serve.corrections_path``, else ``<work_dir>/corrections/corrections.csv``."""
    explicit = config.serve.corrections_path
    return Path(explicit) if explicit else Path(config.project.work_dir) / "corrections" / "corrections.csv"


def append_correction(path: str | Path, row: dict[str, Any]) -> dict[str, Any]:
    """Append one correction (``COLUMNS``; ``corrected_at`` filled in); returns the row written."""
    path = Path(path)
    record = {c: "" if row.get(c) is None else str(row.get(c, "")) for c in COLUMNS}
    record["corrected_at"] = record["corrected_at"] or datetime.now(timezone.utc).isoformat(timespec="seconds")
    if not record["image_id"] or not record["label"]:
        raise DataError("a correction needs image_id and label")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _lock:
        new = not path.is_file() or path.stat().st_size == 0
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow(record)
    return record


def read_corrections(path: str | Path) -> pd.DataFrame:
    """The table, the latest correction per image (empty frame when there is none)."""
    path = Path(path)
    if not path.is_file():
        return pd.DataFrame(columns=COLUMNS)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises many types for a broken file
        raise DataError(f"cannot read the corrections table {path}: {exc}") from None
    missing = [c for c in ("image_path", "image_id", "label") if c not in table.columns]
    if missing:
        raise DataError(f"the corrections table {path} lacks the column(s) {missing}")
    return table.drop_duplicates("image_id", keep="last").reset_index(drop=True)


@dataclass
class CorrectionPlan:
    """What training does with each correction."""

    relabel: dict[str, str] = field(default_factory=dict)  # image_id in train -> label
    add: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=COLUMNS))  # new images
    skipped: dict[str, str] = field(default_factory=dict)  # image_id -> why

    def summary(self, path: Path) -> dict[str, Any]:
        return {"path": str(path), "relabelled": len(self.relabel), "added": int(len(self.add)),
                "skipped": dict(self.skipped), "used_image_ids": sorted([*self.relabel, *self.add["image_id"]])}


def plan_corrections(table: pd.DataFrame, splits: dict, classes: list[str], task: str) -> CorrectionPlan:
    """Sort each correction into relabel / add / skipped against the run's splits (``Arrays`` per split)."""
    from ase_ray.data.manifest import DEFECT, NORMAL

    held_out_ids, held_out_groups = set(), set()
    for name in ("val", "test"):
        rows = splits[name].rows
        held_out_ids |= set(rows["image_id"].astype(str)) if "image_id" in rows else set()
        held_out_groups |= set(rows["group"].astype(str)) if "group" in rows else set()
    train_ids = set(splits["train"].rows["image_id"].astype(str)) if "image_id" in splits["train"].rows else set()
    plan, add = CorrectionPlan(), []
    for _, row in table.iterrows():
        image_id, label, group = str(row["image_id"]), str(row["label"]), str(row.get("group", "") or "")
        if task == "binary" and label not in classes:
            label = label if label in (NORMAL, DEFECT) else None
        if label is None or label not in classes:
            plan.skipped[image_id] = f"label {row['label']!r} is not one of the {task} classes {classes}"
        elif image_id in held_out_ids:
            plan.skipped[image_id] = "the image is in this run's validation or test split"
        elif group and group in held_out_groups:
            plan.skipped[image_id] = f"its group {group!r} is in this run's validation or test split"
        elif image_id in train_ids:
            plan.relabel[image_id] = label
        else:
            add.append({**row.to_dict(), "label": label})
    plan.add = pd.DataFrame(add, columns=COLUMNS) if add else plan.add
    return plan


def task_label(label: str, task: str, normal_class: str | None) -> str:
    """A multi-class correction's label in the binary task (normal / defect)."""
    from ase_ray.data.manifest import DEFECT, NORMAL

    if task != "binary" or label in (NORMAL, DEFECT):
        return label
    return NORMAL if label == normal_class else DEFECT


def with_corrections(splits: dict, classes: list[str], task: str, table_path: Path, store_meta: dict,
                     features_config, normal_class: str | None = None,
                     columns: list[str] | None = None) -> tuple[dict, dict[str, Any]]:
    """The splits with the corrections taken into the training rows (see the module docstring), and
    the record of what was used and skipped. ``columns``: the splits carry no store arrays (they stream
    to the workers, ``ase_ray.train.data.split_source``); a new image's arrays of those columns go into
    the training split's ``added``."""
    from ase_ray.train.data import Arrays

    table = read_corrections(table_path)
    if len(table):
        table = table.assign(label=[task_label(v, task, normal_class) for v in table["label"]])
    plan = plan_corrections(table, splits, classes, task)
    train = splits["train"]
    labels = train.labels.copy()
    rows = train.rows.copy()
    index = {c: i for i, c in enumerate(classes)}
    for i, image_id in enumerate(rows["image_id"].astype(str)):
        if image_id in plan.relabel:
            labels[i] = index[plan.relabel[image_id]]
    features, added = dict(train.features), dict(train.added)
    if len(plan.add):
        wanted = set(columns) if columns is not None else set(features)
        new_features, new_rows, failed = _extract_new(plan.add, store_meta, features_config, wanted)
        plan.skipped.update(failed)
        if len(new_rows) and columns is not None:
            added = {k: np.concatenate([added[k], new_features[k]]) if k in added else new_features[k]
                     for k in columns}
        elif len(new_rows):
            features = {k: np.concatenate([v, new_features[k].astype(v.dtype)]) for k, v in features.items()}
        if len(new_rows):
            labels = np.concatenate([labels, new_rows["label"].map(index).to_numpy(np.int64)])
            rows = pd.concat([rows, new_rows], ignore_index=True)
        plan.add = plan.add[~plan.add["image_id"].isin(failed)]
    record = plan.summary(table_path)
    for image_id, why in plan.skipped.items():
        logger.warning("correction of image %s not used: %s", image_id[:12], why)
    return {**splits, "train": Arrays(features, labels, rows, added)}, record


def _extract_new(add: pd.DataFrame, store_meta: dict, features_config, columns: set[str]):
    """Features of corrected images that the store lacks, extracted with the store's settings."""
    from ase_ray.features.inmemory import FeatureExtractor, decode_image_bytes, features_from_settings

    decoded, failed, kept = [], {}, []
    for _, row in add.iterrows():
        try:
            image = decode_image_bytes(Path(row["image_path"]).read_bytes())
        except Exception as exc:  # missing file, not an image
            failed[str(row["image_id"])] = f"cannot read {row['image_path']}: {type(exc).__name__}"
            continue
        if image.image_id != row["image_id"]:
            failed[str(row["image_id"])] = f"{row['image_path']} changed since it was reviewed (another sha256)"
            continue
        decoded.append(image)
        kept.append(row)
    if not decoded:
        return {}, pd.DataFrame(), failed
    features = features_from_settings(features_config, store_meta.get("features"))
    extracted = FeatureExtractor(features)(decoded)
    good = extracted.ok
    for i, error in enumerate(extracted.errors):
        if error:
            failed[decoded[i].image_id] = f"feature extraction failed: {error[:200]}"
    missing = columns - set(extracted.arrays)
    if missing:
        raise DataError(f"corrected images were extracted without the store's columns {sorted(missing)}")
    new_rows = pd.DataFrame([{
        "image_path": kept[i]["image_path"], "image_id": decoded[i].image_id, "label": kept[i]["label"],
        "group": kept[i].get("group", ""), "split": "train", "source": "correction",
        "ocr_fields": json.dumps(extracted.texts[i].get("ocr_fields", {}), sort_keys=True),
        "ocr_text": extracted.texts[i].get("ocr_text", ""),
    } for i in good])
    return {k: v for k, v in extracted.arrays.items() if k in columns}, new_rows, failed
