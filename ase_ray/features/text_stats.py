"""How much each text source of a feature store carries: its spread across rows, and what was cut.

A source whose pooled text embedding does not vary across rows (one distinct text, or a spread of zero)
tells the classifier nothing: it is flagged *constant*, and training leaves it out. A source whose
texts are all empty (``reasoning`` in the reason stage's forward mode) is *absent*, and flagged too.
Used by :func:`ase_ray.features.store.write_store_arrays` (``store.json``: ``text_stats``,
``constant_sources``, ``absent_sources``) and by training when a store predates these fields.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ase_ray.features.stages import TEXT_COLUMNS, TEXT_SOURCES

MIN_SPREAD = 1e-6  # mean per-dimension std below this is no spread at all (float16/float32 noise is larger)
MIN_ROWS = 2  # fewer rows cannot show a spread: nothing is flagged


def cut_column(source: str) -> str:
    """The store column with how many tokens of each row's ``source`` text the encoder cut off."""
    return f"text_{source}_tokens_cut"


def pooled_spread(pooled: np.ndarray) -> float:
    """Mean over dimensions of the per-dimension standard deviation across rows."""
    if len(pooled) < MIN_ROWS:
        return 0.0
    return float(np.asarray(pooled, dtype=np.float64).reshape(len(pooled), -1).std(axis=0).mean())


def source_stats(source: str, pooled: np.ndarray | None, rows: pd.DataFrame) -> dict[str, Any]:
    """Spread, distinct texts, emptiness and cut tokens of one source (None where the data lacks it)."""
    column = TEXT_COLUMNS[source]
    texts = rows[column].fillna("").astype(str) if column in rows.columns else None
    cut = rows[cut_column(source)] if cut_column(source) in rows.columns else None
    spread = pooled_spread(pooled) if pooled is not None else None
    # no text column at all (e.g. no metadata_text: the manifest has no metadata columns) is absent too
    absent = bool(len(rows) > 0 and (texts is None or texts.str.strip().eq("").all()))
    distinct = int(texts.nunique()) if texts is not None else None
    judged = len(rows) >= MIN_ROWS
    constant = judged and (absent or distinct == 1 or (spread is not None and spread < MIN_SPREAD))
    return {
        "pooled_std": None if spread is None else round(spread, 6),
        "distinct_texts": distinct,
        "absent": absent,
        "constant": bool(constant),
        "tokens_cut": None if cut is None else int(cut.sum()),
        "texts_cut": None if cut is None else int((cut > 0).sum()),
    }


def text_source_stats(rows: pd.DataFrame, pooled: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """:func:`source_stats` for every text source; ``pooled`` maps source -> (rows, D) pooled embeddings."""
    return {src: source_stats(src, pooled.get(src), rows) for src in TEXT_SOURCES}


def flagged(stats: dict[str, dict[str, Any]], key: str = "constant") -> list[str]:
    """The sources whose ``key`` (``constant`` or ``absent``) is set, in source order."""
    return [src for src in TEXT_SOURCES if stats.get(src, {}).get(key)]


def store_text_meta(rows: pd.DataFrame, pooled: dict[str, np.ndarray]) -> dict[str, Any]:
    """The ``store.json`` fields: per-source stats and the flagged sources."""
    stats = text_source_stats(rows, pooled)
    return {"text_stats": stats, "constant_sources": flagged(stats), "absent_sources": flagged(stats, "absent")}
