"""The numeric block: parsed OCR fields and numeric metadata columns as one scaled vector per image.

:func:`fit_numeric_block` finds, on the *training* rows only, the fields a data set carries:
- OCR fields (``ocr_fields``, ``KEY value`` pairs) with a number in at least ``MIN_PRESENCE`` of the
  rows, leaving out identifiers (whole numbers that differ on nearly every row, e.g. a running id) and
  fields that never change;
- the numeric metadata columns (``ase_ray.data.metadata``).
Each field is standardised with its training mean and std. :meth:`NumericBlock.transform` gives
``(N, 2F)``: F scaled values (0 where missing, clipped to ``CLIP``) then F missing-value indicators.
The block (fields, means, stds) is recorded with the model, so serving scales exactly as training did.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ase_ray.data.metadata import as_number

NUMERIC_KEY = "numeric"  # the model input column
SOURCES = ("ocr", "metadata")
MIN_PRESENCE = 0.1  # an OCR field must carry a number on at least this share of training rows
MAX_FIELDS = 32
ID_DISTINCT = 0.9  # whole numbers distinct on this share of rows are an identifier, not a measurement
ID_MIN_ROWS = 20  # too few rows to tell an identifier from a measurement
MIN_STD = 1e-9
CLIP = 8.0


@dataclass(frozen=True)
class NumericField:
    name: str
    source: str  # "ocr" or "metadata"
    mean: float
    std: float
    presence: float  # share of training rows that carried it


@dataclass(frozen=True)
class NumericBlock:
    fields: list[NumericField] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # field -> why it was left out

    @property
    def width(self) -> int:
        return 2 * len(self.fields)

    def to_json(self) -> dict[str, Any]:
        return {"fields": [asdict(f) for f in self.fields], "skipped": dict(self.skipped)}

    @classmethod
    def from_json(cls, body: Mapping[str, Any] | None) -> "NumericBlock":
        body = body or {}
        return cls([NumericField(**f) for f in body.get("fields", [])], dict(body.get("skipped", {})))

    def transform(self, ocr_fields: Sequence[Any], records: Sequence[Mapping[str, Any]] | None = None) -> np.ndarray:
        """``(N, 2F)`` float32 for N rows: ``ocr_fields[i]`` a dict or its JSON, ``records[i]`` the row's
        metadata (a mapping; None: no metadata)."""
        n = len(ocr_fields)
        records = records if records is not None else [{}] * n
        if len(records) != n:
            raise ValueError(f"{n} OCR rows but {len(records)} metadata records")
        out = np.zeros((n, self.width), dtype=np.float32)
        k = len(self.fields)
        for i, (ocr, record) in enumerate(zip(ocr_fields, records)):
            parsed = parse_ocr_fields(ocr)
            for j, f in enumerate(self.fields):
                value = as_number((parsed if f.source == "ocr" else record).get(f.name))
                if value is None:
                    out[i, k + j] = 1.0
                else:
                    out[i, j] = np.clip((value - f.mean) / f.std, -CLIP, CLIP)
        return out


def parse_ocr_fields(value: Any) -> dict[str, Any]:
    """The store's ``ocr_fields`` (JSON text) or the in-memory dict, as a dict ({} when unreadable)."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, str) and value.strip():
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return {}
        return parsed if isinstance(parsed, dict) else {}
    return {}


def fit_numeric_block(ocr_fields: Sequence[Any], records: Sequence[Mapping[str, Any]] | None,
                      metadata_numeric: Iterable[str], sources: Iterable[str] = SOURCES) -> NumericBlock:
    """The block of the training rows (see the module docstring); ``sources`` picks OCR and/or metadata."""
    sources = set(sources)
    n = len(ocr_fields)
    records = records if records is not None else [{}] * n
    candidates: list[tuple[str, str, list[float | None]]] = []
    skipped: dict[str, str] = {}
    if "ocr" in sources and n:
        parsed = [parse_ocr_fields(v) for v in ocr_fields]
        names = sorted({k for p in parsed for k in p})
        for name in names:
            values = [as_number(p.get(name)) for p in parsed]
            presence = sum(v is not None for v in values) / n
            if presence < MIN_PRESENCE:
                skipped[name] = f"a number on {presence:.0%} of training rows (< {MIN_PRESENCE:.0%})"
            elif _is_identifier(values):
                skipped[name] = "an identifier (whole numbers, distinct on nearly every row)"
            else:
                candidates.append((name, "ocr", values))
    if "metadata" in sources:
        for name in metadata_numeric:
            candidates.append((name, "metadata", [as_number(r.get(name)) for r in records]))
    fields = []
    for name, source, values in candidates:
        present = np.array([v for v in values if v is not None], dtype=np.float64)
        if len(present) == 0 or present.std() < MIN_STD:
            skipped[name] = "never changes on the training rows"
            continue
        fields.append(NumericField(name, source, float(present.mean()), float(present.std()),
                                   round(len(present) / max(1, n), 4)))
    if len(fields) > MAX_FIELDS:
        fields.sort(key=lambda f: (-f.presence, f.name))
        for f in fields[MAX_FIELDS:]:
            skipped[f.name] = f"beyond the first {MAX_FIELDS} fields"
        fields = fields[:MAX_FIELDS]
    return NumericBlock(fields, skipped)


def _is_identifier(values: list[float | None]) -> bool:
    present = [v for v in values if v is not None]
    if len(present) < ID_MIN_ROWS or not all(float(v).is_integer() for v in present):
        return False
    return len(set(present)) >= ID_DISTINCT * len(present)
