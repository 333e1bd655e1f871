"""The extraction stages as Ray Data callables: cache lookup, batched compute, errors as rows.

Every stage is a callable class (one per actor): the backend model is loaded on the first cache miss,
once. A call takes a pandas batch and returns it with the stage's *text* outputs added as columns; a
stage whose outputs hold arrays (the LLM's hidden state, the image and text encoders) also adds them,
packed, in ``arrays_<stage>``, which the store's writer unpacks (``ase_ray.features.store``). Every
output also goes to the content-addressed cache (``cache.py``), so a re-run recomputes nothing.

Images are decoded once, by :class:`DecodeStage`, into raw RGB ``pixels`` that the image stages read;
the pixels are dropped after the last image stage (the image encoder), before the LLM and the text
encoder, which read texts only.

Columns every stage maintains: ``error_stage`` / ``error_message`` (empty when fine; a row with an
error is passed through untouched by later stages), ``t_<stage>`` (seconds spent on the row),
``hit_<stage>`` (served from cache) and ``key_<stage>`` (its cache entry).

The same stages serve images held in memory (Ray Serve, batch prediction): a batch may carry the
decoded image in an ``image`` column instead of reading ``image_path``, ``cache_root=None`` keeps
nothing, and :meth:`Stage.run_with_outputs` also returns the arrays (see ``inmemory.py``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from ase_ray import storage
from ase_ray.features.cache import NoCache, StageCache, fingerprint, pack, unpack

TEXT_SOURCES = ("ocr", "description", "reasoning", "metadata")
# The metadata source is the row's record columns as text (ase_ray.data.metadata.TEXT_COLUMN).
TEXT_COLUMNS = {"ocr": "ocr_text", "description": "description", "reasoning": "reasoning", "metadata": "metadata_text"}
IMAGE_COLUMN = "image"  # optional: the decoded RGB image, used instead of reading image_path
PIXELS_COLUMN = "pixels"  # the pipeline's decoded image: raw RGB bytes (height x width x 3), see DecodeStage


def arrays_column(stage: str) -> str:
    """The batch column that carries a stage's packed outputs (arrays) on to the store's writer."""
    return f"arrays_{stage}"


def load_rgb(path: str) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def row_image(row: pd.Series) -> Image.Image:
    """The row's image: the in-memory one or the decoded pixels when the batch carries them, else read
    from ``image_path``."""
    image = row.get(IMAGE_COLUMN) if IMAGE_COLUMN in row.index else None
    if image is not None:
        return image
    pixels = row.get(PIXELS_COLUMN) if PIXELS_COLUMN in row.index else None
    if pixels is not None and len(pixels):
        return Image.frombuffer("RGB", (int(row["width"]), int(row["height"])), bytes(pixels), "raw", "RGB", 0, 1)
    return load_rgb(row["image_path"])


class Stage:
    """Template: subclasses set ``name`` and implement ``inputs``, ``compute`` and ``row_outputs``."""

    name = "stage"
    carries_arrays = False  # its outputs hold arrays that the store keeps

    def __init__(self, settings: Any, cache_root: str | None, models_dir: str | None = None,
                 attempts_dir: str | None = None):
        self.settings = settings
        self.models_dir = models_dir  # hub models load from here only (features.models_dir), when set
        self.attempts = None if attempts_dir is None else AttemptLog(attempts_dir, self.name)
        key = fingerprint(self.name, settings)
        self.cache = NoCache(self.name, key) if cache_root is None else StageCache(cache_root, self.name, key)
        self._backend: Any = None

    @property
    def backend(self) -> Any:
        """The model, loaded on the first cache miss and then kept for the actor's life (a run served
        wholly from the cache never loads it)."""
        if self._backend is None:
            _limit_torch_threads(self.settings)
            self._backend = self.load_backend()
            if self.attempts is not None:
                self.attempts.note_model_loaded()
        return self._backend

    @property
    def ran_model(self) -> dict[str, Any]:
        """The model this stage runs (backend, model id or package, source; ``device`` once loaded):
        decided by the settings, which are part of every cache key, so it is also what produced the
        outputs served from the cache."""
        from ase_ray.features.model_info import stage_details, stage_model

        info = {**stage_model(self.name, self.settings, self.models_dir), **stage_details(self.name, self.settings)}
        device = getattr(self._backend, "device", None)
        return {**info, "device": str(device)} if device is not None else info

    # -- to implement -------------------------------------------------------------------------
    def load_backend(self) -> Any:
        return None

    def inputs(self, row: pd.Series) -> tuple[str, ...]:
        """Strings that, with the stage fingerprint, decide the output (the cache key)."""
        return (row["image_id"],)

    def compute(self, rows: list[pd.Series]) -> list[dict[str, Any]]:
        """Outputs of a batch (one dict per row); raise to have the rows retried one by one."""
        raise NotImplementedError

    def row_outputs(self, outputs: dict[str, Any]) -> dict[str, Any]:
        """The small (text) outputs that travel on in the batch."""
        return {}

    # -- the shared call ----------------------------------------------------------------------
    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        if self.attempts is not None and "row_id" in batch:
            self.attempts.note(batch["row_id"])
        return self._run(batch, compute_misses=True)[0]

    def lookup(self, batch: pd.DataFrame) -> pd.DataFrame | None:
        """The batch completed from the cache alone, or None when any row would need the model."""
        done = self._run(batch, compute_misses=False)
        return None if done is None else done[0]

    def run_with_outputs(self, batch: pd.DataFrame) -> tuple[pd.DataFrame, dict[int, dict[str, Any]]]:
        """Like a call, and also every output (arrays included) by row position, for rows without error."""
        return self._run(batch, compute_misses=True)

    def _run(self, batch: pd.DataFrame, compute_misses: bool) -> tuple[pd.DataFrame, dict[int, dict[str, Any]]] | None:
        batch = batch.reset_index(drop=True)
        started = time.perf_counter()
        todo = [i for i in range(len(batch)) if not batch.at[i, "error_stage"]]
        keys = [""] * len(batch)
        for i in todo:
            keys[i] = self.cache.key(*self.inputs(batch.iloc[i]))
        packed = self.cache.get_many([keys[i] for i in todo])
        hits = np.array([bool(keys[i]) and keys[i] in packed for i in range(len(batch))], dtype=bool)
        misses = [i for i in todo if not hits[i]]
        if misses and not compute_misses:
            return None
        results: dict[int, dict[str, Any]] = {i: unpack(packed[keys[i]]) for i in todo if hits[i]}
        row_packed: dict[int, bytes] = {i: packed[keys[i]] for i in results}
        fresh: dict[str, bytes] = {}
        for i, outputs in zip(misses, self._compute_isolating_errors(batch, misses)):
            if isinstance(outputs, Exception):
                keys[i] = ""
                batch.at[i, "error_stage"] = self.name
                batch.at[i, "error_message"] = f"{type(outputs).__name__}: {outputs}"[:2000]
                continue
            results[i] = outputs
            row_packed[i] = fresh[keys[i]] = pack(outputs)
        self.cache.put_many(fresh)
        for i, outputs in results.items():
            for column, value in self.row_outputs(outputs).items():
                if column not in batch.columns:
                    batch[column] = ""
                batch.at[i, column] = value
        for column in self.row_outputs_columns():
            if column not in batch.columns:
                batch[column] = ""
        if self.carries_arrays:  # the store's writer takes them from here, not from the cache
            batch[arrays_column(self.name)] = [row_packed.get(i, b"") for i in range(len(batch))]
        elapsed = time.perf_counter() - started
        batch[f"t_{self.name}"] = elapsed / max(1, len(batch))
        batch[f"hit_{self.name}"] = hits
        batch[f"key_{self.name}"] = keys
        return batch, results

    def row_outputs_columns(self) -> tuple[str, ...]:
        return ()

    def _compute_isolating_errors(self, batch: pd.DataFrame, positions: list[int]) -> list[Any]:
        if not positions:
            return []
        rows = [batch.iloc[i] for i in positions]
        try:
            return self.compute(rows)
        except Exception:
            if len(rows) == 1:
                return [self._one(rows[0])]
        return [self._one(row) for row in rows]  # one bad row must not fail its neighbours

    def _one(self, row: pd.Series) -> Any:
        try:
            return self.compute([row])[0]
        except Exception as exc:  # becomes an error row
            return exc


class AttemptLog:
    """What the model stages of one run did, for its summary: before a batch, a stage writes the batch's
    ``row_id``s as a new file ``<dir>/<stage>.<pid>.<n>.log`` (a file per batch, never appended to, so it
    works on object storage and survives the process being killed); loading its model, a stage writes
    ``<dir>/<stage>.<pid>.model``. A batch that Ray runs again after its actor died (``max_task_retries``)
    is written again by the restarted actor, so a row seen twice for one stage was begun twice. The folder
    must be one the workers and the driver share (the store's folder is: the workers write its shards)."""

    def __init__(self, directory: str | Path, stage: str) -> None:
        self.directory = str(directory)
        self.prefix = f"{stage}.{os.getpid()}"
        self.batches = 0

    def note(self, row_ids: Any) -> None:
        self.batches += 1
        storage.write_text(storage.join(self.directory, f"{self.prefix}.{self.batches}.log"),
                           "".join(f"{int(i)}\n" for i in row_ids))

    def note_model_loaded(self) -> None:
        storage.write_text(storage.join(self.directory, f"{self.prefix}.model"), "")


def retried_rows(directory: str | Path) -> dict[str, int]:
    """Per stage, how many rows an :class:`AttemptLog` folder shows begun more than once; ``"rows"``:
    the distinct rows any stage began more than once (0 when the folder is absent)."""
    seen: dict[tuple[str, int], int] = {}
    for log in storage.list_files(directory, ".log"):
        stage = storage.name(log).split(".")[0]
        for line in storage.read_text(log).splitlines():
            if line.strip():
                seen[(stage, int(line))] = seen.get((stage, int(line)), 0) + 1
    again = [(stage, row) for (stage, row), n in seen.items() if n > 1]
    out = {stage: sum(1 for s, _ in again if s == stage) for stage in sorted({s for s, _ in seen})}
    return {**out, "rows": len({row for _, row in again})}


def loaded_models(directory: str | Path) -> dict[str, int]:
    """Per stage, how many actors of the run loaded its model (an :class:`AttemptLog` folder)."""
    out: dict[str, int] = {}
    for marker in storage.list_files(directory, ".model"):
        stage = storage.name(marker).split(".")[0]
        out[stage] = out.get(stage, 0) + 1
    return out


def _limit_torch_threads(settings: Any) -> None:
    """Stages share the machine's cores: one actor with a fraction of a CPU gets one torch thread,
    otherwise every actor starts one thread per core and they thrash."""
    resources = getattr(settings, "resources", None)
    if resources is None or resources.num_gpus > 0:
        return
    import torch

    torch.set_num_threads(max(1, int(resources.num_cpus)))


class DecodeStage:
    """Reads each image's bytes (a path or a URI), hashes them (the content address) and decodes them,
    once: the batch gains ``image_id``, ``width``, ``height`` and ``pixels`` (raw RGB bytes, which the
    image stages read instead of the file; :func:`drop_pixels` removes them after the last image stage)."""

    name = "decode"

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        batch = batch.reset_index(drop=True)
        started = time.perf_counter()
        ids, widths, heights, pixels, stages, messages = [], [], [], [], [], []
        for path in batch["image_path"]:
            try:
                data = storage.read_bytes(path)
                with Image.open(io.BytesIO(data)) as img:
                    rgb = img.convert("RGB")
                w, h = rgb.size
                if w == 0 or h == 0:
                    raise ValueError("image has zero size")
                ids.append(hashlib.sha256(data).hexdigest())
                widths.append(w)
                heights.append(h)
                pixels.append(rgb.tobytes())
                stages.append("")
                messages.append("")
            except Exception as exc:
                ids.append("")
                widths.append(0)
                heights.append(0)
                pixels.append(b"")
                stages.append(self.name)
                messages.append(f"{type(exc).__name__}: {exc}"[:2000])
        batch["image_id"] = ids
        batch["width"] = widths
        batch["height"] = heights
        batch[PIXELS_COLUMN] = pixels
        batch["error_stage"] = stages
        batch["error_message"] = messages
        batch["t_decode"] = (time.perf_counter() - started) / max(1, len(batch))
        return batch


def drop_pixels(batch: pd.DataFrame) -> pd.DataFrame:
    return batch.drop(columns=[PIXELS_COLUMN], errors="ignore")


class OcrStage(Stage):
    name = "ocr"

    def load_backend(self):
        from ase_ray.features.backends import build_ocr

        return build_ocr(self.settings)

    def compute(self, rows):
        results = self.backend.read_batch([row_image(r) for r in rows])
        return [{"text": r.text, "fields": json.dumps(r.fields, sort_keys=True)} for r in results]

    def row_outputs(self, outputs):
        return {"ocr_text": outputs["text"], "ocr_fields": outputs["fields"]}

    def row_outputs_columns(self):
        return ("ocr_text", "ocr_fields")


class DescribeStage(Stage):
    name = "describe"

    def load_backend(self):
        from ase_ray.features.backends import build_describer

        return build_describer(self.settings, self.models_dir)

    def compute(self, rows):
        texts = self.backend.describe_batch([row_image(r) for r in rows])
        return [{"text": t} for t in texts]

    def row_outputs(self, outputs):
        return {"description": outputs["text"]}

    def row_outputs_columns(self):
        return ("description",)


class ReasonStage(Stage):
    name = "reason"
    carries_arrays = True

    def load_backend(self):
        from ase_ray.features.backends import build_reasoner

        return build_reasoner(self.settings, self.models_dir)

    def inputs(self, row):
        return (row["ocr_text"], row["description"])

    def compute(self, rows):
        out = self.backend.reason_batch([r["ocr_text"] for r in rows], [r["description"] for r in rows])
        return [{"text": t, "hidden": h.astype(np.float32)} for t, h in zip(out.texts, out.hidden)]

    def row_outputs(self, outputs):
        return {"reasoning": outputs["text"]}

    def row_outputs_columns(self):
        return ("reasoning",)


class ImageEncodeStage(Stage):
    name = "image_encoder"
    carries_arrays = True

    def load_backend(self):
        from ase_ray.features.backends import build_image_encoder

        return build_image_encoder(self.settings, self.models_dir)

    def compute(self, rows):
        feats = self.backend.encode_batch([row_image(r) for r in rows])
        out = [{"pooled": p, "tokens": t.astype(np.float16)} for p, t in zip(feats.pooled, feats.tokens)]
        if feats.stem is not None:
            for entry, stem in zip(out, feats.stem):
                entry["stem"] = stem.astype(np.float16)
        return out


class TextEncodeStage(Stage):
    """Encodes each text source (OCR, description, reasoning, metadata) separately; a row without a
    ``metadata_text`` column has an empty metadata text."""

    name = "text_encoder"
    carries_arrays = True

    def load_backend(self):
        from ase_ray.features.backends import build_text_encoder

        return build_text_encoder(self.settings, self.models_dir)

    def inputs(self, row):
        return tuple(_text(row, TEXT_COLUMNS[s]) for s in TEXT_SOURCES)

    def compute(self, rows):
        outputs: list[dict[str, Any]] = [{} for _ in rows]
        for source in TEXT_SOURCES:
            feats = self.backend.encode_batch([_text(r, TEXT_COLUMNS[source]) for r in rows])
            for out, pooled, tokens, mask, cut in zip(outputs, feats.pooled, feats.tokens, feats.mask, feats.cut):
                out[f"{source}_pooled"] = pooled
                out[f"{source}_tokens"] = tokens.astype(np.float16)
                out[f"{source}_mask"] = mask.astype(np.int8)
                out[f"{source}_cut"] = np.array(cut, dtype=np.int64)  # 0-d, like every other output
        return outputs


def _text(row, column: str) -> str:
    value = row.get(column, "")
    return "" if value is None or (isinstance(value, float) and value != value) else str(value)


STAGES = (OcrStage, DescribeStage, ImageEncodeStage, ReasonStage, TextEncodeStage)
IMAGE_STAGES = ("ocr", "describe", "image_encoder")  # read the pixels; the others read texts only


class StageGroup:
    """Several steps run one after another in one Ray Data actor: optionally decoding first (the
    images then never leave the actor as pixels), then the given stages; the pixels are dropped after
    the last image stage. ``features.fuse_cpu_stages`` puts decode and the cheap CPU stages (OCR, the
    describer, the image encoder) in one group, so a small machine runs fewer processes; on a cluster
    each stage is its own group with its own pool."""

    def __init__(self, stages: list[tuple[type[Stage], Any]], cache_root: str | None, models_dir: str | None = None,
                 attempts_dir: str | None = None, decode: bool = False) -> None:
        self.decode = DecodeStage() if decode else None
        self.stages = [cls(settings, cache_root, models_dir, attempts_dir=attempts_dir) for cls, settings in stages]
        self.drops_pixels = any(stage.name == IMAGE_STAGES[-1] for stage in self.stages)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        if self.decode is not None:
            batch = self.decode(batch)
        for stage in self.stages:
            batch = stage(batch)
        return drop_pixels(batch) if self.drops_pixels else batch


def group_class(stages: list[tuple[type[Stage], Any]], decode: bool) -> type[StageGroup]:
    """A :class:`StageGroup` subclass named after its steps (``DecodeOcrDescribeImageEncoderStages``): Ray
    names a pool's actors after it, so dashboards, logs and ``ray list actors`` tell the pools apart."""
    steps = (["decode"] if decode else []) + [cls.name for cls, _ in stages]
    name = "".join(part.capitalize() for step in steps for part in step.split("_")) + "Stages"
    return type(name, (StageGroup,), {"__module__": __name__})


def stage_plan_of(features: Any) -> list[tuple[type[Stage], Any]]:
    """(stage class, its settings) in pipeline order, from a ``FeaturesConfig``."""
    return [
        (OcrStage, features.ocr),
        (DescribeStage, features.describe),
        (ImageEncodeStage, features.image_encoder),  # the last image stage: the pixels stop here
        (ReasonStage, features.reason),
        (TextEncodeStage, features.text_encoder),
    ]


def ran_models(features) -> dict[str, dict[str, Any]]:
    """``stage_model`` of every stage of a ``FeaturesConfig``, with each stage's own details: what
    stores, MLflow runs and Serve's /metadata record."""
    from ase_ray.features.model_info import stage_details, stage_model

    out = {}
    for stage_cls, settings in stage_plan_of(features):
        out[stage_cls.name] = {**stage_model(stage_cls.name, settings, features.models_dir),
                               **stage_details(stage_cls.name, settings)}
    return out
