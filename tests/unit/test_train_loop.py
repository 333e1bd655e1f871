"""The epoch loop in a bare process: an interrupted run resumed from its checkpoint matches an
uninterrupted one, the exported model is the best epoch's, and the selection rule's edges."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ase_ray.config import load_config
from ase_ray.models.io import load_model
from ase_ray.testing import fake_feature_store
from ase_ray.train.data import LABEL_KEY, load_task_arrays
from ase_ray.train.loop import MODEL_DIR, Best, predict_proba, read_loop_state, run_epochs


@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    fake_feature_store(store, per_class=14, signal=0.6)
    splits, classes = load_task_arrays(store, "multiclass")
    as_dict = {name: {**a.features, LABEL_KEY: a.labels} for name, a in splits.items()}
    return as_dict, classes


def _cfg(*overrides):
    return load_config(overrides=["train.epochs=6", "train.lr=3e-3", "train.pfa.epochs_per_stage=1",
                                  "train.pfa.first_fraction=0.4", "train.pfa.stride=0.2", "train.seed=3",
                                  *overrides]).train


def _keep_checkpoints(into: Path):
    kept: list[Path] = []

    def report(metrics, directory):
        target = into / f"epoch_{int(metrics['epoch'])}"
        shutil.copytree(directory, target)
        kept.append(target)
    return report, kept


def _curve(history):
    return [(h["epoch"], h["subset_size"], h["train_ce"], h["train_align"], h.get("val_macro_f1")) for h in history]


def test_a_resumed_run_matches_an_uninterrupted_one(arrays, tmp_path):
    splits, classes = arrays
    cfg = _cfg()
    report, kept = _keep_checkpoints(tmp_path / "a")
    whole = run_epochs(splits["train"], splits["val"], cfg, classes, report=report)
    assert len(kept) == 6
    # "Killed" after epoch 2: a new process starts from that epoch's checkpoint.
    torch.manual_seed(12345)
    np.random.seed(999)
    resumed = run_epochs(splits["train"], splits["val"], cfg, classes, restored_dir=kept[2])
    assert [h["epoch"] for h in resumed.history] == [3.0, 4.0, 5.0]
    sizes = [h["subset_size"] for h in whole.history]
    assert sizes[0] < sizes[-1]  # PFA grew the subset: the subset order mattered
    for a, b in zip(_curve(whole.history[3:]), _curve(resumed.history)):
        assert a[:2] == b[:2]
        np.testing.assert_allclose(a[2:4], b[2:4], atol=1e-4, rtol=0)
        assert a[4] == pytest.approx(b[4], abs=1e-9)
    assert resumed.best == whole.best


def test_checkpoints_every_n_epochs_and_at_the_last_metrics_every_epoch(arrays, tmp_path):
    splits, classes = arrays
    reports = []
    run_epochs(splits["train"], splits["val"], _cfg("train.epochs=5", "train.checkpoint_every=2"), classes,
               report=lambda metrics, directory: reports.append((int(metrics["epoch"]), directory is not None)))
    assert reports == [(0, False), (1, True), (2, False), (3, True), (4, True)]


def test_the_export_is_the_best_epoch_and_scores_like_the_history(arrays, tmp_path):
    splits, classes = arrays
    report, kept = _keep_checkpoints(tmp_path / "b")
    result = run_epochs(splits["train"], splits["val"], _cfg("train.lr=0.05"), classes, report=report)
    f1 = [h["val_macro_f1"] for h in result.history]
    best = result.best.epoch
    assert f1[best] == max(f1)
    assert all(f1[e] < f1[best] or result.history[e]["val_log_loss"] >= result.history[best]["val_log_loss"]
               for e in range(best))  # earlier epochs with the same F1 lost on log-loss or tied
    model, meta = load_model(kept[-1] / MODEL_DIR)
    assert meta["extra"]["epoch"] == best and meta["extra"]["last_epoch"] == 5
    assert read_loop_state(kept[-1]) == (6, result.best)
    # The exported model, scored the way `fit` scores it, gives the history's val F1 of that epoch.
    from ase_ray.train.metrics import classification_metrics

    probs = predict_proba(model, splits["val"])
    scores = classification_metrics(splits["val"][LABEL_KEY], probs.argmax(1), classes)
    assert scores["macro_f1"] == pytest.approx(f1[best], abs=1e-9)
    assert all(v.dtype == torch.float32 for v in model.state_dict().values() if v.is_floating_point())


def test_without_validation_rows_the_last_epoch_wins(arrays):
    splits, classes = arrays
    result = run_epochs(splits["train"], {}, _cfg("train.epochs=3"), classes)
    assert result.best == Best(2)
    assert "val_macro_f1" not in result.history[-1]


def test_best_rule_ties():
    assert Best(1, 0.8, 0.5).beaten_by(Best(2, 0.9, 0.9))
    assert not Best(1, 0.8, 0.5).beaten_by(Best(2, 0.7, 0.1))
    assert Best(1, 0.8, 0.5).beaten_by(Best(2, 0.8, 0.4))  # same F1, lower log-loss
    assert not Best(1, 0.8, 0.5).beaten_by(Best(2, 0.8, 0.5))  # a full tie keeps the earlier epoch
    assert Best(1).beaten_by(Best(2))  # no validation: the later epoch


def test_bf16_autocast_trains_with_fp32_weights(arrays):
    splits, classes = arrays
    result = run_epochs(splits["train"], splits["val"], _cfg("train.epochs=2", "train.autocast=bf16"), classes)
    assert all(p.dtype == torch.float32 for p in result.module.parameters())
    assert np.isfinite(result.history[-1]["train_ce"])
    assert all(v.dtype == torch.float32 for v in result.best_state.values() if v.is_floating_point())


def test_torch_threads_stay_within_the_omp_limit(monkeypatch):
    from ase_ray.torch_threads import respect_omp_thread_limit

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_THREAD_LIMIT", "1")
        assert respect_omp_thread_limit() == 1
        x, w = torch.randn(100, 1000), torch.randn(1000, 128)
        exact = (x.double() @ w.double()).float()
        assert float(((x.bfloat16() @ w.bfloat16()).float() - exact).abs().max()) < 2.0  # no garbage
    finally:
        torch.set_num_threads(before)


def test_building_a_classifier_keeps_torch_within_the_omp_limit(monkeypatch):
    """A process that only builds and runs the classifier (Serve, predict, a test) caps torch too: a 1x1
    convolution's weight gradient never returned on an AVX-512 CPU with 2 torch threads under
    OMP_THREAD_LIMIT=1 (ase_ray.torch_threads)."""
    from ase_ray.models.classifier import build_model
    from ase_ray.models.projections import FeatureDims

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_THREAD_LIMIT", "1")
        settings = load_config().train.model.model_copy(update={"kind": "image_only", "image_pooling": "defect_maps",
                                                                "d_model": 8, "heads": 2, "defect_map_width": 8})
        dims = FeatureDims(image_dim=8, image_tokens=4, text_dim=6, text_len=3, llm_dim=0, stem_dim=7, stem_size=5)
        model = build_model(settings, dims, 3).eval()
        assert torch.get_num_threads() == 1
        model({"image_stem": torch.randn(3, 7, 5, 5)})["logits"].sum().backward()
        assert model.defect_maps.body[1].weight.grad.abs().sum() > 0
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------ records beside the image reach the model
def _train_on_reading(tmp_path, reading: np.ndarray):
    """A store whose image and text features carry no class signal; only the ``reading`` record does
    (when it is not shuffled). Trained in-process as `ase-ray train` prepares it (numeric block)."""
    from ase_ray.train.fit import with_numeric_block

    fake_feature_store(tmp_path, per_class=30, signal=0.0, records={"reading": [float(v) for v in reading]})
    config = load_config(overrides=[f"train.store_dir={tmp_path}", "train.model.kind=text_only", "train.epochs=40",
                                    "train.lr=5e-3", "train.pfa.enabled=false", "train.seed=1",
                                    "train.model.numeric_sources=[metadata]", "train.model.text_sources=[ocr]",
                                    "train.model.use_llm_hidden=false"])
    splits, classes = load_task_arrays(tmp_path, "multiclass")
    splits, inputs = with_numeric_block(config, splits)
    assert [f["name"] for f in inputs["numeric"]["fields"]] == ["reading"]
    assert inputs["metadata_columns"] == {"text": [], "numeric": ["reading"]}
    train = {**splits["train"].features, LABEL_KEY: splits["train"].labels}
    result = run_epochs(train, {}, config.train, classes)
    return result.module, splits, inputs


def _accuracy(module, arrays) -> float:
    return float((predict_proba(module, arrays.features).argmax(1) == arrays.labels).mean())


def test_a_metadata_column_that_carries_the_class_decides_the_prediction(tmp_path):
    from ase_ray.models.numeric import NUMERIC_KEY, NumericBlock

    labels = np.repeat(np.arange(3), 30)
    reading = labels * 2.0 + np.random.default_rng(0).normal(0, 0.3, len(labels))
    module, splits, inputs = _train_on_reading(tmp_path / "signal", reading)
    test = splits["test"]
    assert len(test) >= 9 and _accuracy(module, test) >= 0.9
    # the same images with another reading: the prediction follows the record
    block = NumericBlock.from_json(inputs["numeric"])
    for k in range(3):
        moved = {**test.features, NUMERIC_KEY: block.transform([{}] * len(test), [{"reading": 2.0 * k}] * len(test))}
        assert (predict_proba(module, moved).argmax(1) == k).mean() >= 0.9

    shuffled = np.random.default_rng(1).permutation(reading)
    module, splits, _ = _train_on_reading(tmp_path / "shuffled", shuffled)
    assert _accuracy(module, splits["test"]) <= 0.6  # 3 classes: chance is 1/3


def test_class_weights_hand_values():
    from ase_ray.train.loop import class_weights

    counts = np.array([90, 10, 0])
    assert class_weights(counts, "none") is None
    balanced = class_weights(counts, "balanced")
    # n / (C_present n_c) = 100/(2*90), 100/(2*10): already averaging 1 over the rows
    np.testing.assert_allclose(balanced, [100 / 180, 5.0, 0.0])
    gentle = class_weights(counts, "sqrt")
    assert gentle[1] / gentle[0] == pytest.approx(3.0)  # sqrt of the 9x imbalance
    for weights in (balanced, gentle):
        assert float((weights * counts).sum()) == pytest.approx(counts.sum())


def test_class_weighting_reaches_the_loss(arrays):
    from ase_ray.models.classifier import compute_loss

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    weights = torch.tensor([1.0, 4.0])
    loss, _ = compute_loss({"logits": logits}, labels, None, weights)
    per_row = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    assert float(loss) == pytest.approx(float((per_row * weights[labels]).sum() / weights[labels].sum()))
    # in the loop: the same seed with and without weights trains differently
    splits, classes = arrays
    plain = run_epochs(splits["train"], {}, _cfg("train.epochs=2", "train.pfa.enabled=false"), classes)
    weighted = run_epochs(splits["train"], {}, _cfg("train.epochs=2", "train.pfa.enabled=false",
                                                    "train.class_weighting=balanced"), classes)
    assert plain.history[0]["train_ce"] != weighted.history[0]["train_ce"]


def test_calibration_is_fitted_on_validation_only_and_written_into_the_model(tmp_path):
    from ase_ray.models.io import save_model
    from ase_ray.train.fit import calibrate_model_dir, evaluate_model_dir

    fake_feature_store(tmp_path / "store", per_class=40, signal=0.5)
    splits, classes = load_task_arrays(tmp_path / "store", "multiclass")
    assert len(splits["val"]) >= 10
    cfg = _cfg("train.epochs=8", "train.pfa.enabled=false", "train.model.dropout=0")
    result = run_epochs({**splits["train"].features, LABEL_KEY: splits["train"].labels}, {}, cfg, classes)
    save_model(result.module, tmp_path / "m", cfg.model, result.module.dims, classes, {"task": "multiclass"})
    before = evaluate_model_dir(tmp_path / "m", splits, classes)
    record = calibrate_model_dir(tmp_path / "m", splits)
    assert record["fitted_on"] == "val" and record["val_rows"] == len(splits["val"])
    assert record["temperature"] != 1.0 and record["val_nll_after"] <= record["val_nll_before"] + 1e-9
    loaded, meta = load_model(tmp_path / "m")
    assert float(loaded.temperature) == pytest.approx(record["temperature"])
    assert meta["extra"]["calibration"] == record and meta["extra"]["task"] == "multiclass"
    assert evaluate_model_dir(tmp_path / "m", splits, classes) == before  # no prediction changed
    # refitting on other validation rows gives another temperature: the test rows never enter the fit
    swapped = {**splits, "val": splits["test"], "test": splits["val"]}
    save_model(result.module, tmp_path / "n", cfg.model, result.module.dims, classes, {})
    assert calibrate_model_dir(tmp_path / "n", swapped)["temperature"] != pytest.approx(record["temperature"])
    few = {**splits, "val": splits["val"].take(np.arange(3))}
    save_model(result.module, tmp_path / "o", cfg.model, result.module.dims, classes, {})
    assert "skipped" in calibrate_model_dir(tmp_path / "o", few)
    assert float(load_model(tmp_path / "o")[0].temperature) == 1.0


def _states_of(kept: list[Path]) -> list[dict[str, torch.Tensor]]:
    return [load_model(path / MODEL_DIR)[0].state_dict() for path in kept]


def test_weight_averaging_keeps_the_mean_of_the_last_epochs_and_resumes_exactly(arrays, tmp_path):
    splits, classes = arrays
    # Without validation every checkpoint exports its own epoch: the single epochs' weights.
    report, single = _keep_checkpoints(tmp_path / "single")
    run_epochs(splits["train"], {}, _cfg("train.epochs=5"), classes, report=report)
    states = _states_of(single)
    report, kept = _keep_checkpoints(tmp_path / "averaged")
    averaged = run_epochs(splits["train"], {}, _cfg("train.epochs=5", "train.average_epochs=3"), classes,
                          report=report)
    assert [h.get("averaged_epochs") for h in averaged.history] == [None, None, 1.0, 2.0, 3.0]
    for key, value in averaged.best_state.items():
        if value.is_floating_point():
            expected = sum(states[e][key].double() for e in (2, 3, 4)) / 3
            torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-6)
    assert not torch.allclose(averaged.best_state["head.layers.1.weight"], states[4]["head.layers.1.weight"])
    model, meta = load_model(kept[-1] / MODEL_DIR)
    assert "stochastic weight averaging" in meta["extra"]["selection"]
    torch.testing.assert_close(model.state_dict(), averaged.best_state)
    # The kept model predicts with the average, not the last epoch.
    probs = predict_proba(averaged.kept, splits["val"])
    np.testing.assert_allclose(probs, predict_proba(model, splits["val"]), atol=1e-6)
    # Stopped after epoch 3 (two epochs averaged): the resumed run ends on the same average.
    resumed = run_epochs(splits["train"], {}, _cfg("train.epochs=5", "train.average_epochs=3"), classes,
                         restored_dir=kept[3])
    torch.testing.assert_close(resumed.best_state, averaged.best_state, rtol=0, atol=1e-6)


def test_the_averaged_model_is_scored_on_validation(arrays):
    splits, classes = arrays
    result = run_epochs(splits["train"], splits["val"], _cfg("train.epochs=4", "train.average_epochs=2"), classes)
    last = result.history[-1]
    assert result.best.epoch == 3 and result.best.val_macro_f1 == last["averaged_val_macro_f1"]
    from ase_ray.train.metrics import classification_metrics

    probs = predict_proba(result.kept, splits["val"])
    scores = classification_metrics(splits["val"][LABEL_KEY], probs.argmax(1), classes)
    assert scores["macro_f1"] == pytest.approx(last["averaged_val_macro_f1"], abs=1e-9)


def test_averaging_more_epochs_than_are_trained_is_refused():
    with pytest.raises(Exception, match="average_epochs"):
        _cfg("train.epochs=3", "train.average_epochs=4")


def test_the_cosine_schedule_sets_the_optimizers_rate_every_epoch_and_resumes_on_it(arrays, tmp_path):
    splits, classes = arrays
    cfg = _cfg("train.lr_schedule=cosine")
    report, kept = _keep_checkpoints(tmp_path / "cosine")
    whole = run_epochs(splits["train"], splits["val"], cfg, classes, report=report)
    expected = [3e-3 * (1 + math.cos(math.pi * e / 6)) / 2 for e in range(6)]
    np.testing.assert_allclose([h["lr"] for h in whole.history], expected, rtol=1e-9)
    assert whole.history[-1]["lr"] < 0.1 * 3e-3
    constant = run_epochs(splits["train"], splits["val"], _cfg(), classes)
    assert [h["lr"] for h in constant.history] == [3e-3] * 6
    # The first epoch runs at the full rate either way; after it the two runs part.
    assert whole.history[0]["train_ce"] == pytest.approx(constant.history[0]["train_ce"], abs=1e-6)
    assert whole.history[-1]["train_ce"] != pytest.approx(constant.history[-1]["train_ce"], abs=1e-4)
    resumed = run_epochs(splits["train"], splits["val"], cfg, classes, restored_dir=kept[2])
    np.testing.assert_allclose([h["lr"] for h in resumed.history], expected[3:], rtol=1e-9)
    np.testing.assert_allclose([h["train_ce"] for h in resumed.history],
                               [h["train_ce"] for h in whole.history[3:]], atol=1e-4, rtol=0)


def test_scaling_the_rate_keeps_the_encoders_lower_share():
    from ase_ray.train.engine import TorchEngine

    module = torch.nn.ModuleDict({"head": torch.nn.Linear(3, 2), "image_tail": torch.nn.Linear(3, 3)})
    cfg = load_config(overrides=["train.lr=0.01", "train.finetune.lr_scale=0.1"]).train
    engine = TorchEngine(module, cfg, torch.device("cpu"))
    engine.scale_lr(0.5)
    assert [g["lr"] for g in engine.optimizer.param_groups] == pytest.approx([0.005, 0.0005])
    engine.scale_lr(1.0)
    assert [g["lr"] for g in engine.optimizer.param_groups] == pytest.approx([0.01, 0.001])


def test_label_smoothing_moves_mass_off_the_true_class():
    from ase_ray.models.classifier import compute_loss

    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    labels = torch.tensor([0, 1])
    plain, _ = compute_loss({"logits": logits}, labels, None)
    smoothed, _ = compute_loss({"logits": logits}, labels, None, label_smoothing=0.3)
    log_p = torch.log_softmax(logits, dim=1)
    target = torch.full((2, 3), 0.1)
    target[0, 0] = target[1, 1] = 0.8  # 0.7 on the label, 0.3 spread over the three classes
    assert float(smoothed) == pytest.approx(float(-(target * log_p).sum(1).mean()), abs=1e-6)
    assert float(smoothed) > float(plain)  # a confident right answer costs more than with one-hot targets
