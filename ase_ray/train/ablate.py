"""``ase-ray ablate``: the paper's ablation with group-aware stratified k-fold CV and several seeds.

Protocol, for each task (binary, multi-class), fold and seed:
- the folds come from the original manifest (``kfold_indices``: stratified, grouped);
- TDA rows are made per fold from that fold's training part only (fit and source images), so no test
  image ever shapes a training image; features of all images come from one cached extraction;
- every variant trains in-process (the same epoch loop Ray Train runs) on the training part for
  ``train.epochs`` and is scored by macro-F1 on the held-out fold; the runs go out as Ray tasks;
- the numeric block (``ase_ray.models.numeric``) is fitted on each fold's training part;
- a frozen-feature baseline (standardised pooled image embedding + logistic regression) is scored on
  the same folds.

Variants: ``text-only`` reads the three generated texts (OCR, description, reasoning) and nothing else;
``+numeric block`` adds the parsed OCR numbers; ``+metadata`` adds the records beside the image (the
metadata text source and numeric columns); every later variant reads the image too and all the text
inputs: ``concat`` / ``gated`` (pooled), ``+CMAF`` (token cross-attention), ``+PFA`` (CMAF with the
alignment curriculum), ``+TDA`` (CMAF with TDA images) and ``full`` (CMAF + PFA + TDA). Every variant
reads only the sources ``train.model.text_sources`` and ``numeric_sources`` name: a config may leave out
one that carries nothing on its data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ase_ray.config import AppConfig
from ase_ray.data.manifest import (
    AUGMENTED,
    SPLIT,
    check_some_images_exist,
    read_dataset_info,
    read_manifest,
    write_dataset_info,
    write_manifest,
)
from ase_ray.data.splits import kfold_indices
from ase_ray.errors import DataError
from ase_ray.outputs import check_output_dir

FOLD = "ablate_fold"  # test fold of an original row; training fold of a TDA row
LOGREG = "logreg (frozen image features)"
GENERATED_TEXTS = ["ocr", "description", "reasoning"]
ALL_TEXTS = [*GENERATED_TEXTS, "metadata"]
ALL_NUMERIC = ["ocr", "metadata"]
VARIANTS: dict[str, dict[str, Any]] = {  # keys: ase_ray.train.settings.ABLATION_VARIANTS
    "image-only": {"kind": "image_only", "pfa": False, "tda": False, "texts": ALL_TEXTS, "numeric": [],
                   "image_pooling": "stored"},
    "text-only": {"kind": "text_only", "pfa": False, "tda": False, "texts": GENERATED_TEXTS, "numeric": []},
    "+numeric block": {"kind": "text_only", "pfa": False, "tda": False, "texts": GENERATED_TEXTS, "numeric": ["ocr"]},
    "+metadata": {"kind": "text_only", "pfa": False, "tda": False, "texts": ALL_TEXTS, "numeric": ALL_NUMERIC},
    "concat": {"kind": "concat", "pfa": False, "tda": False, "texts": ALL_TEXTS, "numeric": ALL_NUMERIC},
    "gated": {"kind": "gated", "pfa": False, "tda": False, "texts": ALL_TEXTS, "numeric": ALL_NUMERIC},
    "+CMAF": {"kind": "cmaf", "pfa": False, "tda": False, "texts": ALL_TEXTS, "numeric": ALL_NUMERIC},
    "+PFA": {"kind": "cmaf", "pfa": True, "tda": False, "texts": ALL_TEXTS, "numeric": ALL_NUMERIC},
    "+TDA": {"kind": "cmaf", "pfa": False, "tda": True, "texts": ALL_TEXTS, "numeric": ALL_NUMERIC},
    "full (PFA+CMAF+TDA)": {"kind": "cmaf", "pfa": True, "tda": True, "texts": ALL_TEXTS, "numeric": ALL_NUMERIC,
                            "tda_optional": True},
    # not in the default list: for image sets (configs/magnetic_tile.yaml)
    "image-only (patch attention)": {"kind": "image_only", "pfa": False, "tda": False, "texts": ALL_TEXTS,
                                     "numeric": [], "image_pooling": "attention"},
    # a trainable head over the stride-16 map, supervised per cell by the masks (the store needs image_stem)
    "image-only (defect maps)": {"kind": "image_only", "pfa": False, "tda": False, "texts": ALL_TEXTS,
                                 "numeric": [], "image_pooling": "defect_maps"},
    # train.finetune: the encoder's later stages trained too (the store needs image_stem)
    "image-only (fine-tuned)": {"kind": "image_only", "pfa": False, "tda": False, "texts": ALL_TEXTS,
                                "numeric": [], "finetune": True, "image_pooling": "stored"},
}
FULL_WITHOUT_TDA = "full (PFA+CMAF; TDA not applicable)"  # the row's name when the data have no dots


@dataclass
class AblationResult:
    table: str
    rows: list[dict[str, Any]]
    table_path: Path
    json_path: Path


def run_ablation(config: AppConfig, manifest_path: str | Path, out_dir: str | Path, echo=print) -> AblationResult:
    from ase_ray.features.pipeline import extract_features
    from ase_ray.ray_env import ensure_ray

    a = config.ablate
    unknown = sorted(set(a.variants) - set(VARIANTS))
    if unknown:
        raise DataError(f"unknown ablation variant(s) {unknown}; valid: {list(VARIANTS)}")
    stem_readers = [v for v in a.variants if _reads_stem(config, VARIANTS[v])]
    if stem_readers and not config.features.image_encoder.stem:
        raise DataError(f"variant(s) {stem_readers} read the image encoder's stored stride-16 maps (fine-tuning or "
                        "defect maps): add --set features.image_encoder.stem=true")
    _check_text_sources(config, a.variants)
    out_dir = check_output_dir(Path(out_dir).resolve(), "ablate --out")
    manifest = _original_rows(read_manifest(manifest_path))
    check_some_images_exist(manifest, Path(manifest_path))
    info = read_dataset_info(manifest_path)
    folds = kfold_indices(manifest, a.folds, config.project.seed, config.data.split.label_column)
    manifest[FOLD] = -1
    for k, (_, test) in enumerate(folds):
        manifest.iloc[test, manifest.columns.get_loc(FOLD)] = k
    want_tda = any(VARIANTS[v]["tda"] for v in a.variants)
    tda_rows, tda_note = _tda_per_fold(config, manifest, folds, out_dir / "tda", echo) if want_tda else (None, "")
    combined = pd.concat([manifest, tda_rows], ignore_index=True) if tda_rows is not None else manifest
    combined_path = write_manifest(combined, out_dir / "manifest.csv", relative_to_manifest=False)
    if info is not None:
        write_dataset_info(out_dir, info)
    ensure_ray(config.ray)
    extraction = extract_features(config, combined_path, out_dir / "store", echo=echo, track=False)
    scores = _score_everything(config, out_dir / "store", a.folds, tda_rows is not None, echo)
    rows = _aggregate(scores, a.variants, tda_rows is not None, tda_note)
    table = markdown_table(rows, config, manifest, extraction.summary)
    table_path = out_dir / "ablation.md"
    table_path.write_text(table)
    json_path = out_dir / "ablation.json"
    json_path.write_text(json.dumps({"rows": rows, "scores": scores, "folds": a.folds, "seeds": a.seeds,
                                     "first_seed": a.first_seed, "epochs": config.train.epochs, "manifest": str(manifest_path),
                                     "text_sources": config.train.model.text_sources,
                                     "numeric_sources": config.train.model.numeric_sources,
                                     "extraction": extraction.summary}, indent=2))
    _log_to_mlflow(config, rows, table_path, json_path)
    echo(table)
    return AblationResult(table, rows, table_path, json_path)


def _original_rows(df: pd.DataFrame) -> pd.DataFrame:
    if AUGMENTED in df.columns and df[AUGMENTED].astype(str).str.lower().eq("true").any():
        raise DataError("ablate takes the original manifest (no TDA rows): it augments each fold itself")
    return df.drop(columns=[c for c in (SPLIT, AUGMENTED, "source_image", FOLD) if c in df.columns]).reset_index(drop=True)


def _tda_per_fold(config, manifest, folds, tda_dir: Path, echo) -> tuple[pd.DataFrame | None, str]:
    from ase_ray.data.tda import augment_manifest

    made = []
    for k, (train, _) in enumerate(folds):
        fold_df = manifest.copy()
        fold_df[SPLIT] = "test"
        fold_df.iloc[train, fold_df.columns.get_loc(SPLIT)] = "train"
        result = augment_manifest(fold_df.drop(columns=[FOLD]), tda_dir / f"fold_{k}", config.data.tda)
        new = result.manifest[result.manifest[AUGMENTED].astype(bool)].copy()
        if len(new) == 0:
            reasons = "; ".join(f"{c}: {w}" for c, w in result.skipped.items()) or "nothing to add"
            echo(f"TDA made no images ({reasons})")
            return None, f"TDA not applicable: {reasons}"
        new[FOLD] = k
        made.append(new.drop(columns=[SPLIT]))
        echo(f"TDA fold {k}: +{len(new)} training images")
    return pd.concat(made, ignore_index=True), ""


def _score_everything(config: AppConfig, store_dir: Path, n_folds: int, with_tda: bool, echo) -> list[dict[str, Any]]:
    import ray

    from ase_ray.features.store import load_store
    from ase_ray.models.defect_maps import DEFECT_TARGET
    from ase_ray.train.data import (
        defect_targets,
        image_tail_spec,
        store_arrays,
        store_metadata,
        task_classes,
        task_normal_class,
        without_stem,
    )

    a = config.ablate
    store = load_store(store_dir)
    constant = store.meta.get("constant_sources", [])  # left out of every variant, as `ase-ray train` does
    metadata = store_metadata(store.meta)
    rows = store.features
    augmented = rows[AUGMENTED].astype(str).str.lower().eq("true").to_numpy() if AUGMENTED in rows else np.zeros(len(rows), bool)
    fold_of = rows[FOLD].astype(int).to_numpy()
    finetunes = any(VARIANTS[v].get("finetune") for v in a.variants)
    tail = image_tail_spec(store.meta) if finetunes else None
    maps = any(_image_pooling(config, VARIANTS[v]) == "defect_maps" for v in a.variants)
    train_and_score = ray.remote(_train_and_score)
    jobs, scores = [], []
    for task in a.tasks:
        classes = task_classes(store, task)
        normal = task_normal_class(store_dir, task, classes)
        arrays = store_arrays(store, task, classes)
        if not finetunes and not maps:
            arrays = without_stem(arrays)
        if maps:  # every row's, but a run reads its training rows' only (_train_and_score)
            arrays.features[DEFECT_TARGET] = defect_targets(store.meta, arrays.rows, arrays.labels, classes, normal)
        shared = ray.put({"features": {k: _compact(v) for k, v in arrays.features.items()}, "labels": arrays.labels})
        for k in range(n_folds):
            test = np.flatnonzero(~augmented & (fold_of == k))
            train_plain = np.flatnonzero(~augmented & (fold_of != k))
            train_tda = np.concatenate([train_plain, np.flatnonzero(augmented & (fold_of == k))])
            scores.append(_logreg_score(arrays, train_plain, test, classes, task, k, normal))
            numeric: dict[tuple[str, ...], Any] = {}
            for variant in a.variants:
                spec = VARIANTS[variant]
                if spec["tda"] and not with_tda and not spec.get("tda_optional"):
                    continue
                train = train_tda if spec["tda"] and with_tda else train_plain
                sources = tuple(spec["numeric"])
                if sources not in numeric:  # fitted on this fold's training part only
                    numeric[sources] = ray.put(_fold_numeric(arrays, train_plain, list(sources), metadata))
                for seed in range(a.first_seed, a.first_seed + a.seeds):
                    cfg = _variant_config(config, spec, task, seed, constant, tail)
                    jobs.append(train_and_score.options(num_cpus=a.cpus_per_run).remote(
                        shared, numeric[sources], train, test, cfg.train.model_dump(mode="json"), classes,
                        {"task": task, "variant": variant, "fold": k, "seed": seed}, normal))
    echo(f"ablation: {len(jobs)} trainings ({a.cpus_per_run} CPU each) + {len(scores)} logistic regressions")
    done = 0
    pending = list(jobs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        scores.append(ray.get(ready[0]))
        done += 1
        if done % 10 == 0 or not pending:
            echo(f"  {done}/{len(jobs)} trainings done")
    return scores


def _compact(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16) if values.dtype.kind == "f" and values.ndim >= 3 else values


def _fold_numeric(arrays, train: np.ndarray, sources: list[str], metadata) -> np.ndarray | None:
    """The numeric block of every row, fitted on the fold's ``train`` rows (None: no block)."""
    from ase_ray.models.numeric import NUMERIC_KEY
    from ase_ray.train.data import fit_numeric, with_numeric

    block = fit_numeric(arrays.take(train), sources, metadata)
    return with_numeric(arrays, block, metadata).features.get(NUMERIC_KEY) if block.fields else None


def _variant_config(config: AppConfig, spec: dict[str, Any], task: str, seed: int,
                    constant: list[str] = (), image_tail=None) -> AppConfig:
    train = config.train.model_copy(deep=True)
    train.task = task
    train.seed = seed
    train.model.kind = spec["kind"]
    train.pfa.enabled = spec["pfa"]
    train.model.text_sources = variant_text_sources(config, spec, constant) or list(spec["texts"])  # unread by image-only
    train.model.numeric_sources = [s for s in spec["numeric"] if s in config.train.model.numeric_sources]
    if _image_pooling(config, spec) != "defect_maps":
        train.model.defect_map_decision = 0.0  # the vote reads the defect maps this variant does not build
    train.model.image_pooling = _image_pooling(config, spec)
    if spec.get("finetune"):
        train.finetune.enabled = True
        train.model.image_tail = image_tail
    return config.model_copy(update={"train": train})


def variant_text_sources(config: AppConfig, spec: dict[str, Any], constant: list[str] = ()) -> list[str]:
    """The variant's text sources that ``train.model.text_sources`` names (a config leaves out a source
    that carries nothing on its data, e.g. OCR on images without printed text), less the constant ones
    (unless that leaves none)."""
    named = [s for s in spec["texts"] if s in config.train.model.text_sources]
    return [s for s in named if s not in constant] or named


def _check_text_sources(config: AppConfig, variants: list[str]) -> None:
    """A variant that reads text needs one of its sources in ``train.model.text_sources``."""
    starved = [v for v in variants if VARIANTS[v]["kind"] != "image_only" and not variant_text_sources(config, VARIANTS[v])]
    if starved:
        raise DataError(f"variant(s) {starved} read none of train.model.text_sources "
                        f"{config.train.model.text_sources}: name one of their sources there, or drop them")


def _image_pooling(config: AppConfig, spec: dict[str, Any]) -> str:
    """A variant's own image pooling, else the config's (the fused variants take the configured image branch)."""
    return spec.get("image_pooling", config.train.model.image_pooling)


def _reads_stem(config: AppConfig, spec: dict[str, Any]) -> bool:
    return bool(spec.get("finetune")) or _image_pooling(config, spec) == "defect_maps"


def _train_and_score(shared, numeric, train, test, train_cfg, classes, tags, normal=None) -> dict[str, Any]:
    import torch

    from ase_ray.models.defect_maps import DEFECT_TARGET
    from ase_ray.train.data import LABEL_KEY, STEM
    from ase_ray.train.loop import predict_proba, run_epochs
    from ase_ray.train.metrics import classification_metrics
    from ase_ray.train.settings import TrainConfig

    torch.set_num_threads(1)
    cfg = TrainConfig.model_validate(train_cfg)
    features, labels = dict(shared["features"]), shared["labels"]
    if numeric is not None:
        from ase_ray.models.numeric import NUMERIC_KEY

        features[NUMERIC_KEY] = numeric
    if not cfg.finetune.enabled and cfg.model.image_pooling != "defect_maps":
        features = {k: v for k, v in features.items() if k not in (STEM, DEFECT_TARGET)}
    elif cfg.model.image_pooling != "defect_maps":
        features.pop(DEFECT_TARGET, None)
    train_arrays = {k: v[train] for k, v in features.items()}
    train_arrays[LABEL_KEY] = labels[train]
    result = run_epochs(train_arrays, {}, cfg, classes)
    test_features = {k: v[test] for k, v in features.items() if k != DEFECT_TARGET}  # a test mask is never read
    probs = predict_proba(result.kept, test_features)  # the kept model: the last epoch, or the average
    metrics = classification_metrics(labels[test], probs.argmax(1), classes)
    return {**tags, "macro_f1": metrics["macro_f1"], "accuracy": metrics["accuracy"], "n_train": int(len(train)),
            "n_test": int(len(test)), "per_class_f1": _per_class_f1(metrics),
            **_line(probs.argmax(1), labels[test], classes, normal)}


def _line(predicted, labels, classes, normal) -> dict[str, float]:
    """Escape and overkill of the predicted labels (a fold has no validation part to choose a reject
    threshold on, so the ablation reports the labels' own)."""
    if normal is None or normal not in classes:
        return {}
    from ase_ray.models.decision import label_line_rates

    rates = label_line_rates(predicted, labels, classes, normal)
    return {"escape_rate": rates["escape_rate"], "overkill_rate": rates["overkill_rate"]}


def _per_class_f1(metrics: dict[str, Any]) -> dict[str, float]:
    return {c: scores["f1"] for c, scores in metrics["per_class"].items()}


def _logreg_score(arrays, train, test, classes, task, fold, normal=None) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from ase_ray.train.metrics import classification_metrics

    x = arrays.features["image_pooled"]
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(x[train], arrays.labels[train])
    predicted = model.predict(x[test])
    metrics = classification_metrics(arrays.labels[test], predicted, classes)
    return {"task": task, "variant": LOGREG, "fold": fold, "seed": 0, "macro_f1": metrics["macro_f1"],
            "accuracy": metrics["accuracy"], "n_train": int(len(train)), "n_test": int(len(test)),
            "per_class_f1": _per_class_f1(metrics), **_line(predicted, arrays.labels[test], classes, normal)}


def _aggregate(scores, variants, with_tda: bool, tda_note: str) -> list[dict[str, Any]]:
    frame = pd.DataFrame(scores)
    rows = []
    for variant in [LOGREG, *variants]:
        spec = VARIANTS.get(variant, {})
        without_tda = spec.get("tda_optional") and not with_tda
        row: dict[str, Any] = {"variant": FULL_WITHOUT_TDA if without_tda else variant}
        for task in ("binary", "multiclass"):
            picked = frame[(frame["variant"] == variant) & (frame["task"] == task)] if len(frame) else frame
            values = picked["macro_f1"] if len(picked) else []
            if len(values):
                row[task] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": int(len(values))}
                per_class = [s for s in picked.get("per_class_f1", []) if isinstance(s, dict)]
                if per_class:
                    row[task]["per_class_f1"] = {c: float(np.mean([s[c] for s in per_class])) for c in per_class[0]}
                for rate in ("escape_rate", "overkill_rate"):
                    if rate in picked and picked[rate].notna().any():
                        row[task][rate] = float(picked[rate].mean())
            elif spec.get("tda") and not with_tda:
                row[task] = {"note": tda_note or "TDA not applicable"}
        if without_tda:
            row["note"] = tda_note or "TDA not applicable"
        rows.append(row)
    return rows


def _sources_note(config: AppConfig) -> str:
    """A sentence naming the sources the config leaves out of every variant (empty when it keeps all)."""
    model = config.train.model
    left_out = [s for s in ALL_TEXTS if s not in model.text_sources]
    numeric = [s for s in ALL_NUMERIC if s not in model.numeric_sources]
    if not left_out and not numeric:
        return ""
    return (f" The config leaves out of every variant the text source(s) {left_out or 'none'} and the numeric "
            f"source(s) {numeric or 'none'} (train.model.text_sources / numeric_sources).")


def markdown_table(rows, config: AppConfig, manifest: pd.DataFrame, extraction: dict[str, Any]) -> str:
    a = config.ablate
    lines = [
        f"Macro-F1, mean ± std over {a.folds} group-aware stratified folds x {a.seeds} seed(s)"
        + (f" from seed {a.first_seed}" if a.first_seed else "") + " "
        f"({len(manifest)} images, {config.train.epochs} epochs, lr {config.train.lr}, batch {config.train.batch_size})."
        + _sources_note(config),
        "",
        "| variant | binary | multi-class |",
        "|---|---|---|",
    ]
    for row in rows:
        cells = []
        for task in ("binary", "multiclass"):
            cell = row.get(task)
            if cell is None:
                cells.append("-")
            elif "note" in cell:
                cells.append("n/a")
            else:
                cells.append(f"{cell['mean']:.4f} ± {cell['std']:.4f}")
        lines.append(f"| {row['variant']} | {cells[0]} | {cells[1]} |")
    line = [r for r in rows if any("escape_rate" in (r.get(t) or {}) for t in ("binary", "multiclass"))]
    if line:
        lines += ["", "Escape / overkill rate of the predicted labels (multi-class collapsed to normal vs defect), "
                  "mean over folds and seeds:", "", "| variant | binary | multi-class |", "|---|---|---|"]
        for row in line:
            cells = [f"{c['escape_rate']:.3f} / {c['overkill_rate']:.3f}" if "escape_rate" in (c := row.get(t) or {})
                     else "-" for t in ("binary", "multiclass")]
            lines.append(f"| {row['variant']} | {cells[0]} | {cells[1]} |")
    best = max((r for r in rows if "per_class_f1" in r.get("multiclass", {})),
               key=lambda r: r["multiclass"]["mean"], default=None)
    if best is not None:
        f1 = ", ".join(f"{c} {v:.2f}" for c, v in best["multiclass"]["per_class_f1"].items())
        lines += ["", f"Per-class F1 of the best multi-class row ({best['variant']}), mean over folds and seeds: {f1}."]
    notes = {cell["note"] for row in rows for cell in row.values() if isinstance(cell, dict) and "note" in cell}
    lines += ["", *[f"n/a: {n}" for n in sorted(notes)]] if notes else []
    if extraction.get("errors"):
        lines.append(f"{extraction['errors']} image(s) failed feature extraction and are left out (errors.parquet).")
    return "\n".join(lines) + "\n"


def _log_to_mlflow(config: AppConfig, rows, table_path: Path, json_path: Path) -> None:
    from ase_ray.tracking import config_params, setup_mlflow

    mlflow = setup_mlflow(config)
    with mlflow.start_run(run_name="ablate", tags={"ase_ray.stage": "ablate"}):
        mlflow.log_params(config_params(config, ("ablate", "train", "features")))
        for row in rows:
            for task in ("binary", "multiclass"):
                cell = row.get(task)
                if cell and "mean" in cell:
                    key = f"{task}.{_metric_name(row['variant'])}"
                    mlflow.log_metrics({f"{key}.mean": cell["mean"], f"{key}.std": cell["std"],
                                        **{f"{key}.{r}": cell[r] for r in ("escape_rate", "overkill_rate") if r in cell}})
        mlflow.log_artifact(str(table_path))
        mlflow.log_artifact(str(json_path))


def _metric_name(variant: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in variant).strip("_")
