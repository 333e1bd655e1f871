"""Records beside an image: the manifest columns named by ``data.metadata_columns``.

A metadata column is *numeric* when every non-empty value in the manifest reads as a number (it then
joins the numeric block, ``ase_ray.models.numeric``), else *text*: the text columns of a row become the
``metadata`` text source, ``"<column>: <value>; ..."`` (:func:`metadata_text`), encoded like the other
texts. Which columns are which is decided once, at extraction, from the values (never the labels), and
recorded in ``store.json`` and with every model trained on the store, so that serving asks for the same
keys and builds the same text. A request must carry every recorded key; ``null`` (or an empty string)
is an unknown value: the numeric block marks it missing, the text leaves it out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import pandas as pd

from ase_ray.data.manifest import RESERVED_COLUMNS, DatasetInfo
from ase_ray.errors import ManifestError

TEXT_COLUMN = "metadata_text"  # the row's metadata text source, as the text encoder reads it
STORE_KEY = "metadata_columns"  # in store.json, features.json and model.json's extra.inputs


@dataclass(frozen=True)
class MetadataColumns:
    text: list[str] = field(default_factory=list)
    numeric: list[str] = field(default_factory=list)

    @property
    def all(self) -> list[str]:
        return [*self.text, *self.numeric]

    def to_json(self) -> dict[str, list[str]]:
        return {"text": list(self.text), "numeric": list(self.numeric)}

    @classmethod
    def from_json(cls, body: Mapping[str, Any] | None) -> "MetadataColumns":
        body = body or {}
        return cls(text=list(body.get("text", [])), numeric=list(body.get("numeric", [])))


def configured_columns(configured: list[str] | None, info: DatasetInfo | None) -> list[str]:
    """``data.metadata_columns`` when set (``[]``: none), else the ``metadata_columns`` that the
    data set's ``dataset.yaml`` names (the synthetic generator names its own), else none."""
    if configured is not None:
        return list(configured)
    named = info.extra.get(STORE_KEY) if info is not None else None
    return [str(c) for c in named] if named else []


def is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none", "null")


def as_number(value: Any) -> float | None:
    """The value as a finite float, or None (missing, or not a number)."""
    if is_missing(value) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def column_kinds(manifest: pd.DataFrame, columns: list[str]) -> MetadataColumns:
    """Split ``columns`` into text and numeric ones by their values; a clear error for a column the
    manifest lacks or that is not metadata (a label, split or path column)."""
    reserved = [c for c in columns if c in RESERVED_COLUMNS]
    if reserved:
        raise ManifestError(f"data.metadata_columns names {reserved}: these are not metadata (they are "
                            f"{', '.join(RESERVED_COLUMNS)}); name record columns only")
    missing = [c for c in columns if c not in manifest.columns]
    if missing:
        extra = [c for c in manifest.columns if c not in RESERVED_COLUMNS]
        raise ManifestError(f"data.metadata_columns names {missing}, which the manifest does not have "
                            f"(its metadata columns: {extra or 'none'})")
    if len(set(columns)) != len(columns):
        raise ManifestError(f"data.metadata_columns has duplicates: {columns}")
    text, numeric = [], []
    for column in columns:
        values = [v for v in manifest[column].tolist() if not is_missing(v)]
        (numeric if values and all(as_number(v) is not None for v in values) else text).append(column)
    return MetadataColumns(text=text, numeric=numeric)


def metadata_text(record: Mapping[str, Any], text_columns: Iterable[str]) -> str:
    """The metadata text source of one row: ``"<column>: <value>"`` for its non-empty text columns."""
    parts = [f"{c}: {str(record.get(c)).strip()}" for c in text_columns if not is_missing(record.get(c))]
    return "; ".join(parts)


def with_metadata_text(rows: pd.DataFrame, columns: MetadataColumns) -> pd.DataFrame:
    """``rows`` with the :data:`TEXT_COLUMN` built from its text metadata columns ("" without any)."""
    records = rows[columns.text].to_dict("records") if columns.text else [{}] * len(rows)
    return rows.assign(**{TEXT_COLUMN: [metadata_text(r, columns.text) for r in records]})


def missing_keys(record: Mapping[str, Any], columns: MetadataColumns) -> list[str]:
    """The recorded metadata keys a request's ``metadata`` does not carry (``null`` counts as given)."""
    return [c for c in columns.all if c not in record]
