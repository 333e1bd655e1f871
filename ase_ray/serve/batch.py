"""``ase-ray predict``: the Serve predictor over a manifest as a Ray Data batch job.

Each actor loads the model and the feature backends once (:class:`~ase_ray.serve.predictor.Predictor`,
the same code Serve runs) and predicts batches of images read from ``image_path``. The stage cache
(``features.cache_dir``) is used, so images whose features were already extracted with the model's
settings are not recomputed. Output folder: ``predictions.parquet`` and ``predictions.csv`` (one row
per manifest row, in order: the manifest columns, ``image_id`` (sha256 of the bytes), ``predicted_label``, ``confidence``,
``needs_review``, ``p_defect``, ``decision`` (pass / reject), ``prob_<class>``, the texts, ``error``),
and ``summary.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ase_ray.config import AppConfig
from ase_ray.data.manifest import (
    IMAGE_PATH,
    check_some_images_exist,
    chunks,
    read_dataset_info,
    read_table,
    resolve_image_path,
)
from ase_ray.errors import DataError, ManifestError
from ase_ray import storage
from ase_ray.outputs import check_output_location

PREDICTIONS_PARQUET = "predictions.parquet"
PREDICTIONS_CSV = "predictions.csv"
SUMMARY_FILE = "summary.json"


@dataclass
class PredictResult:
    out_dir: str  # a path or a URI
    predictions: pd.DataFrame
    summary: dict[str, Any]


def read_inputs(path: str | Path) -> pd.DataFrame:
    """A manifest for prediction: only ``image_path`` is required (labels are optional)."""
    path = Path(path)
    df = read_table(path, "manifest", dtype=str)
    if IMAGE_PATH not in df.columns:
        raise ManifestError(f"manifest {path} has no {IMAGE_PATH!r} column; it has {list(df.columns)}")
    if len(df) == 0:
        raise DataError(f"manifest {path} has no rows")
    df = df.reset_index(drop=True)
    df[IMAGE_PATH] = [resolve_image_path(p, path.parent) for p in df[IMAGE_PATH]]
    check_some_images_exist(df, path)
    df.insert(0, "row_id", np.arange(len(df), dtype=np.int64))
    return df


class BatchPredictor:
    """Ray Data callable: one Predictor per actor."""

    def __init__(self, config: dict[str, Any], ref: dict[str, Any]) -> None:
        from ase_ray.features.pipeline import cache_root
        from ase_ray.serve.predictor import ModelRef, Predictor

        app = AppConfig.model_validate(config)
        resources = app.serve.features.model_copy(update={"num_cpus": app.serve.predict.num_cpus,
                                                          "num_gpus": app.serve.predict.num_gpus})
        self.predictor = Predictor.load(app, ModelRef(**ref), str(cache_root(app)), resources)
        self.classes = self.predictor.model.classes
        self.metadata_columns = self.predictor.model.metadata_columns.all

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from ase_ray.features.inmemory import decode_image_bytes

        batch = batch.reset_index(drop=True)
        decoded, errors = {}, {}
        for i, path in enumerate(batch[IMAGE_PATH]):
            try:
                decoded[i] = decode_image_bytes(Path(path).read_bytes())
            except Exception as exc:  # missing file, not an image, truncated...
                errors[i] = f"decode: {type(exc).__name__}: {exc}"[:500]
        order = sorted(decoded)
        records = [{c: batch.at[i, c] for c in self.metadata_columns} for i in order]
        results = dict(zip(order, self.predictor.predict([decoded[i] for i in order], records)))
        made = pd.DataFrame([self._row(results.get(i), errors.get(i, "")) for i in range(len(batch))])
        return pd.concat([batch, made.drop(columns=[c for c in made.columns if c in batch.columns])], axis=1)

    def _row(self, result: dict[str, Any] | None, decode_error: str) -> dict[str, Any]:
        result = result or {}
        error = decode_error or result.get("error", "")
        probs = result.get("probabilities", {})
        model = self.predictor.model.ref
        row = {
            "image_id": result.get("image_id", ""),
            "predicted_label": "" if error else result["label"],
            "confidence": np.nan if error else result["confidence"],
            "needs_review": True if error else result["needs_review"],
            "p_defect": np.nan if error or result.get("p_defect") is None else result["p_defect"],
            "decision": "" if error else (result.get("decision") or ""),
            **{f"prob_{c}": float(probs.get(c, np.nan)) for c in self.classes},
            "ocr_text": result.get("ocr_text", ""),
            "ocr_fields": json.dumps(result.get("ocr_fields", {}), sort_keys=True),
            "description": result.get("description", ""),
            "reasoning": result.get("reasoning", ""),
            "metadata_text": result.get("metadata_text", ""),
            "error": error,
            "model_uri": model.uri,
            "model_version": model.version or "",
        }
        return row


def predict_manifest(config: AppConfig, manifest_path: str | Path, out_dir: str | Path,
                     model_uri: str | None = None, echo=print) -> PredictResult:
    """Predict every row of a manifest on Ray Data; write the predictions and a summary."""
    import ray.data

    from ase_ray.features.pipeline import apply_layout_hints
    from ase_ray.ray_env import ensure_ray
    from ase_ray.serve.deploy import check_model, serving_config

    out_dir = check_output_location(out_dir, "predict --out")
    rows = read_inputs(manifest_path)
    ref = check_model(config, model_uri)  # before serving_config, which makes the work dir for MLflow
    # The model's recorded feature settings win; the layout hint only matters for older models.
    config = serving_config(apply_layout_hints(config, read_dataset_info(manifest_path)))
    check_metadata_columns(config, ref, rows, manifest_path)
    ensure_ray(config.ray)
    s = config.serve.predict
    started = time.perf_counter()
    # from_items builds the blocks here; from_pandas would start a 1-CPU task per block, which never
    # runs while a Serve app holds all but a fraction of a CPU.
    records = rows.astype({c: str for c in rows.columns if rows[c].dtype == object}).to_dict("records")
    ds = ray.data.from_items(records, override_num_blocks=max(1, len(chunks(rows, s.batch_size)))).map_batches(
        BatchPredictor,
        fn_constructor_args=(config.model_dump(mode="json"), ref.describe()),
        batch_format="pandas",
        batch_size=s.batch_size,
        compute=ray.data.ActorPoolStrategy(size=s.actors),
        num_cpus=s.num_cpus,
        num_gpus=s.num_gpus,
    )
    predictions = ds.to_pandas().sort_values("row_id").reset_index(drop=True)
    wall = time.perf_counter() - started
    if len(predictions) != len(rows):
        raise DataError(f"prediction returned {len(predictions)} rows for {len(rows)} inputs")
    storage.write_bytes(storage.join(out_dir, PREDICTIONS_PARQUET), predictions.to_parquet(index=False))
    storage.write_text(storage.join(out_dir, PREDICTIONS_CSV), predictions.to_csv(index=False))
    summary = summarise(predictions, ref.describe(), wall)
    storage.write_text(storage.join(out_dir, SUMMARY_FILE), json.dumps(summary, indent=2))
    echo(f"predicted {summary['predicted']} of {summary['rows']} images ({summary['errors']} errors) in "
         f"{summary['wall_s']} s with {ref.uri}" + (f" version {ref.version}" if ref.version else ""))
    return PredictResult(out_dir, predictions, summary)


def check_metadata_columns(config: AppConfig, ref, rows: pd.DataFrame, manifest_path: str | Path) -> None:
    """The manifest must carry every metadata column the model reads (empty cells are unknown values)."""
    from ase_ray.serve.predictor import model_serving_record
    from ase_ray.tracking import tracking_uri

    columns = model_serving_record(ref, tracking_uri(config))[1]
    missing = [c for c in columns.all if c not in rows.columns]
    if missing:
        raise ManifestError(f"manifest {manifest_path} lacks the metadata column(s) {missing} that model "
                            f"{ref.uri} reads (it reads {columns.all}); add them (empty cells are unknown values)")


def summarise(predictions: pd.DataFrame, model: dict[str, Any], wall_s: float) -> dict[str, Any]:
    ok = predictions["error"] == ""
    return {
        "rows": int(len(predictions)),
        "predicted": int(ok.sum()),
        "errors": int((~ok).sum()),
        "needs_review": int(predictions.loc[ok, "needs_review"].sum()),
        "rejected": int((predictions.loc[ok, "decision"] == "reject").sum()) if "decision" in predictions else 0,
        "labels": {str(k): int(v) for k, v in predictions.loc[ok, "predicted_label"].value_counts().items()},
        "wall_s": round(wall_s, 2),
        "model": model,
    }
