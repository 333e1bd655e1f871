"""The Parquet feature store: ``features.parquet``, ``errors.parquet`` and ``store.json`` in one folder,
which is a path or a URI (``s3://bucket/...``: every read and write goes through ``ase_ray.storage``).

``features.parquet`` and ``errors.parquet`` are Parquet datasets: folders of shards
(``part-<first row_id>.parquet``) that the Ray Data workers write, one pair per batch of at most
``features.shard_rows`` rows, from the arrays the stages pass on in the batch, so the driver never holds
a row's arrays (it keeps counts, the conservation check and ``store.json``). A store written in one
process (tests) has one file. ``ray.data.read_parquet``, ``pandas.read_parquet`` and ``pyarrow`` read
either as one table; :func:`load_store` puts the rows in ``row_id`` order.

``features.parquet``, one row per image that passed every stage:

| column | type | meaning |
|---|---|---|
| ``row_id`` | int64 | position of the image in the input manifest |
| ``image_id`` | string | sha256 of the image bytes (the content address) |
| ``image_path``, ``label``, ... | | every manifest column (binary_label, group, split, metadata) |
| ``width``, ``height`` | int64 | image size in px |
| ``ocr_text`` / ``ocr_fields`` | string | raw OCR text / its ``KEY value`` fields as JSON (numbers as numbers) |
| ``description`` | string | the VLM's (or the offline describer's) zero-shot description |
| ``reasoning`` | string | the LLM's answer (generate mode); empty in forward mode (the source is absent) |
| ``metadata_text`` | string | the row's text metadata columns as text (``ase_ray.data.metadata``); empty without any |
| ``llm_hidden`` | list<float32>[H] | the LLM's mean last hidden state |
| ``image_pooled`` | list<float32>[D] | pooled image embedding |
| ``image_tokens`` | list<float16>[N*D] | spatial token map, row-major (N, D) |
| ``image_stem`` | list<float16>[C*H*W] | only with ``features.image_encoder.stem``: the stride-16 map, (C, H, W) |
| ``text_<src>_pooled`` | list<float32>[T] | for src in ocr, description, reasoning, metadata |
| ``text_<src>_tokens`` | list<float16>[L*T] | token states, row-major (L, T), zero-padded |
| ``text_<src>_mask`` | list<int8>[L] | 1 where a token is real |
| ``text_<src>_tokens_cut`` | int64 | tokens of the text beyond L that the encoder cut off (0: whole text) |

``store.json`` records the shapes of the array columns (``shapes``), per stage the backend and the
model that ran (``backends``: ``ase_ray.features.model_info.ran_models``), the stage settings
(``features``), the counts, and what each text source carries (``ase_ray.features.text_stats``):
``text_stats.<src>`` (``pooled_std``: mean per-dimension std of ``text_<src>_pooled`` across rows,
``distinct_texts``, ``absent``, ``constant``, ``tokens_cut``, ``texts_cut``), ``constant_sources`` (no
spread, or absent: training drops them) and ``absent_sources``; ``metadata_columns`` (``{"text": [...],
"numeric": [...]}``: the records beside the image that extraction read, ``ase_ray.data.metadata``). ``errors.parquet``: ``row_id``,
``image_path``, ``label``, ``stage``, ``message``; every input row is in exactly one of the two tables. :func:`load_store` and :func:`stack` read it back.
``store.json`` is written last, after every shard: a folder with tables (or the run's ``.attempts``
log) and no ``store.json`` is an extraction that was interrupted or is still running, and
:func:`load_store` refuses it; a shard that is not readable Parquet is an error naming the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ase_ray import storage
from ase_ray.data.manifest import LABEL
from ase_ray.errors import DataError
from ase_ray.features.cache import unpack
from ase_ray.features.stages import TEXT_SOURCES, arrays_column
from ase_ray.features.text_stats import cut_column, store_text_meta

FEATURES_FILE = "features.parquet"
ERRORS_FILE = "errors.parquet"
META_FILE = "store.json"  # written last: a folder without it is not (yet) a store
SUMMARY_FILE = "summary.json"  # the extraction's summary (ase_ray.features.pipeline), beside the store
ATTEMPTS_DIR = ".attempts"  # the run's AttemptLog (ase_ray.features.stages), removed when it finishes
INTERNAL_PREFIXES = ("t_", "hit_", "key_", "arrays_")
ERROR_COLUMNS = ("row_id", "image_path", "label", "stage", "message")


@dataclass
class Store:
    features: pd.DataFrame
    errors: pd.DataFrame
    meta: dict[str, Any]


OPTIONAL_COLUMNS = ("image_stem",)  # written only when the stage's settings ask for them


def array_columns() -> dict[str, tuple[str, str]]:
    """Store column -> (cache stage, cache entry name)."""
    cols = {
        "llm_hidden": ("reason", "hidden"),
        "image_pooled": ("image_encoder", "pooled"),
        "image_tokens": ("image_encoder", "tokens"),
        "image_stem": ("image_encoder", "stem"),
    }
    for src in TEXT_SOURCES:
        for part in ("pooled", "tokens", "mask"):
            cols[f"text_{src}_{part}"] = ("text_encoder", f"{src}_{part}")
    return cols


def clear_store(out_dir: str | Path) -> str:
    """Remove a previous store's tables (file or shard folder) from ``out_dir``: a rerun writes a new store."""
    out_dir = storage.resolved(out_dir)
    for name in (META_FILE, SUMMARY_FILE, FEATURES_FILE, ERRORS_FILE, ATTEMPTS_DIR):  # the marker first
        storage.remove(storage.join(out_dir, name))
    storage.make_dirs(out_dir)
    return out_dir


SHARD_COLUMNS = ("row_id", "error_stage", "error_message")


def write_store_shard(batch: pd.DataFrame, out_dir: str) -> pd.DataFrame:
    """One batch of the pipeline's rows into the store (a worker's last step): its stored rows with their
    arrays (the stages' ``arrays_<stage>`` columns) into ``features.parquet/part-<first row_id>.parquet``,
    its failed rows into ``errors.parquet/``. Returns what the driver needs of each row: ``row_id``, the
    error columns, the per-stage seconds and cache hits, and (first row) the array shapes as JSON."""
    rows = batch.sort_values("row_id").reset_index(drop=True)
    if not len(rows):
        return pd.DataFrame({c: [] for c in (*SHARD_COLUMNS, "shapes")})
    good, errors = split_rows(rows)
    name = f"part-{int(rows['row_id'].iloc[0]):09d}.parquet"
    shapes: dict[str, list[int]] = {}
    if len(good):
        entries = batch_entries(good)
        good = good.assign(**tokens_cut(entries))
        table, shapes = features_table(good, stacked_arrays(entries))
        _write_parquet(table, storage.join(out_dir, FEATURES_FILE, name))
    if len(errors):
        _write_parquet(one_text_type(pa.Table.from_pandas(errors, preserve_index=False)),
                       storage.join(out_dir, ERRORS_FILE, name))
    kept = [c for c in rows.columns if c in SHARD_COLUMNS or c.startswith(("t_", "hit_"))]
    out = rows[kept].copy()
    out["shapes"] = [json.dumps(shapes)] + [""] * (len(out) - 1)
    return out


class StoreShardWriter:
    """:func:`write_store_shard` in a Ray Data actor: the pipeline starts its writers with the stage actors,
    so the last shard, written once the last batch is done, does not wait for a worker to start."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return write_store_shard(batch, self.out_dir)


def _write_parquet(table: pa.Table, location: str) -> None:
    """Dictionaries and min/max statistics for the scalar columns only: on the vectors they cost about
    half the writer's time (a dictionary of floats that never repeat) and serve no reader. zstd, not
    Parquet's default snappy: on the store's padded token columns it writes a third faster and 30%
    smaller (120 demo rows: 0.42 s and 12 MB against 0.62 s and 17 MB)."""
    scalars = [f.name for f in table.schema if not pa.types.is_fixed_size_list(f.type) and not pa.types.is_list(f.type)]
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, use_dictionary=scalars, write_statistics=scalars, compression="zstd")
    storage.write_bytes(location, sink.getvalue().to_pybytes())


def finish_store(out_dir: str | Path, shard_rows: pd.DataFrame, meta: dict[str, Any]) -> Store:
    """``store.json`` of a store the workers wrote: the counts, the array shapes and the text sources'
    statistics (read back from the shards: texts, cut counts and pooled text embeddings only). Returns
    the store without its array columns."""
    out_dir = storage.resolved(out_dir)
    shapes: dict[str, list[int]] = {}
    for text in shard_rows.get("shapes", pd.Series(dtype=str)):
        shapes.update(json.loads(text) if text else {})
    failed = shard_rows["error_stage"].astype(str) != ""
    columns = [c for c in (*TEXT_STAT_COLUMNS, *[cut_column(s) for s in TEXT_SOURCES],
                           *[f"text_{s}_pooled" for s in TEXT_SOURCES])]
    features_at, errors_at = storage.join(out_dir, FEATURES_FILE), storage.join(out_dir, ERRORS_FILE)
    features = _read_table(features_at, columns) if storage.exists(features_at) else pd.DataFrame()
    errors = _read_table(errors_at) if storage.exists(errors_at) else _empty_errors()
    pooled = {s: np.stack(features[f"text_{s}_pooled"].to_numpy()) for s in TEXT_SOURCES
              if f"text_{s}_pooled" in features and len(features)}
    meta = {**meta, "rows": int((~failed).sum()), "errors": int(failed.sum()), "shapes": shapes,
            **store_text_meta(features, pooled)}
    if meta["rows"] == 0:
        _write_empty_features(out_dir)
    if not storage.exists(errors_at):
        _write_parquet(pa.Table.from_pandas(_empty_errors(), preserve_index=False), errors_at)
    storage.write_text(storage.join(out_dir, META_FILE), json.dumps(meta, indent=2))
    return Store(features=features.drop(columns=[c for c in features.columns if c.endswith("_pooled")]),
                 errors=errors, meta=meta)


TEXT_STAT_COLUMNS = ("row_id", "image_path", "ocr_text", "ocr_fields", "description", "reasoning", "metadata_text")


def _read_table(location: str, columns: list[str] | None = None) -> pd.DataFrame:
    """A store table (a file or a folder of shards), in ``row_id`` order; ``columns`` that exist only.
    A shard that is not readable Parquet (truncated, overwritten) is a DataError naming the file."""
    fs, path = storage.filesystem(location)
    try:
        dataset = pq.ParquetDataset(path, filesystem=fs)
        names = set(dataset.schema.names)
        table = dataset.read(columns=[c for c in columns if c in names] if columns is not None else None)
    except (pa.ArrowException, OSError) as exc:
        bad = _unreadable_file(location) or location
        why = (str(exc).splitlines() or [""])[0].replace(f"'{bad}'", "").replace(str(bad), "")[:160]
        raise DataError(f"damaged feature store: {bad} is not readable Parquet ({type(exc).__name__}: {why}); "
                        "extract the store again (`ase-ray features`: the cache keeps the outputs)") from None
    frame = table.to_pandas()
    return frame.sort_values("row_id").reset_index(drop=True) if "row_id" in frame else frame


def _unreadable_file(location: str) -> str | None:
    """The first file of a store table (itself, or a shard of its folder) whose Parquet footer is unreadable."""
    for file in ([location] if storage.is_file(location) else storage.list_files(location)):
        try:
            fs, path = storage.filesystem(file)
            pq.read_metadata(path, filesystem=fs)
        except Exception:
            return file
    return None


def _empty_errors() -> pd.DataFrame:
    return pd.DataFrame({"row_id": pd.Series(dtype="int64"), **{c: pd.Series(dtype=str) for c in ERROR_COLUMNS[1:]}})


def _write_empty_features(out_dir: str) -> None:
    """A features table with no row (every input failed): readers get an empty table, not a missing file."""
    path = storage.join(out_dir, FEATURES_FILE)
    storage.remove(path)
    _write_parquet(pa.table({"row_id": pa.array([], pa.int64()), "image_id": pa.array([], pa.string())}), path)


def split_rows(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(stored rows, the errors table) of pipeline rows."""
    failed = rows["error_stage"].astype(str) != ""
    errors = pd.DataFrame(
        {
            "row_id": rows.loc[failed, "row_id"].astype("int64"),
            "image_path": rows.loc[failed, "image_path"].astype(str),
            "label": rows.loc[failed, "label"].astype(str),
            "stage": rows.loc[failed, "error_stage"].astype(str),
            "message": rows.loc[failed, "error_message"].astype(str),
        }
    ).reset_index(drop=True)
    return rows.loc[~failed].reset_index(drop=True), errors


def write_store(rows: pd.DataFrame, out_dir: str | Path, meta: dict[str, Any]) -> Store:
    """The store of pipeline rows (with their ``arrays_<stage>`` columns) in one process (a test)."""
    good, errors = split_rows(rows.sort_values("row_id").reset_index(drop=True))
    entries = batch_entries(good)
    return write_store_arrays(good.assign(**tokens_cut(entries)), stacked_arrays(entries), errors, out_dir, meta)


def batch_entries(good: pd.DataFrame) -> dict[str, list[dict[str, Any]]]:
    """Per stage that carries arrays, each stored row's unpacked outputs (from ``arrays_<stage>``)."""
    stages = sorted({stage for stage, _ in array_columns().values()})
    out = {}
    for stage in stages:
        column = arrays_column(stage)
        if column not in good.columns:
            raise DataError(f"the pipeline's rows carry no {column} (the {stage} stage's arrays)")
        out[stage] = [unpack(bytes(v)) for v in good[column]]
    return out


def tokens_cut(entries: dict[str, list[dict[str, Any]]]) -> dict[str, np.ndarray]:
    """Per text source, the tokens the encoder cut from each row's text (``text_<src>_tokens_cut``)."""
    rows = entries.get("text_encoder", [])
    return {cut_column(src): np.asarray([int(e.get(f"{src}_cut", 0)) for e in rows], dtype=np.int64)
            for src in TEXT_SOURCES}


def stacked_arrays(entries: dict[str, list[dict[str, Any]]]) -> dict[str, np.ndarray]:
    """Every array column, stacked over the rows (an optional column only when every row has it)."""
    arrays = {}
    for column, (stage, entry) in array_columns().items():
        rows = entries.get(stage, [])
        if column in OPTIONAL_COLUMNS and any(entry not in e for e in rows):
            continue
        arrays[column] = np.stack([np.asarray(e[entry]) for e in rows]) if rows else np.zeros((0,), dtype=np.float32)
    return arrays


def write_store_arrays(
    good: pd.DataFrame, arrays: dict[str, np.ndarray], errors: pd.DataFrame, out_dir: str | Path, meta: dict[str, Any]
) -> Store:
    """Write a store from row metadata and stacked arrays (rows first); also used to build test stores."""
    out_dir = clear_store(out_dir)
    if len(good):
        table, shapes = features_table(good, arrays)
        _write_parquet(table, storage.join(out_dir, FEATURES_FILE))
    else:  # every row failed: an empty table, not a zero-width list column (pyarrow refuses those)
        _write_empty_features(out_dir)
        table, shapes, arrays = pa.table({"row_id": pa.array([], pa.int64())}), {}, {}
    errors_table = pa.Table.from_pandas(errors if len(errors) else _empty_errors(), preserve_index=False)
    _write_parquet(errors_table, storage.join(out_dir, ERRORS_FILE))
    pooled = {src: arrays[f"text_{src}_pooled"] for src in TEXT_SOURCES if f"text_{src}_pooled" in arrays}
    meta = {**meta, "rows": int(len(good)), "errors": int(len(errors)), "shapes": shapes,
            **store_text_meta(good, pooled)}
    storage.write_text(storage.join(out_dir, META_FILE), json.dumps(meta, indent=2))
    return Store(features=table.to_pandas(), errors=errors, meta=meta)


def features_table(good: pd.DataFrame, arrays: dict[str, np.ndarray]) -> tuple[pa.Table, dict[str, list[int]]]:
    """The features table of stored rows (internal columns dropped) and its array columns' shapes."""
    keep = [c for c in good.columns if not c.startswith(INTERNAL_PREFIXES) and c not in ("error_stage", "error_message")]
    table = one_text_type(pa.Table.from_pandas(good[keep].reset_index(drop=True), preserve_index=False))
    shapes: dict[str, list[int]] = {}
    for column, values in arrays.items():
        shapes[column] = list(values.shape[1:]) if len(values) else []
        flat = values.reshape(len(values), -1) if len(values) else np.zeros((0, 0), dtype=np.float32)
        table = table.append_column(column, _fixed_list(flat))
    return table, shapes


def one_text_type(table: pa.Table) -> pa.Table:
    """Text and all-empty columns as ``large_string``, so every shard of a store has one schema: a batch
    whose optional column (``source_image`` of a batch without TDA rows) is all None would otherwise
    store it as Arrow's null type, which the shards holding text cannot be read together with."""
    for i, field in enumerate(table.schema):
        if pa.types.is_null(field.type) or pa.types.is_string(field.type):
            table = table.set_column(i, field.name, table.column(i).cast(pa.large_string()))
    return table


def _fixed_list(matrix: np.ndarray) -> pa.Array:
    width = matrix.shape[1] if matrix.ndim == 2 else 0
    values = pa.array(np.ascontiguousarray(matrix).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(values, width)


def check_store(store_dir: str | Path) -> str:
    """The store's three parts exist (cheap: nothing is read); a DataError when it is unfinished (tables
    without ``store.json``: an extraction that was interrupted, or is still running) or incomplete."""
    store_dir = storage.resolved(store_dir)
    begun = [n for n in (FEATURES_FILE, ERRORS_FILE, ATTEMPTS_DIR) if storage.exists(storage.join(store_dir, n))]
    if not storage.exists(storage.join(store_dir, META_FILE)) and begun:
        raise DataError(f"unfinished feature store: {store_dir} has {', '.join(begun)} but no {META_FILE}, which an "
                        "extraction writes last (it was interrupted, or is still running); run `ase-ray features` again")
    for name in (FEATURES_FILE, ERRORS_FILE, META_FILE):
        if not storage.exists(storage.join(store_dir, name)):
            raise DataError(f"not a feature store: {storage.join(store_dir, name)} is missing (run `ase-ray features`)")
    return store_dir


def read_store_meta(store_dir: str | Path) -> dict[str, Any]:
    """``store.json`` of a finished store (a path or a URI)."""
    store_dir = check_store(store_dir)
    location = storage.join(store_dir, META_FILE)
    try:
        meta = json.loads(storage.read_text(location))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"broken feature store: {location} is not JSON ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("shapes"), dict):
        raise DataError(f"broken feature store: {location} has no 'shapes' record of its array columns")
    return meta


def load_store(store_dir: str | Path, columns: list[str] | None = None) -> Store:
    """The whole store in memory (a small store; large ones are read by ``ray.data.read_parquet``);
    ``columns``: only these feature columns (those that exist)."""
    store_dir = storage.resolved(store_dir)
    meta = read_store_meta(store_dir)
    tables = []
    for name, wanted in ((FEATURES_FILE, columns), (ERRORS_FILE, None)):
        location = storage.join(store_dir, name)
        try:
            tables.append(_read_table(location, wanted))
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise DataError(f"broken feature store: cannot read {location}: {' '.join(str(exc).split())}") from None
    features, errors = tables
    if len(features) and LABEL not in features.columns and (columns is None or LABEL in columns):
        raise DataError(f"broken feature store: {storage.join(store_dir, FEATURES_FILE)} has no {LABEL!r} column "
                        f"(it has {sorted(features.columns)[:8]})")
    return Store(features, errors, meta)


def stack(store: Store, column: str) -> np.ndarray:
    """An array column as one array of shape (rows, *shape) (float32 for float columns)."""
    shape = store.meta["shapes"].get(column)
    if shape is None and not len(store.features):
        raise DataError("the feature store has no rows: every image failed extraction (see its errors.parquet)")
    if shape is None:
        raise DataError(f"no array column {column!r} in the store (have {sorted(store.meta['shapes'])})")
    values = store.features[column]
    if len(values) == 0:
        return np.zeros((0, *shape), dtype=np.float32)
    out = np.stack([np.asarray(v) for v in values]).reshape(len(values), *shape)
    return out.astype(np.float32) if out.dtype.kind == "f" else out
