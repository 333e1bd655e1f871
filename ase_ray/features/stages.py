"""The extraction stages as Ray Data callables: cache lookup, batched compute, errors as rows.

Every stage is a callable class (one per actor): the backend model is loaded once in ``__init__``.
A call takes a pandas batch and returns it with the stage's *text* outputs added as columns; arrays
(hidden states, pooled vectors, token maps) go to the content-addressed cache only, and the store
is assembled from the cache at the end, so Ray moves small rows and a re-run recomputes nothing.

Columns every stage maintains: ``error_stage`` / ``error_message`` (empty when fine; a row with an
error is passed through untouched by later stages), ``t_<stage>`` (seconds spent on the row),
``hit_<stage>`` (served from cache) and ``key_<stage>`` (its cache entry).

The same stages serve images held in memory (Ray Serve, batch prediction): a batch may carry the
decoded image in an ``image`` column instead of reading ``image_path``, ``cache_root=None`` keeps
nothing on disk, and :meth:`Stage.run_with_outputs` also returns the arrays (see ``inmemory.py``).
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

from ase_ray.features.cache import NoCache, StageCache, fingerprint

TEXT_SOURCES = ("ocr", "description", "reasoning", "metadata")
# The metadata source is the row's record columns as text (ase_ray.data.metadata.TEXT_COLUMN).
TEXT_COLUMNS = {"ocr": "ocr_text", "description": "description", "reasoning": "reasoning", "metadata": "metadata_text"}
IMAGE_COLUMN = "image"  # optional: the decoded RGB image, used instead of reading image_path


def load_rgb(path: str) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def row_image(row: pd.Series) -> Image.Image:
    """The row's image: the in-memory one when the batch carries it, else read from ``image_path``."""
    image = row.get(IMAGE_COLUMN) if IMAGE_COLUMN in row.index else None
    return image if image is not None else load_rgb(row["image_path"])


class Stage:
    """Template: subclasses set ``name`` and implement ``inputs``, ``compute`` and ``row_outputs``."""

    name = "stage"

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
        results: dict[int, dict[str, Any]] = {}
        misses: list[tuple[int, str]] = []
        hits = np.zeros(len(batch), dtype=bool)
        keys = [""] * len(batch)
        for i in todo:
            key = keys[i] = self.cache.key(*self.inputs(batch.iloc[i]))
            cached = self.cache.get(key)
            if cached is None:
                misses.append((i, key))
            else:
                results[i] = cached
                hits[i] = True
        if misses and not compute_misses:
            return None
        for (i, key), outputs in zip(misses, self._compute_isolating_errors(batch, [i for i, _ in misses])):
            if isinstance(outputs, Exception):
                keys[i] = ""
                batch.at[i, "error_stage"] = self.name
                batch.at[i, "error_message"] = f"{type(outputs).__name__}: {outputs}"[:2000]
                continue
            self.cache.put(key, outputs)
            results[i] = outputs
        for i, outputs in results.items():
            for column, value in self.row_outputs(outputs).items():
                if column not in batch.columns:
                    batch[column] = ""
                batch.at[i, column] = value
        for column in self.row_outputs_columns():
            if column not in batch.columns:
                batch[column] = ""
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
    """The rows each model stage began, for the run summary's ``retried`` count: before a batch, the
    stage appends its ``row_id``s, one a line, to ``<dir>/<stage>.<pid>.log`` (its own file per
    process; appended, never rewritten, so a line survives the process being killed). A batch that
    Ray runs again after its actor died (``max_task_retries``) is written again by the restarted
    actor, so a row seen twice for one stage was begun twice. The folder must be one the workers and
    the driver share (the store's folder is: the workers write its shards)."""

    def __init__(self, directory: str | Path, stage: str) -> None:
        self.path = Path(directory) / f"{stage}.{os.getpid()}.log"

    def note(self, row_ids: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write("".join(f"{int(i)}\n" for i in row_ids))


def retried_rows(directory: str | Path) -> dict[str, int]:
    """Per stage, how many rows an :class:`AttemptLog` folder shows begun more than once; ``"rows"``:
    the distinct rows any stage began more than once (0 when the folder is absent)."""
    seen: dict[tuple[str, int], int] = {}
    for log in sorted(Path(directory).glob("*.log")) if Path(directory).is_dir() else []:
        stage = log.name.split(".")[0]
        for line in log.read_text().splitlines():
            if line.strip():
                seen[(stage, int(line))] = seen.get((stage, int(line)), 0) + 1
    again = [(stage, row) for (stage, row), n in seen.items() if n > 1]
    out = {stage: sum(1 for s, _ in again if s == stage) for stage in sorted({s for s, _ in seen})}
    return {**out, "rows": len({row for _, row in again})}


def _limit_torch_threads(settings: Any) -> None:
    """Stages share the machine's cores: one actor with a fraction of a CPU gets one torch thread,
    otherwise every actor starts one thread per core and they thrash."""
    resources = getattr(settings, "resources", None)
    if resources is None or resources.num_gpus > 0:
        return
    import torch

    torch.set_num_threads(max(1, int(resources.num_cpus)))


class DecodeStage:
    """Reads the image bytes, hashes them (the content address) and checks they decode. With
    ``full=False`` only the header is read for the size (the driver's cache lookup: an image that does
    not decode has no cache entry, so it still goes to the workers, which decode it)."""

    name = "decode"

    def __init__(self, full: bool = True) -> None:
        self.full = full

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return self._run(batch, compute_misses=True)

    def lookup(self, batch: pd.DataFrame) -> pd.DataFrame | None:
        """The batch completed from the cache alone, or None when any row would need the model."""
        return self._run(batch, compute_misses=False)

    def _run(self, batch: pd.DataFrame, compute_misses: bool) -> pd.DataFrame | None:
        batch = batch.reset_index(drop=True)
        started = time.perf_counter()
        ids, widths, heights, stages, messages = [], [], [], [], []
        for path in batch["image_path"]:
            try:
                data = Path(path).read_bytes()
                with Image.open(io.BytesIO(data)) as img:
                    if self.full:
                        img.load()
                    w, h = img.size
                if w == 0 or h == 0:
                    raise ValueError("image has zero size")
                ids.append(hashlib.sha256(data).hexdigest())
                widths.append(w)
                heights.append(h)
                stages.append("")
                messages.append("")
            except Exception as exc:
                ids.append("")
                widths.append(0)
                heights.append(0)
                stages.append(self.name)
                messages.append(f"{type(exc).__name__}: {exc}"[:2000])
        batch["image_id"] = ids
        batch["width"] = widths
        batch["height"] = heights
        batch["error_stage"] = stages
        batch["error_message"] = messages
        batch["t_decode"] = (time.perf_counter() - started) / max(1, len(batch))
        return batch


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


STAGES = (OcrStage, DescribeStage, ReasonStage, ImageEncodeStage, TextEncodeStage)


def stage_plan_of(features: Any) -> list[tuple[type[Stage], Any]]:
    """(stage class, its settings) in pipeline order, from a ``FeaturesConfig``."""
    return [
        (OcrStage, features.ocr),
        (DescribeStage, features.describe),
        (ReasonStage, features.reason),
        (ImageEncodeStage, features.image_encoder),
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
