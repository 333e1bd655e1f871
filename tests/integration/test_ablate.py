"""`ablate` on a tiny synthetic set: every row of the table, TDA per fold, JSON of every score."""

from __future__ import annotations

import json

import pytest

from ase_ray.config import load_config
from ase_ray.data.synthetic import generate_synthetic
from ase_ray.train.ablate import LOGREG, run_ablation
from ase_ray.train.settings import ABLATION_VARIANTS as VARIANTS

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_ablate_writes_every_row(ray_session, tmp_path):
    cfg = load_config(overrides=[
        f"project.work_dir={tmp_path / 'work'}", "data.synth.scale=0.05", "data.synth.seed=2",
        "features.describe.backend=tiny", "features.describe.max_new_tokens=2", "features.reason.backend=tiny",
        "features.image_encoder.backend=tiny", "features.text_encoder.backend=tiny",
        "data.tda.mode=count", "data.tda.per_class=1",
        "ablate.folds=2", "ablate.seeds=1", "ablate.first_seed=3", "train.epochs=2", "train.lr=1e-3", "train.model.d_model=32",
        "train.model.head_hidden=32", "train.pfa.proj_dim=16",
    ])
    generate_synthetic(cfg.data.synth, tmp_path / "synth")
    result = run_ablation(cfg, tmp_path / "synth" / "manifest.csv", tmp_path / "ablate")
    table = result.table_path.read_text()
    for variant in [LOGREG, *VARIANTS]:
        assert f"| {variant} |" in table, variant
    payload = json.loads(result.json_path.read_text())
    trained = [s for s in payload["scores"] if s["variant"] != LOGREG]
    assert len(trained) == 2 * len(VARIANTS) * 2  # tasks x variants x folds (1 seed)
    assert {s["seed"] for s in trained} == {3} and payload["first_seed"] == 3
    assert all(0.0 <= s["macro_f1"] <= 1.0 for s in payload["scores"])
    tda_scores = [s for s in trained if s["variant"] == "+TDA"]
    plain_scores = [s for s in trained if s["variant"] == "concat"]
    assert all(t["n_train"] > p["n_train"] for t, p in zip(tda_scores, plain_scores))  # TDA rows in training only
    assert all(t["n_test"] == p["n_test"] for t, p in zip(tda_scores, plain_scores))
