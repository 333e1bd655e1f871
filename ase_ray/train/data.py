"""From the feature store to model inputs: label maps per task, splits, numpy arrays, per-worker shares.

Two ways in. In memory (``load_task_arrays``: every array column of every row; ``evaluate``, ``ablate``,
tests). Streaming (training, ``ase_ray.train.fit``): the driver reads the small columns only
(``load_task_rows``) and hands each Ray Train worker a small ``SplitSource`` (``split_source``); the
worker reads only its own share of the array columns from the store's Parquet shards (``take_share``:
a column projection and a ``row_id`` filter): rows whose index in the split is ``rank`` modulo the
world size. A worker's memory bound is that share of the split (plus a
batch in flight), held for the run because PFA rescores the whole share every epoch."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ase_ray.data.manifest import (
    AUGMENTED,
    BINARY_LABEL,
    DEFECT,
    LABEL,
    NORMAL,
    SPLIT,
    read_dataset_info,
)
from ase_ray.data.metadata import STORE_KEY as METADATA_KEY
from ase_ray.data.metadata import MetadataColumns
from ase_ray.errors import DataError
from ase_ray.features.stages import TEXT_SOURCES
from ase_ray.features.store import META_FILE, Store, load_store, stack
from ase_ray.features.text_stats import flagged, text_source_stats
from ase_ray.models.numeric import NUMERIC_KEY, NumericBlock, fit_numeric_block

logger = logging.getLogger(__name__)

LABEL_KEY = "label_idx"
ROW_KEY = "row_index"  # the row's place in its split: workers put rows back in order and take their share


STEM = "image_stem"


def model_columns() -> list[str]:
    cols = ["image_pooled", "image_tokens", STEM, "llm_hidden"]
    for src in TEXT_SOURCES:
        cols += [f"text_{src}_pooled", f"text_{src}_tokens", f"text_{src}_mask"]
    return cols


@dataclass
class Arrays:
    """Model inputs (one numpy array per store column) and integer labels, for one set of rows."""

    features: dict[str, np.ndarray]
    labels: np.ndarray
    rows: pd.DataFrame  # the store rows (paths, labels, splits) in the same order
    # Arrays of the rows the store lacks (a correction's new image: no ``row_id``), in their order; set
    # when ``features`` holds no store arrays (a split streamed from the store, :func:`split_source`).
    added: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> "Arrays":
        return Arrays({k: v[index] for k, v in self.features.items()}, self.labels[index],
                      self.rows.iloc[index].reset_index(drop=True))


def task_classes(store: Store, task: str) -> list[str]:
    """The class names of a task, in a fixed order (index = label id)."""
    if task == "binary":
        return [NORMAL, DEFECT]
    info = read_dataset_info(store.meta["manifest"]) if store.meta.get("manifest") else None
    if info is not None:
        return list(info.classes)
    return sorted(store.features[LABEL].astype(str).unique())


def store_meta_if_any(store_dir: str | Path) -> dict:
    """``store.json`` of a store (a path or a URI), or {} when there is none."""
    from ase_ray import storage

    location = storage.join(str(store_dir), META_FILE)
    return json.loads(storage.read_text(location)) if storage.is_file(location) else {}


def task_normal_class(store_dir: str | Path, task: str, classes: list[str]) -> str | None:
    """The no-defect class of a task: ``normal`` for binary; the dataset's normal class (its
    ``dataset.yaml``) for multi-class, else a class named ``normal``, else None."""
    if task == "binary":
        return NORMAL
    meta = store_meta_if_any(store_dir)
    info = read_dataset_info(meta["manifest"]) if meta.get("manifest") else None
    if info is not None and info.normal_class in classes:
        return info.normal_class
    return NORMAL if NORMAL in classes else None


def task_labels(rows: pd.DataFrame, task: str, classes: list[str]) -> np.ndarray:
    column = BINARY_LABEL if task == "binary" else LABEL
    if column not in rows.columns:
        raise DataError(f"the feature store has no {column!r} column, needed for the {task} task")
    index = {c: i for i, c in enumerate(classes)}
    values = rows[column].astype(str)
    unknown = sorted(set(values) - set(index))
    if unknown:
        raise DataError(f"labels {unknown} are not among the {task} classes {classes}")
    return values.map(index).to_numpy(np.int64)


def store_arrays(store: Store, task: str, classes: list[str]) -> Arrays:
    """Every model column the store has (a store written before a text source existed lacks its
    columns: that source is then absent, see :func:`constant_text_sources`)."""
    features = {}
    for column in model_columns():
        if (column.startswith("text_") or column == STEM) and column not in store.meta.get("shapes", {}):
            continue
        values = stack(store, column)
        features[column] = values.astype(np.float32) if values.dtype.kind == "f" else values.astype(np.int64)
    return Arrays(features, task_labels(store.features, task, classes), store.features.reset_index(drop=True))


def split_arrays(arrays: Arrays, use_augmented: bool = True) -> dict[str, Arrays]:
    """train / val / test by the store's ``split`` column; TDA rows only ever in train."""
    rows = arrays.rows
    if SPLIT not in rows.columns:
        raise DataError("the feature store has no 'split' column: run `ase-ray data split` before extraction")
    augmented = (rows[AUGMENTED].astype(str).str.lower().eq("true") if AUGMENTED in rows
                 else pd.Series(False, index=rows.index)).to_numpy()
    out = {}
    for split in ("train", "val", "test"):
        mask = rows[SPLIT].astype(str).eq(split).to_numpy().copy()
        if split != "train" or not use_augmented:
            mask &= ~augmented
        out[split] = arrays.take(np.flatnonzero(mask))
    if len(out["train"]) == 0:
        raise DataError("no training rows in the feature store")
    return out


def load_task_arrays(store_dir: str | Path, task: str, use_augmented: bool = True) -> tuple[dict[str, Arrays], list[str]]:
    store = load_store(store_dir)
    classes = task_classes(store, task)
    return split_arrays(store_arrays(store, task, classes), use_augmented), classes


def constant_text_sources(store_dir: str | Path, train: Arrays) -> list[str]:
    """The text sources that do not vary (or are absent): the store's ``constant_sources`` when its
    ``store.json`` has it, else judged on the training rows (a store written before it was recorded).
    ``train`` may come without arrays (:func:`load_task_rows`): the store's shapes say what is absent, and
    the old-store fallback reads only the training rows' pooled text embeddings."""
    meta = store_meta_if_any(store_dir)
    have = set(train.features) | set(meta.get("shapes", {}) if not train.features else ())
    missing = [src for src in TEXT_SOURCES if f"text_{src}_pooled" not in have]
    if "constant_sources" in meta:
        return [*meta["constant_sources"], *[src for src in missing if src not in meta["constant_sources"]]]
    wanted = [f"text_{src}_pooled" for src in TEXT_SOURCES if f"text_{src}_pooled" in have]
    pooled = {k: train.features[k] for k in wanted if k in train.features}
    if len(pooled) < len(wanted):  # streamed rows: read those columns of the training rows only
        ids = train.rows["row_id"].dropna().to_numpy(np.int64)
        pooled = read_row_arrays(store_dir, wanted, ids)
        rows = train.rows[train.rows["row_id"].notna()]
    else:
        rows = train.rows
    pooled = {k[len("text_"):-len("_pooled")]: v for k, v in pooled.items()}
    return [*flagged(text_source_stats(rows, pooled)), *missing]


def usable_text_sources(requested: list[str], constant: list[str]) -> tuple[list[str], list[str]]:
    """(kept, dropped): ``requested`` without the constant sources, with a warning; when that would
    leave none, all of ``requested`` are kept (with a warning) and nothing is dropped."""
    dropped = [src for src in requested if src in constant]
    kept = [src for src in requested if src not in constant]
    if not dropped:
        return list(requested), []
    if not kept:
        logger.warning("every text source of train.model.text_sources %s is constant across the store; "
                       "keeping them all (the text branch carries no information)", requested)
        return list(requested), []
    logger.warning("dropping text sources %s from train.model.text_sources: they do not vary across the "
                   "feature store (constant or absent); training on %s", dropped, kept)
    return kept, dropped


def image_tail_spec(store_meta: dict):
    """The backbone a fine-tuning model carries (``ImageTailSpec``), from the store's image encoder
    settings; a clear error when the store has no ``image_stem`` to feed it."""
    from ase_ray.models.settings import ImageTailSpec

    encoder = (store_meta.get("features") or {}).get("image_encoder")
    if STEM not in store_meta.get("shapes", {}) or not encoder:
        raise DataError("train.finetune needs the frozen early stages' maps in the feature store (image_stem): "
                        "extract with --set features.image_encoder.stem=true")
    return ImageTailSpec(backend=encoder["backend"], model_id=encoder.get("model_id", "microsoft/resnet-50"),
                         revision=encoder.get("revision", "main"), image_size=encoder["image_size"],
                         pooling=encoder.get("pooling", "mean"))


def defect_targets(store_meta: dict, rows: pd.DataFrame, labels: np.ndarray, classes: list[str],
                   normal: str | None) -> np.ndarray:
    """(N, Hs, Hs) int64 cell classes of the rows' masks (``ase_ray.data.masks``) in the geometry the store's
    image encoder used; all -1 when the rows have no ``mask_path``."""
    from ase_ray.data.manifest import MASK_PATH
    from ase_ray.data.masks import cell_targets

    encoder = (store_meta.get("features") or {}).get("image_encoder") or {}
    size, resize = int(encoder.get("image_size", 224)), encoder.get("resize", "squash")
    paths = rows[MASK_PATH].tolist() if MASK_PATH in rows.columns else [None] * len(rows)
    normal_index = classes.index(normal) if normal in classes else None
    return cell_targets(paths, labels, normal_index, size, resize)


def without_stem(arrays: Arrays) -> Arrays:
    """``arrays`` without ``image_stem`` (a model that does not fine-tune never reads it: ~90 KB a row)."""
    return Arrays({k: v for k, v in arrays.features.items() if k != STEM}, arrays.labels, arrays.rows,
                  {k: v for k, v in arrays.added.items() if k != STEM})


# ------------------------------------------------------------------------ numbers and records
def store_metadata(store_meta: dict) -> MetadataColumns:
    """The store's metadata columns (text and numeric), as extraction recorded them."""
    return MetadataColumns.from_json(store_meta.get(METADATA_KEY))


def row_records(rows: pd.DataFrame, columns: list[str]) -> list[dict]:
    """Each row's metadata record (``columns`` only), as a request's ``metadata`` would carry it."""
    present = [c for c in columns if c in rows.columns]
    return rows[present].to_dict("records") if present else [{} for _ in range(len(rows))]


def row_ocr_fields(rows: pd.DataFrame) -> list:
    return rows["ocr_fields"].tolist() if "ocr_fields" in rows.columns else [{}] * len(rows)


def fit_numeric(train: Arrays, sources: list[str], metadata: MetadataColumns) -> NumericBlock:
    """The numeric block of the training rows (:func:`ase_ray.models.numeric.fit_numeric_block`),
    TDA rows left out: they copy their source image's text and records, and copies would skew the
    statistics and hide an identifier (a running id is distinct only across distinct images)."""
    if not sources:
        return NumericBlock()
    rows = train.rows
    if AUGMENTED in rows.columns:
        rows = rows[~rows[AUGMENTED].astype(str).str.lower().eq("true")]
    return fit_numeric_block(row_ocr_fields(rows), row_records(rows, metadata.numeric), metadata.numeric, sources)


def with_numeric(arrays: Arrays, block: NumericBlock, metadata: MetadataColumns) -> Arrays:
    """``arrays`` with the ``numeric`` input (none when the block has no field)."""
    features = {k: v for k, v in arrays.features.items() if k != NUMERIC_KEY}
    if block.fields:
        features[NUMERIC_KEY] = block.transform(row_ocr_fields(arrays.rows), row_records(arrays.rows, metadata.numeric))
    return Arrays(features, arrays.labels, arrays.rows, arrays.added)


def with_model_numeric(arrays: Arrays, meta: dict) -> Arrays:
    """``arrays`` with the numeric block that a trained model recorded (``model.json``), scaled as in
    its training: what ``evaluate`` scores and Serve computes from a request."""
    from ase_ray.models.inference import model_inputs, numeric_features

    block = NumericBlock.from_json(model_inputs(meta).get("numeric"))
    columns = [f.name for f in block.fields if f.source == "metadata"]
    features = {k: v for k, v in arrays.features.items() if k != NUMERIC_KEY}
    features.update(numeric_features(meta, row_ocr_fields(arrays.rows), row_records(arrays.rows, columns)))
    return Arrays(features, arrays.labels, arrays.rows, arrays.added)


def model_input_record(block: NumericBlock, metadata: MetadataColumns, text_sources: list[str]) -> dict:
    """``extra.inputs`` of ``model.json``: the numeric block and the metadata keys a request must carry
    (the text columns only when the model reads the metadata text source)."""
    needed = MetadataColumns(text=metadata.text if "metadata" in text_sources else [],
                             numeric=[f.name for f in block.fields if f.source == "metadata"])
    return {"numeric": block.to_json(), METADATA_KEY: needed.to_json()}


def split_fingerprint(arrays: Arrays, classes: list[str]) -> str:
    """A short hash of which images (``image_id``, else path) a split holds and their labels: two runs
    were scored on the same validation data when their fingerprints match."""
    rows = arrays.rows
    ids = rows["image_id"] if "image_id" in rows.columns else rows["image_path"]
    pairs = sorted(f"{i}:{classes[int(label)]}" for i, label in zip(ids.astype(str), arrays.labels))
    return hashlib.sha256("\n".join(pairs).encode()).hexdigest()[:16]


# --------------------------------------------------------------------- streaming from the store
SHARE_BATCH = 256


def store_columns(store_dir: str | Path) -> list[str]:
    """The column names of the store's ``features.parquet`` (its footer only)."""
    import pyarrow.parquet as pq

    from ase_ray.features.store import FEATURES_FILE
    from ase_ray.storage import filesystem, join

    fs, path = filesystem(join(str(store_dir), FEATURES_FILE))
    return list(pq.ParquetDataset(path, filesystem=fs).schema.names)


def row_columns(names: list[str]) -> list[str]:
    """The small columns among ``names``: every column but the per-row arrays (``array_columns``)."""
    from ase_ray.features.store import array_columns

    arrays = set(array_columns())
    return [c for c in names if c not in arrays]


def read_store_rows(store_dir: str | Path) -> Store:
    """The store without its arrays: ``store.json`` and the small columns of ``features.parquet`` (ids,
    paths, labels, split, group, texts, OCR fields, metadata), in ``row_id`` order. What the driver of a
    training run reads; the arrays stream to the Train workers (:func:`split_source`)."""
    from ase_ray.features.store import FEATURES_FILE, _read_table, read_store_meta
    from ase_ray.storage import join

    meta = read_store_meta(store_dir)
    features = _read_table(join(str(store_dir), FEATURES_FILE), row_columns(store_columns(store_dir)))
    if len(features) and LABEL not in features.columns:
        raise DataError(f"broken feature store: {join(str(store_dir), FEATURES_FILE)} has no {LABEL!r} column")
    return Store(features, pd.DataFrame(), meta)


def load_task_rows(store_dir: str | Path, task: str, use_augmented: bool = True) -> tuple[dict[str, Arrays], list[str]]:
    """:func:`load_task_arrays` without the arrays: per split its rows and labels, ``features`` empty."""
    store = read_store_rows(store_dir)
    classes = task_classes(store, task)
    rows = Arrays({}, task_labels(store.features, task, classes), store.features.reset_index(drop=True))
    return split_arrays(rows, use_augmented), classes


def read_row_arrays(store_dir: str | Path, columns: list[str], row_ids) -> dict[str, np.ndarray]:
    """Array ``columns`` of the store rows ``row_ids`` (in that order), read with a row filter: for a
    handful of rows (an input example) or a small column (pooled text embeddings)."""
    import pyarrow.dataset as pads

    ids = np.asarray(row_ids, dtype=np.int64)
    shapes = store_meta_if_any(store_dir)["shapes"]
    table = _features_dataset(store_dir).to_table(
        columns=["row_id", *columns], filter=pads.field("row_id").isin(ids.tolist()))
    where = pd.Index(table.column("row_id").to_numpy()).get_indexer(ids)
    if (where < 0).any():
        raise DataError(f"rows {ids[where < 0][:5].tolist()} are not in the feature store {store_dir}")
    return {c: _as_numpy(table.column(c), shapes[c])[where] for c in columns}


def _features_dataset(store_dir: str | Path):
    """The store's ``features.parquet`` (its shards) as a pyarrow dataset: filtered, projected reads."""
    import pyarrow.dataset as pads

    from ase_ray.features.store import FEATURES_FILE
    from ase_ray.storage import filesystem, join

    fs, path = filesystem(join(str(store_dir), FEATURES_FILE))
    return pads.dataset(path, filesystem=fs, format="parquet")


def _as_numpy(column, shape: list[int]) -> np.ndarray:
    """A fixed-size-list Arrow column as an array of shape (rows, *shape), the store's dtype kept."""
    import pyarrow as pa

    n = len(column)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    if pa.types.is_fixed_size_list(column.type) or pa.types.is_list(column.type):
        return column.flatten().to_numpy(zero_copy_only=False).reshape(n, *shape)
    return column.to_numpy(zero_copy_only=False).reshape(n, *shape)


@dataclass
class SplitSource:
    """Where a split's arrays are and which rows it holds: small (ids, labels, the in-memory inputs), so
    it travels to every Train worker in the trainer's config; the arrays stay in the store until a worker
    reads its share (:func:`take_share`)."""

    store: str
    columns: list[str]
    shapes: dict[str, list[int]]
    row_ids: np.ndarray  # the store row_id of each split row, -1 for a row the store lacks
    labels: np.ndarray
    inputs: dict[str, np.ndarray]  # per split row, computed on the driver (the numeric block)
    added: dict[str, np.ndarray]  # arrays of the rows the store lacks (row_id -1), in their order

    def __len__(self) -> int:
        return len(self.labels)


def split_source(store_dir: str | Path, columns: list[str], split: Arrays, shapes: dict[str, list[int]]) -> SplitSource:
    """A split from :func:`load_task_rows` (with corrections and the numeric block) as a :class:`SplitSource`."""
    from ase_ray.storage import resolved

    row_ids = np.full(len(split), -1, dtype=np.int64)
    stored = _stored_positions(split)
    row_ids[stored] = split.rows["row_id"].to_numpy()[stored].astype(np.int64)
    return SplitSource(resolved(store_dir), list(columns), {c: list(shapes[c]) for c in columns}, row_ids,
                       np.asarray(split.labels, dtype=np.int64), dict(split.features),
                       {k: v for k, v in split.added.items() if k in columns})


def iter_rows(source: SplitSource, positions: np.ndarray, batch_rows: int = SHARE_BATCH):
    """The split's rows at ``positions`` as numpy batches (array columns in the store's dtypes, the
    in-memory inputs, ``label_idx``, ``row_index``), read from the store's Parquet shards with a column
    projection and a ``row_id`` filter: one record batch (at most a row group) is in memory at a time.
    Batches come in the store's order; ``row_index`` says where each row belongs."""
    import pyarrow.dataset as pads

    positions = np.asarray(positions, dtype=np.int64)
    ids = source.row_ids[positions]
    stored = positions[ids >= 0]
    if len(stored):
        lookup = pd.Index(source.row_ids[stored])
        wanted = pads.field("row_id").isin(source.row_ids[stored].tolist())
        for batch in _features_dataset(source.store).to_batches(columns=["row_id", *source.columns],
                                                                batch_size=batch_rows, filter=wanted):
            if not batch.num_rows:
                continue
            pos = stored[lookup.get_indexer(batch.column("row_id").to_numpy())]
            out = {c: _as_numpy(batch.column(c), source.shapes[c]) for c in source.columns}
            yield _with_split_values(out, source, pos)
    missing = positions[ids < 0]
    if len(missing):  # rows the store lacks: their place among the added rows
        order = np.cumsum(source.row_ids < 0) - 1
        out = {c: np.asarray(source.added[c])[order[missing]] for c in source.columns}
        yield _with_split_values(out, source, missing)


def _with_split_values(out: dict[str, np.ndarray], source: SplitSource, pos: np.ndarray) -> dict[str, np.ndarray]:
    out.update({k: v[pos] for k, v in source.inputs.items()})
    out[LABEL_KEY], out[ROW_KEY] = source.labels[pos], pos
    return out


def _stored_positions(split: Arrays) -> np.ndarray:
    """Positions of a split's rows that are store rows (a correction's new image has no ``row_id``)."""
    if "row_id" not in split.rows.columns:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(split.rows["row_id"].notna().to_numpy())


def share_of(row_index: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Whether each row is this rank's: rows whose index in their split is ``rank`` modulo
    ``world_size``. Decided by the row alone, so neither read order nor a restart moves a row."""
    return np.asarray(row_index) % world_size == rank


def take_share(source: SplitSource | None, rank: int = 0, world_size: int = 1) -> dict[str, np.ndarray]:
    """This rank's rows of a split (``row_index`` = ``rank`` modulo ``world_size``), in the split's
    order, as numpy arrays; {} for an empty split.

    Only this rank's rows are read (a ``row_id`` filter on the Parquet read), a record batch at a time:
    the bound on a worker's memory is its share of the split (about 1/world_size of the split's arrays,
    in the store's dtypes) plus one record batch, held for the whole run because PFA rescores and
    reselects from the whole share every epoch."""
    if source is None or not len(source):
        return {}
    positions = np.flatnonzero(share_of(np.arange(len(source)), rank, world_size))
    parts: dict[str, list[np.ndarray]] = {}
    for batch in iter_rows(source, positions):
        for key, value in batch.items():
            parts.setdefault(key, []).append(value)
    if not parts:
        return {}
    arrays = {k: np.concatenate(v, dtype=v[0].dtype, casting="same_kind") for k, v in parts.items()}
    order = np.argsort(arrays.pop(ROW_KEY), kind="stable")
    return {k: v[order] for k, v in arrays.items()}
