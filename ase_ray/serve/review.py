"""The review page's data: a queue of an ``ase-ray predict`` output (``serve.review_queue``), its
images, and corrections appended to the corrections table (``ase_ray.train.corrections``).

Only rows of the configured queue can be read or corrected, by ``row_id``: a request never names a
path on the server.
"""

from __future__ import annotations

import json
import mimetypes
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ase_ray.errors import RequestError

QUEUE_COLUMNS = ("row_id", "image_path", "image_id", "predicted_label", "confidence", "needs_review", "p_defect",
                 "decision", "label", "group", "model_uri", "model_version", "error")


def read_predictions(predict_dir: Path | None) -> pd.DataFrame:
    """The predictions of the queue folder; a 404 when none is configured or it has none."""
    from ase_ray.serve.batch import PREDICTIONS_PARQUET

    if predict_dir is None:
        raise RequestError(404, "no_review_queue", "no review queue is configured (serve.review_queue: an "
                           "`ase-ray predict` output folder)")
    path = Path(predict_dir) / PREDICTIONS_PARQUET
    if not path.is_file():
        raise RequestError(404, "no_review_queue", f"the review queue folder has no {PREDICTIONS_PARQUET}: "
                           "run `ase-ray predict --out` into it")
    return pd.read_parquet(path)


def queue_rows(predictions: pd.DataFrame, corrections: pd.DataFrame, max_rows: int) -> list[dict[str, Any]]:
    """Rows to review: ``needs_review`` first, then by rising confidence; each with its class
    probabilities and the latest correction of its image, if any."""
    corrected = dict(zip(corrections["image_id"], corrections["label"])) if len(corrections) else {}
    frame = predictions.copy()
    frame["_review"] = frame["needs_review"].astype(bool)
    frame["_confidence"] = pd.to_numeric(frame["confidence"], errors="coerce").fillna(-1.0)
    frame = frame.sort_values(["_review", "_confidence", "row_id"], ascending=[False, True, True]).head(max_rows)
    prob_columns = [c for c in frame.columns if c.startswith("prob_")]
    out = []
    for _, row in frame.iterrows():
        item = {c: _plain(row[c]) for c in QUEUE_COLUMNS if c in frame.columns}
        item["probabilities"] = {c[len("prob_"):]: _plain(row[c]) for c in prob_columns}
        item["corrected_label"] = corrected.get(str(row.get("image_id", "")))
        out.append(item)
    return out


def queue_row(predictions: pd.DataFrame, row_id: int) -> pd.Series:
    hit = predictions[predictions["row_id"].astype(int) == int(row_id)]
    if hit.empty:
        raise RequestError(404, "unknown_row", f"row {row_id} is not in the review queue")
    return hit.iloc[0]


def image_bytes(row: pd.Series, max_bytes: int) -> tuple[bytes, str]:
    """The image of a queue row and its media type; a 404 when the file is gone, 413 when too large."""
    path = Path(str(row["image_path"]))
    if not path.is_file():
        raise RequestError(404, "image_missing", f"the image of row {row['row_id']} is no longer at its path")
    if path.stat().st_size > max_bytes:
        raise RequestError(413, "image_too_large", f"the image of row {row['row_id']} exceeds {max_bytes} bytes")
    return path.read_bytes(), mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def correction_record(row: pd.Series, label: str, classes: list[str], source: Path) -> dict[str, Any]:
    """The corrections-table row for a person's ``label`` of a queue row (400 when not a class)."""
    if label not in classes:
        raise RequestError(400, "unknown_label", f"label {label!r} is not one of the model's classes {classes}")
    if not str(row.get("image_id", "") or ""):
        raise RequestError(422, "no_image_id", f"row {row['row_id']} has no image_id (its prediction failed)")
    return {"image_path": row["image_path"], "image_id": row["image_id"], "label": label,
            "previous_label": row.get("predicted_label", ""), "model_uri": row.get("model_uri", ""),
            "model_version": row.get("model_version", ""), "group": row.get("group", ""),
            "source": str(source)}


def parse_correction(body: bytes) -> tuple[int, str]:
    """``{"row_id": int, "label": str}`` from a request body; a 400 naming what is wrong."""
    try:
        value = json.loads(body or b"null")
    except json.JSONDecodeError as exc:
        raise RequestError(400, "malformed_json", f"the body is not valid JSON: {exc.msg}") from None
    if not isinstance(value, dict) or not isinstance(value.get("label"), str) or \
            not isinstance(value.get("row_id"), int) or isinstance(value.get("row_id"), bool):
        raise RequestError(400, "malformed_correction", 'send {"row_id": <int>, "label": "<class>"}')
    return value["row_id"], value["label"]


def _plain(value: Any) -> Any:
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
