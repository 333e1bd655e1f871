"""Text that carries information: each source's spread across rows, constant/absent sources flagged in
the store and left out by training, whole texts (nothing cut with the defaults)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from ase_ray.config import load_config
from ase_ray.data.manifest import DatasetInfo, read_dataset_info, read_manifest
from ase_ray.data.synthetic import generate_synthetic
from ase_ray.features.backends import build_text_encoder
from ase_ray.features.pipeline import (
    _with_row_ids,
    apply_layout_hints,
    format_summary,
    stage_plan,
    with_metadata,
)
from ase_ray.features.settings import TextEncoderSettings
from ase_ray.features.stages import TEXT_SOURCES, DecodeStage
from ase_ray.features.store import META_FILE, load_store, stack, write_store
from ase_ray.features.text_stats import MIN_SPREAD, cut_column
from ase_ray.testing import fake_feature_store
from ase_ray.train.data import constant_text_sources, load_task_arrays, usable_text_sources
from ase_ray.train.fit import without_constant_sources

TINY_MODELS = ["features.reason.backend=tiny", "features.image_encoder.backend=tiny"]


# ------------------------------------------------------------------ a real store of the synthetic set
@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory):
    """The stages' own code (no Ray) over a small synthetic set: tesseract, the measuring describer and
    MiniLM at their defaults; tiny random LLM (forward mode, the default) and image encoder."""
    root = tmp_path_factory.mktemp("text_sources")
    cfg = load_config(overrides=["data.synth.scale=0.02", "data.synth.seed=5", *TINY_MODELS])
    generate_synthetic(cfg.data.synth, root / "synth")
    manifest = root / "synth" / "manifest.csv"
    info = read_dataset_info(manifest)
    cfg = apply_layout_hints(cfg, info)
    rows, metadata = with_metadata(cfg, read_manifest(manifest), info)
    batch = DecodeStage()(_with_row_ids(rows))
    for stage_cls, settings in stage_plan(cfg):
        batch = stage_cls(settings, str(root / "cache"))(batch)
    assert not batch["error_stage"].astype(bool).any()
    return write_store(batch, root / "store", {"manifest": str(manifest),
                                                                "metadata_columns": metadata.to_json()})


def test_every_text_source_of_a_synthetic_store_varies_or_is_flagged_absent(synthetic_store):
    stats = synthetic_store.meta["text_stats"]
    assert len(synthetic_store.features) >= 5
    for src in TEXT_SOURCES:
        s = stats[src]
        assert s["absent"] or (s["pooled_std"] > MIN_SPREAD and s["distinct_texts"] > 1), (src, s)
    assert not stats["ocr"]["constant"] and not stats["description"]["constant"]
    # forward mode writes no reasoning text (never the prompt): the source is absent and flagged
    assert synthetic_store.features["reasoning"].eq("").all()
    assert stats["reasoning"]["absent"] and synthetic_store.meta["absent_sources"] == ["reasoning"]
    assert synthetic_store.meta["constant_sources"] == ["reasoning"]
    # the records beside the image (dataset.yaml names them) are the metadata text source
    assert synthetic_store.meta["metadata_columns"] == {"text": ["operator_note"], "numeric": ["probe_reading"]}
    texts = synthetic_store.features["metadata_text"]
    assert texts.str.startswith("operator_note: ").all() and texts.nunique() > 1
    assert not stats["metadata"]["constant"]


def test_no_text_is_cut_with_the_default_encoder_settings(synthetic_store):
    stats = synthetic_store.meta["text_stats"]
    assert all(stats[src]["tokens_cut"] == 0 and stats[src]["texts_cut"] == 0 for src in TEXT_SOURCES)
    assert all((synthetic_store.features[cut_column(src)] == 0).all() for src in TEXT_SOURCES)
    # the descriptions are longer than the old 64-token limit, and fit in the new one
    lengths = stack(synthetic_store, "text_description_mask").sum(axis=1)
    assert lengths.max() > 64 and lengths.max() < TextEncoderSettings().max_length


def test_forward_mode_reasoning_features_differ_between_images(synthetic_store):
    hidden = stack(synthetic_store, "llm_hidden")
    distances = np.linalg.norm(hidden[:, None] - hidden[None], axis=-1)[np.triu_indices(len(hidden), 1)]
    assert distances.min() > 1e-4  # no two images share the LLM feature


def test_the_summary_lists_each_source_and_its_flag(synthetic_store):
    from ase_ray.features.pipeline import summarise

    rows = synthetic_store.features.assign(error_stage="")
    summary = summarise(rows, 1.0, synthetic_store)
    assert summary["constant_sources"] == ["reasoning"] and set(summary["text_sources"]) == set(TEXT_SOURCES)
    text = format_summary(summary)
    assert "reasoning" in text and "absent" in text


# ------------------------------------------------------------------ the encoder counts what it cuts
def test_the_text_encoder_counts_the_tokens_it_cuts():
    encoder = build_text_encoder(TextEncoderSettings(backend="tiny", max_length=16, device="cpu"))
    feats = encoder.encode_batch(["short", "x" * 30])
    # one token per character plus [CLS] and [SEP]
    assert feats.cut.tolist() == [0, 32 - 16]
    assert feats.mask.sum(axis=1).tolist() == [7, 16]


# ------------------------------------------------------------------ training leaves constant sources out
def test_a_constant_source_is_flagged_in_the_store(tmp_path):
    store = fake_feature_store(tmp_path, constant_sources=("description",))
    assert store.meta["constant_sources"] == ["description"] and store.meta["absent_sources"] == []
    assert store.meta["text_stats"]["description"]["pooled_std"] == 0.0
    assert store.meta["text_stats"]["ocr"]["pooled_std"] > 0.1
    assert fake_feature_store(tmp_path / "varied").meta["constant_sources"] == []


def test_training_drops_a_constant_source_with_a_warning(tmp_path, caplog):
    fake_feature_store(tmp_path / "store", constant_sources=("reasoning",))
    cfg = load_config(overrides=[f"train.store_dir={tmp_path / 'store'}"])
    splits, _ = load_task_arrays(tmp_path / "store", "multiclass")
    with caplog.at_level(logging.WARNING, logger="ase_ray.train.data"):
        trained, dropped = without_constant_sources(cfg, splits["train"])
    assert dropped == ["reasoning"] and trained.train.model.text_sources == ["ocr", "description", "metadata"]
    assert "reasoning" in caplog.text and "dropping" in caplog.text
    assert cfg.train.model.text_sources == list(TEXT_SOURCES)  # the given config is not changed


def test_without_the_flag_in_store_json_it_is_judged_on_the_training_rows(tmp_path):
    fake_feature_store(tmp_path, constant_sources=("ocr",))
    meta_path = tmp_path / META_FILE
    meta = json.loads(meta_path.read_text())
    for key in ("constant_sources", "absent_sources", "text_stats"):
        meta.pop(key)
    meta_path.write_text(json.dumps(meta))
    splits, _ = load_task_arrays(tmp_path, "multiclass")
    assert constant_text_sources(tmp_path, splits["train"]) == ["ocr"]


def test_when_every_source_is_constant_they_are_kept_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="ase_ray.train.data"):
        kept, dropped = usable_text_sources(["reasoning"], ["reasoning"])
    assert kept == ["reasoning"] and dropped == []
    assert "keeping them all" in caplog.text


def test_an_empty_source_is_absent(tmp_path):
    store = fake_feature_store(tmp_path, constant_sources=("reasoning",))
    frame = store.features.assign(reasoning="")
    from ase_ray.features.text_stats import store_text_meta

    meta = store_text_meta(frame, {"reasoning": stack(store, "text_reasoning_pooled")})
    assert meta["absent_sources"] == ["reasoning"] and meta["constant_sources"] == ["reasoning"]
    assert load_store(tmp_path).meta["absent_sources"] == []  # one text, but not an empty one


# ------------------------------------------------------------------ prompts per data set
def test_dataset_yaml_names_the_domain_unless_the_config_does():
    info = DatasetInfo(["normal", "crack"], "normal", "magnetic-tile", extra={"domain": "magnetic tile surface image"})
    assert load_config().features.reason.domain is None
    assert apply_layout_hints(load_config(), info).features.reason.domain == "magnetic tile surface image"
    explicit = load_config(overrides=["features.reason.domain=steel strip image"])
    assert apply_layout_hints(explicit, info).features.reason.domain == "steel strip image"
    assert "printed circuit" not in load_config().features.reason.rendered_system_prompt()
