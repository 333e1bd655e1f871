"""From the feature store to model inputs: label maps per task, splits, numpy arrays, Ray Datasets."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
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
    chunks,
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


def task_normal_class(store_dir: str | Path, task: str, classes: list[str]) -> str | None:
    """The no-defect class of a task: ``normal`` for binary; the dataset's normal class (its
    ``dataset.yaml``) for multi-class, else a class named ``normal``, else None."""
    if task == "binary":
        return NORMAL
    meta_path = Path(store_dir) / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
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
    ``store.json`` has it, else judged on the training rows (a store written before it was recorded)."""
    meta_path = Path(store_dir) / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    missing = [src for src in TEXT_SOURCES if f"text_{src}_pooled" not in train.features]
    if "constant_sources" in meta:
        return [*meta["constant_sources"], *[src for src in missing if src not in meta["constant_sources"]]]
    pooled = {src: train.features[f"text_{src}_pooled"] for src in TEXT_SOURCES
              if f"text_{src}_pooled" in train.features}
    return [*flagged(text_source_stats(train.rows, pooled)), *missing]


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


def without_stem(arrays: Arrays) -> Arrays:
    """``arrays`` without ``image_stem`` (a model that does not fine-tune never reads it: ~90 KB a row)."""
    return Arrays({k: v for k, v in arrays.features.items() if k != STEM}, arrays.labels, arrays.rows)


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
    return Arrays(features, arrays.labels, arrays.rows)


def with_model_numeric(arrays: Arrays, meta: dict) -> Arrays:
    """``arrays`` with the numeric block that a trained model recorded (``model.json``), scaled as in
    its training: what ``evaluate`` scores and Serve computes from a request."""
    from ase_ray.models.inference import model_inputs, numeric_features

    block = NumericBlock.from_json(model_inputs(meta).get("numeric"))
    columns = [f.name for f in block.fields if f.source == "metadata"]
    features = {k: v for k, v in arrays.features.items() if k != NUMERIC_KEY}
    features.update(numeric_features(meta, row_ocr_fields(arrays.rows), row_records(arrays.rows, columns)))
    return Arrays(features, arrays.labels, arrays.rows)


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


def to_ray_dataset(arrays: Arrays):
    """A Ray Dataset with one tensor column per feature and ``label_idx``."""
    import ray
    from ray.data.extensions import TensorArray

    columns = {**arrays.features, LABEL_KEY: arrays.labels, ROW_KEY: np.arange(len(arrays), dtype=np.int64)}
    frame = pd.DataFrame({k: (TensorArray(v) if v.ndim > 1 else v) for k, v in columns.items()})
    return ray.data.from_pandas(chunks(frame, max(1, math.ceil(len(frame) / 8))))


def collect_shard(shard, rank: int = 0, world_size: int = 1) -> dict[str, np.ndarray]:
    """Rows ``rank::world_size`` of a dataset, in the split's order, as numpy arrays (the store is small;
    workers hold it in memory). Every worker reads the whole dataset and takes its own share, so that
    which rows a rank trains on never depends on how Ray Data's streaming happened to hand out blocks:
    a resumed run sees the data an uninterrupted one saw."""
    parts: dict[str, list[np.ndarray]] = {}
    for batch in shard.iter_batches(batch_size=256, batch_format="numpy"):
        for key, value in batch.items():
            parts.setdefault(key, []).append(np.asarray(value))
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    if ROW_KEY not in arrays:
        return arrays
    order = np.argsort(arrays.pop(ROW_KEY), kind="stable")[rank::world_size]
    return {k: v[order] for k, v in arrays.items()}
