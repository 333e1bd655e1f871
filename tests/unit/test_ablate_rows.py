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
