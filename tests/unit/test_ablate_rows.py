"""The ablation's rows without training anything: names, the full row without TDA, variant settings."""

from __future__ import annotations

from ase_ray.config import load_config
from ase_ray.train.ablate import FULL_WITHOUT_TDA, LOGREG, VARIANTS, _aggregate, _variant_config
from ase_ray.train.settings import ABLATION_VARIANTS


def _scores(variants):
    return [{"task": task, "variant": v, "fold": k, "seed": 0, "macro_f1": 0.5 + 0.1 * k}
            for v in [LOGREG, *variants] for task in ("binary", "multiclass") for k in range(2)]


def test_without_dots_the_full_row_is_the_rest_of_the_method_and_says_so():
    variants = ["+TDA", "full (PFA+CMAF+TDA)"]
    scores = [s for s in _scores(variants) if s["variant"] != "+TDA"]  # +TDA is skipped without dots
    rows = {r["variant"]: r for r in _aggregate(scores, variants, with_tda=False, tda_note="no pink dots")}
    assert rows["+TDA"]["multiclass"] == {"note": "no pink dots"}
    full = rows[FULL_WITHOUT_TDA]
    assert FULL_WITHOUT_TDA.startswith("full") and full["note"] == "no pink dots"
    assert full["multiclass"]["n"] == 2 and abs(full["multiclass"]["mean"] - 0.55) < 1e-9
    with_dots = {r["variant"] for r in _aggregate(_scores(variants), variants, with_tda=True, tda_note="")}
    assert "full (PFA+CMAF+TDA)" in with_dots and FULL_WITHOUT_TDA not in with_dots


def test_variant_settings_reach_the_training_config():
    config = load_config(overrides=["train.model.image_pooling=stored"])
    patch = _variant_config(config, VARIANTS["image-only (patch attention)"], "binary", 1, ["reasoning"])
    assert (patch.train.model.kind, patch.train.model.image_pooling, patch.train.seed) == ("image_only", "attention", 1)
    assert "reasoning" not in patch.train.model.text_sources
    plain = _variant_config(config, VARIANTS["image-only"], "multiclass", 0)
    assert plain.train.model.image_pooling == "stored" and plain.train.task == "multiclass"
    assert set(ABLATION_VARIANTS) <= set(VARIANTS)


def test_the_fused_variants_take_the_configured_image_branch_and_image_only_stays_the_frozen_row():
    config = load_config(overrides=["train.model.image_pooling=defect_maps", "train.model.defect_map_decision=1.0"])
    full = _variant_config(config, VARIANTS["full (PFA+CMAF+TDA)"], "binary", 0).train.model
    assert (full.image_pooling, full.defect_map_decision) == ("defect_maps", 1.0)
    plain = _variant_config(config, VARIANTS["image-only"], "binary", 0).train.model
    assert (plain.image_pooling, plain.defect_map_decision) == ("stored", 0.0)  # no maps: no vote
    tuned = _variant_config(config, VARIANTS["image-only (fine-tuned)"], "binary", 0)  # one reader of the stem
    assert tuned.train.finetune.enabled and tuned.train.model.image_pooling == "stored"
    maps = _variant_config(load_config(), VARIANTS["image-only (defect maps)"], "multiclass", 0)
    assert maps.train.model.image_pooling == "defect_maps" and maps.train.model.kind == "image_only"


def test_the_finetuned_variant_carries_the_stores_encoder_and_asks_for_stems_before_extracting(tmp_path):
    import pytest

    from ase_ray.errors import DataError
    from ase_ray.models.settings import ImageTailSpec
    from ase_ray.train.ablate import run_ablation

    spec = ImageTailSpec(backend="efficientnet-lite0", image_size=320, pooling="mean_max")
    tuned = _variant_config(load_config(), VARIANTS["image-only (fine-tuned)"], "multiclass", 0, [], spec)
    assert tuned.train.finetune.enabled and tuned.train.model.image_tail == spec
    plain = _variant_config(load_config(), VARIANTS["image-only"], "multiclass", 0, [], spec)
    assert not plain.train.finetune.enabled and plain.train.model.image_tail is None
    config = load_config(overrides=['ablate.variants=["image-only (fine-tuned)"]'])
    with pytest.raises(DataError, match="features.image_encoder.stem=true"):
        run_ablation(config, tmp_path / "missing.csv", tmp_path / "out")
    config = load_config(overrides=['ablate.variants=["image-only (defect maps)"]'])
    with pytest.raises(DataError, match="defect maps.*features.image_encoder.stem=true"):
        run_ablation(config, tmp_path / "missing.csv", tmp_path / "out")


def test_rows_carry_per_class_f1_and_the_table_names_the_best_rows():
    import pandas as pd

    from ase_ray.train.ablate import markdown_table

    scores = [{**s, "per_class_f1": {"ok": s["macro_f1"], "crack": 0.25}} for s in _scores(["image-only"])]
    scores = [{**s, "macro_f1": s["macro_f1"] + (0.2 if s["variant"] == "image-only" else 0)} for s in scores]
    rows = _aggregate(scores, ["image-only"], with_tda=True, tda_note="")
    cell = rows[1]["multiclass"]
    assert cell["per_class_f1"] == {"ok": 0.55, "crack": 0.25} and abs(cell["mean"] - 0.75) < 1e-9
    table = markdown_table(rows, load_config(), pd.DataFrame({"x": range(4)}), {})
    assert "best multi-class row (image-only)" in table and "crack 0.25" in table


def test_rows_carry_escape_and_overkill_rates_and_the_table_shows_them():
    import numpy as np
    import pandas as pd

    from ase_ray.train.ablate import _line, markdown_table

    # Labels: 0 = normal. Two defects, one predicted normal (escape); one normal predicted a defect.
    rates = _line(np.array([0, 1, 2, 0]), np.array([1, 1, 0, 0]), ["ok", "crack", "hole"], "ok")
    assert rates == {"escape_rate": 0.5, "overkill_rate": 0.5}
    assert _line(np.array([0]), np.array([0]), ["a", "b"], None) == {}
    scores = [{**s, "escape_rate": 0.1 * s["fold"], "overkill_rate": 0.2} for s in _scores(["image-only"])]
    rows = _aggregate(scores, ["image-only"], with_tda=True, tda_note="")
    cell = rows[1]["binary"]
    assert abs(cell["escape_rate"] - np.mean([0.1 * s["fold"] for s in scores if s["variant"] == "image-only"
                                              and s["task"] == "binary"])) < 1e-9
    assert cell["overkill_rate"] == 0.2
    table = markdown_table(rows, load_config(), pd.DataFrame({"x": range(4)}), {})
    assert "Escape / overkill rate" in table and "| image-only | " in table.split("Escape")[1]


def test_the_magnetic_tile_config_keeps_the_stem_its_defect_maps_read():
    from pathlib import Path

    from ase_ray.train.ablate import _reads_stem

    config = load_config(Path(__file__).resolve().parents[2] / "configs" / "magnetic_tile.yaml")
    assert config.features.image_encoder.stem and config.train.model.image_pooling == "defect_maps"
    assert set(config.ablate.variants) <= set(VARIANTS)
    assert [v for v in config.ablate.variants if _reads_stem(config, VARIANTS[v])] == [
        "image-only (defect maps)", "full (PFA+CMAF+TDA)"]


def test_variants_read_only_the_configured_text_and_numeric_sources_and_a_starved_variant_is_refused(tmp_path):
    import pandas as pd
    import pytest

    from ase_ray.errors import DataError
    from ase_ray.train.ablate import markdown_table, run_ablation

    config = load_config(overrides=['train.model.text_sources=["description","metadata"]',
                                    'train.model.numeric_sources=["metadata"]'])
    full = _variant_config(config, VARIANTS["full (PFA+CMAF+TDA)"], "multiclass", 0, ["metadata"]).train.model
    assert (full.text_sources, full.numeric_sources) == (["description"], ["metadata"])
    everything = _variant_config(load_config(), VARIANTS["full (PFA+CMAF+TDA)"], "multiclass", 0).train.model
    assert (everything.text_sources, everything.numeric_sources) == (["ocr", "description", "reasoning", "metadata"],
                                                                     ["ocr", "metadata"])
    table = markdown_table(_aggregate(_scores(["image-only"]), ["image-only"], True, ""), config, pd.DataFrame({"x": [1]}), {})
    assert "text source(s) ['ocr', 'reasoning'] and the numeric source(s) ['ocr']" in table
    assert "leaves out" not in markdown_table([], load_config(), pd.DataFrame({"x": [1]}), {})
    metadata_only = load_config(overrides=['train.model.text_sources=["metadata"]', 'ablate.variants=["text-only"]'])
    with pytest.raises(DataError, match=r"\['text-only'\] read none of train.model.text_sources \['metadata'\]"):
        run_ablation(metadata_only, tmp_path / "missing.csv", tmp_path / "out")
