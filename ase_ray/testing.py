"""Dummy data for tests and benchmarks: a small feature store with a learnable class signal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ase_ray.data.manifest import DatasetInfo, write_dataset_info
from ase_ray.features.stages import TEXT_COLUMNS, TEXT_SOURCES
from ase_ray.features.store import Store, write_store_arrays


def fake_feature_store(
    out_dir: str | Path,
    classes: tuple[str, ...] = ("normal", "scratch", "void"),
    per_class: int = 12,
    image_dim: int = 24,
    image_tokens: int = 9,
    text_dim: int = 16,
    text_len: int = 7,
    llm_dim: int = 20,
    signal: float = 1.5,
    seed: int = 0,
    constant_sources: tuple[str, ...] = (),
    records: dict[str, list] | None = None,
    image_encoder: dict | None = None,
    masks: bool = False,
) -> Store:
    """A store in the real format; each class shifts the features along its own random direction.
    A source in ``constant_sources`` has one text and the same features on every row (no information).
    ``records``: metadata columns (name -> one value per row, rows ordered class by class, ``per_class``
    each) recorded as the store's metadata columns (numbers: numeric, else text). ``image_encoder``
    (``ImageEncoderSettings`` fields): the store was extracted with that encoder and ``stem`` on, so it
    has ``image_stem`` of the encoder's shape and its image widths override ``image_dim``/``image_tokens``
    (what fine-tuning needs). ``masks`` (with ``image_encoder``, ``resize: pad``): every row has a mask
    (``mask_path``, a square png of ``image_size``): a defect row's marks one random cell of the
    stride-16 map, and its ``image_stem`` carries its class's planted vector in that cell only (what the
    defect maps must find); a normal row's mask is empty."""
    encoder_settings, stem_shape, pooled_dim = None, None, image_dim
    if image_encoder is not None:
        from ase_ray.features.backends import build_image_encoder
        from ase_ray.features.settings import ImageEncoderSettings

        encoder_settings = ImageEncoderSettings(**{**image_encoder, "stem": True})
        encoder = build_image_encoder(encoder_settings)
        stem_shape, image_dim, pooled_dim = encoder.stem_shape, encoder.feature_dim, encoder.pooled_dim
        image_tokens = (-(-encoder_settings.image_size // 32)) ** 2
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(classes)), per_class)
    n = len(labels)
    splits = np.array(["train", "train", "train", "val", "test"])[np.arange(n) % 5]

    def with_signal(shape: tuple[int, ...]) -> np.ndarray:
        directions = rng.normal(size=(len(classes), *shape))
        return (rng.normal(size=(n, *shape)) + signal * directions[labels]).astype(np.float32)

    arrays = {
        "image_pooled": with_signal((pooled_dim,)),
        "image_tokens": with_signal((image_tokens, image_dim)).astype(np.float16),
        "llm_hidden": with_signal((llm_dim,)),
    }
    if stem_shape is not None:
        arrays["image_stem"] = with_signal(stem_shape).astype(np.float16)
    out_dir = Path(out_dir)
    mask_paths = _planted_masks(out_dir, arrays, labels, encoder_settings, rng) if masks else None
    for src in TEXT_SOURCES:
        arrays[f"text_{src}_pooled"] = with_signal((text_dim,))
        arrays[f"text_{src}_tokens"] = with_signal((text_len, text_dim)).astype(np.float16)
        lengths = rng.integers(2, text_len + 1, size=n)
        arrays[f"text_{src}_mask"] = (np.arange(text_len)[None, :] < lengths[:, None]).astype(np.int8)
        if src in constant_sources:
            for part in ("pooled", "tokens", "mask"):
                arrays[f"text_{src}_{part}"] = np.repeat(arrays[f"text_{src}_{part}"][:1], n, axis=0)
    rows = pd.DataFrame(
        {
            "row_id": np.arange(n),
            "image_id": [f"{i:064x}" for i in range(n)],
            "image_path": [str(out_dir / f"img_{i}.png") for i in range(n)],
            "label": [classes[i] for i in labels],
            "binary_label": ["normal" if i == 0 else "defect" for i in labels],
            "group": [f"g{i}" for i in range(n)],
            "split": splits,
            "ocr_text": [f"LEN {i % 7}.0" for i in range(n)],
            "description": [f"a board with {i % 5} marks" for i in range(n)],
            "reasoning": [f"maybe a defect ({i % 3})" for i in range(n)],
            "ocr_fields": [json.dumps({"LEN": float(i % 7)}) for i in range(n)],
            "metadata_text": [f"note: mark {i % 4}" for i in range(n)],
        }
    )
    if mask_paths is not None:
        rows["mask_path"] = mask_paths
    for src in constant_sources:
        rows[TEXT_COLUMNS[src]] = "the same text"
    metadata = {"text": [], "numeric": []}
    for name, values in (records or {}).items():
        rows[name] = list(values)
        numeric = all(isinstance(v, (int, float, np.number)) for v in values)
        metadata["numeric" if numeric else "text"].append(name)
    manifest = out_dir / "manifest.csv"
    write_dataset_info(out_dir, DatasetInfo(list(classes), classes[0], "fake"))
    errors = pd.DataFrame({c: pd.Series(dtype=t) for c, t in
                           (("row_id", "int64"), ("image_path", str), ("label", str), ("stage", str), ("message", str))})
    meta = {"manifest": str(manifest), "backends": {"fake": {"model": "random arrays (ase_ray.testing)"}},
            "metadata_columns": metadata}
    if encoder_settings is not None:
        meta["features"] = {"image_encoder": encoder_settings.model_dump(mode="json")}
    return write_store_arrays(rows, arrays, errors, out_dir, meta)


def _planted_masks(out_dir: Path, arrays: dict, labels: np.ndarray, settings, rng) -> list[str]:
    from PIL import Image

    if settings is None:
        raise ValueError("masks=True needs image_encoder (the stem the masks describe)")
    stem = arrays["image_stem"]
    channels, side = stem.shape[1], stem.shape[2]
    planted = rng.normal(size=(int(labels.max()) + 1, channels)) * 4.0
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, label in enumerate(labels):
        mask = np.zeros((settings.image_size, settings.image_size), np.uint8)
        if label != 0:
            r, c = rng.integers(0, side, size=2)
            mask[16 * r: 16 * (r + 1), 16 * c: 16 * (c + 1)] = 255
            stem[i, :, r, c] = stem[i, :, r, c] + planted[label]
        paths.append(str(out_dir / f"mask_{i}.png"))
        Image.fromarray(mask).save(paths[-1])
    return paths


def register_untrained_model(
    config,
    images: list,
    model_name: str,
    alias: str | None = "champion",
    seed: int = 0,
    out_dir: str | Path | None = None,
    metadata=None,
    records: list[dict] | None = None,
    decision: dict | None = None,
) -> str:
    """Log and register a randomly initialised classifier whose input widths match what
    ``config.features`` extracts from ``images`` (decoded images), with the feature settings recorded
    beside it, as training does. For tests and the Serve load benchmark (no training run needed).
    ``metadata`` (``MetadataColumns``) and ``records`` (one per image): the model reads those records,
    its numeric block fitted on them and the images' OCR fields. ``decision``: the model's decision record
    (``ase_ray.models.decision``: reject and review thresholds), as training would choose it. Returns the
    registered version."""
    import tempfile
    from types import SimpleNamespace

    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    from ase_ray.features.inmemory import FeatureExtractor, feature_settings
    from ase_ray.features.pipeline import backend_description
    from ase_ray.models.classifier import build_model
    from ase_ray.models.io import save_model
    from ase_ray.models.projections import dims_from_batch
    from ase_ray.serving_model import log_pyfunc_model, write_feature_settings
    from ase_ray.tracking import setup_mlflow

    from ase_ray.data.metadata import MetadataColumns, metadata_text
    from ase_ray.models.numeric import NUMERIC_KEY, fit_numeric_block
    from ase_ray.train.data import model_input_record

    metadata = metadata or MetadataColumns()
    records = records if records is not None else [{} for _ in images]
    extracted = FeatureExtractor(config.features)(images, [metadata_text(r, metadata.text) for r in records])
    if extracted.ok != list(range(len(images))):
        raise ValueError(f"feature extraction failed: {[e for e in extracted.errors if e]}")
    ocr_fields = [t["ocr_fields"] for t in extracted.texts]
    block = fit_numeric_block(ocr_fields, records, metadata.numeric, config.train.model.numeric_sources)
    arrays = dict(extracted.arrays)
    if block.fields:
        arrays[NUMERIC_KEY] = block.transform(ocr_fields, records)
    dims = dims_from_batch(arrays)
    task = config.train.task
    classes = ["normal", "defect"] if task == "binary" else [c.name for c in config.data.synth.classes]
    torch.manual_seed(seed)
    model = build_model(config.train.model, dims, len(classes))
    target = Path(out_dir or tempfile.mkdtemp(prefix="ase_ray_model_"))
    inputs = model_input_record(block, metadata, config.train.model.text_sources)
    extra = {"task": task, "untrained": True, "inputs": inputs, **({"decision": decision} if decision else {})}
    save_model(model, target, config.train.model, dims, classes, extra=extra)
    write_feature_settings(target, {"features": feature_settings(config.features), "backends": backend_description(config)})
    setup_mlflow(config)
    with mlflow.start_run(run_name=f"untrained-{model_name}-{seed}", tags={"ase_ray.stage": "test-model"}) as run:
        log_pyfunc_model(target, SimpleNamespace(features=arrays))
    version = mlflow.register_model(f"runs:/{run.info.run_id}/model", model_name).version
    if alias:
        MlflowClient().set_registered_model_alias(model_name, alias, version)
    return str(version)
