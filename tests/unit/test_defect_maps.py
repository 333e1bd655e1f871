"""Defect maps (model.image_pooling: defect_maps): pixel masks -> cell targets, the head over the stored
stride-16 map, its loss, its augmentation, and where the targets may go (training rows only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ase_ray.config import load_config
from ase_ray.data.masks import cell_targets
from ase_ray.errors import DataError
from ase_ray.models.augment import augment_batch
from ase_ray.models.classifier import compute_loss
from ase_ray.models.defect_maps import DEFECT_CELLS, DEFECT_TARGET
from ase_ray.models.inference import feature_shapes
from ase_ray.testing import fake_feature_store
from ase_ray.train.data import LABEL_KEY, load_task_arrays
from ase_ray.train.fit import with_defect_targets, with_image_tail
from ase_ray.train.loop import run_epochs, to_tensors

TINY = {"backend": "tiny", "image_size": 64, "pooling": "mean_max", "resize": "pad"}


def _mask(path, width: int, height: int, box: tuple[int, int, int, int]) -> str:
    mask = np.zeros((height, width), np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 255
    Image.fromarray(mask).save(path)
    return str(path)


def test_cell_targets_follow_the_images_geometry(tmp_path):
    # a 64 x 32 mask marked in its top-right 16 x 16 corner; padded to 64 it sits 16 px down: cell (1, 3)
    marked = _mask(tmp_path / "m.png", 64, 32, (48, 0, 64, 16))
    empty = _mask(tmp_path / "e.png", 64, 32, (0, 0, 0, 0))
    targets = cell_targets([marked, marked, empty, None, "None"], np.array([2, 0, 1, 2, 1]), 0, 64, "pad")
    assert targets.shape == (5, 4, 4) and targets.dtype == np.int64
    expected = np.zeros((4, 4), np.int64)
    expected[1, 3] = 2
    np.testing.assert_array_equal(targets[0], expected)
    assert (targets[1] == 0).all()  # a normal image's cells are all normal, whatever its mask says
    assert (targets[2] == 0).all()  # a defect image whose mask is empty: no cell is its defect
    assert (targets[3:] == -1).all()  # no mask: no cell term
    squashed = cell_targets([marked], np.array([2]), 0, 64, "squash")[0]  # stretched to 32 px high: 2 cells
    assert set(zip(*np.nonzero(squashed == 2))) == {(0, 3), (1, 3)}
    assert (cell_targets([marked], np.array([2]), None, 64, "pad")[0] == expected - (expected == 0)).all()


def test_an_unreadable_mask_is_a_clear_error(tmp_path):
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(DataError, match="cannot read the mask .*bad.png"):
        cell_targets([str(tmp_path / "bad.png")], np.array([1]), 0, 64, "pad")
    with pytest.raises(DataError, match="cannot read the mask"):
        cell_targets([str(tmp_path / "missing.png")], np.array([1]), 0, 64, "pad")


def _maps_config(store, *extra):
    return load_config(overrides=[f"train.store_dir={store}", "train.model.kind=image_only", "train.pfa.enabled=false",
                                  "train.model.image_pooling=defect_maps", "train.epochs=12", "train.lr=3e-3",
                                  "train.model.dropout=0.0", *extra])


def test_defect_maps_learn_where_the_planted_defect_is(tmp_path):
    fake_feature_store(tmp_path / "store", image_encoder=TINY, per_class=24, signal=0.0, masks=True)
    cfg = _maps_config(tmp_path / "store")
    splits, classes = load_task_arrays(tmp_path / "store", "multiclass")
    cfg, splits = with_image_tail(cfg, splits)
    assert "image_stem" in splits["train"].features  # the head reads it
    splits = with_defect_targets(cfg, splits, classes)
    train = {**splits["train"].features, LABEL_KEY: splits["train"].labels}
    result = run_epochs(train, {}, cfg.train, classes)
    cells = [h["train_cells"] for h in result.history]
    assert cells[-1] < 0.5 * cells[0]
    model = result.module.eval()
    targets = splits["train"].features[DEFECT_TARGET]
    with torch.no_grad():
        out = model(to_tensors({k: v for k, v in splits["train"].features.items() if k != DEFECT_TARGET},
                               np.arange(len(targets)), "cpu", torch.float32))
    predicted = out[DEFECT_CELLS].argmax(1).numpy()
    planted = targets > 0
    assert planted.sum() >= 20 and (predicted[planted] == targets[planted]).mean() > 0.7  # the class, where it is
    assert (predicted[targets == 0] == 0).mean() > 0.9
    # the image's class follows from its map alone (signal=0: no other feature carries it)
    assert (out["logits"].argmax(1).numpy() == splits["train"].labels).mean() > 0.8


def test_only_training_rows_get_targets_and_a_store_without_the_stem_says_how(tmp_path):
    fake_feature_store(tmp_path / "store", image_encoder=TINY, masks=True)
    cfg = _maps_config(tmp_path / "store")
    splits, classes = load_task_arrays(tmp_path / "store", "multiclass")
    splits = with_defect_targets(cfg, splits, classes)
    assert DEFECT_TARGET in splits["train"].features
    assert all(DEFECT_TARGET not in splits[name].features for name in ("val", "test"))
    assert len(splits["train"].features[DEFECT_TARGET]) == len(splits["train"])
    fake_feature_store(tmp_path / "plain")
    cfg = _maps_config(tmp_path / "plain")
    plain, _ = load_task_arrays(tmp_path / "plain", "multiclass")
    with pytest.raises(DataError, match="features.image_encoder.stem=true"):
        with_image_tail(cfg, plain)


def test_the_cell_loss_counts_known_cells_only():
    cells = torch.randn(2, 3, 4, 4, requires_grad=True)
    outputs = {"logits": torch.randn(2, 3), DEFECT_CELLS: cells}
    labels = torch.tensor([0, 2])
    unknown = torch.full((2, 4, 4), -1)
    _, parts = compute_loss(outputs, labels, None, cell_targets=unknown)
    assert "cells" not in parts and parts["loss"] == pytest.approx(parts["ce"])
    one = unknown.clone()
    one[1, 2, 3] = 2
    total, parts = compute_loss(outputs, labels, None, cell_targets=one)
    expected = torch.nn.functional.cross_entropy(cells[1:, :, 2, 3], torch.tensor([2]))
    assert parts["cells"] == pytest.approx(float(expected.detach()), rel=1e-5)
    _, off = compute_loss(outputs, labels, None, cell_targets=one, cell_weight=0.0)
    assert "cells" not in off


def test_a_turned_stem_turns_its_targets_with_it():
    stem = torch.zeros(3, 2, 4, 4)
    targets = torch.full((3, 4, 4), 0, dtype=torch.long)
    for i, (r, c) in enumerate([(0, 1), (2, 3), (3, 0)]):
        stem[i, 0, r, c] = 1.0
        targets[i, r, c] = 1
    for seed in range(8):
        out, mix = augment_batch({"image_stem": stem, DEFECT_TARGET: targets}, True, 0.0, np.random.default_rng(seed))
        assert mix is None
        assert torch.equal(out["image_stem"][:, 0] > 0, out[DEFECT_TARGET] == 1)


def test_a_served_defect_map_model_asks_for_the_stem():
    meta = {"dims": {"image_dim": 8, "image_tokens": 4, "stem_dim": 7, "stem_size": 5, "text_dim": 6, "text_len": 3},
            "settings": {"image_pooling": "defect_maps", "text_sources": ["ocr"], "kind": "image_only"}}
    assert feature_shapes(meta)["image_stem"] == (7, 5, 5)


def test_the_served_defect_map_model_reads_the_extracted_stem(tmp_path):
    """The in-memory extraction Serve and ``predict`` use, a defect-map model saved and loaded as Serve
    loads it: its prediction is the model's own on the extracted stride-16 map."""
    from ase_ray.features.inmemory import FeatureExtractor, decode_image_bytes
    from ase_ray.models.classifier import build_model
    from ase_ray.models.inference import ClassifierPredictor
    from ase_ray.models.io import save_model
    from ase_ray.models.projections import dims_from_batch

    cfg = load_config(overrides=["features.reason.backend=tiny", "features.image_encoder.backend=tiny",
                                 "features.image_encoder.image_size=64", "features.image_encoder.stem=true"])
    rng = np.random.default_rng(2)
    images = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (40 + 9 * i, 64, 3), dtype=np.uint8)).save(path)
        images.append(decode_image_bytes(path.read_bytes()))
    arrays = FeatureExtractor(cfg.features).load()(images).arrays
    settings = cfg.train.model.model_copy(update={"kind": "image_only", "image_pooling": "defect_maps"})
    batch = to_tensors(arrays, np.arange(len(images)), "cpu", torch.float32)
    dims = dims_from_batch(batch)
    model = build_model(settings, dims, 3).eval()
    save_model(model, tmp_path / "model", settings, dims, ["a", "b", "c"])
    served = ClassifierPredictor.from_dir(tmp_path / "model").predict_proba(arrays)
    with torch.no_grad():
        np.testing.assert_allclose(served, model(batch)["logits"].softmax(-1).numpy(), atol=1e-5)
        changed = dict(batch, image_stem=batch["image_stem"] + 1.0)
        assert not np.allclose(served, model(changed)["logits"].softmax(-1).numpy(), atol=1e-4)


def test_the_map_votes_with_its_most_confident_defect_cell_and_its_least_normal_cell():
    from ase_ray.models.defect_maps import DefectMapHead

    head = DefectMapHead(stem_dim=4, stem_size=2, width=8, num_classes=3, d_model=8, dropout=0.0, with_tokens=False)
    cells = torch.zeros(1, 3, 2, 2)
    cells[0, 0] = 5.0  # every cell says normal ...
    cells[0, 2, 1, 0] = 9.0  # ... but one, which says class 2
    assert head.decision_scores(cells) is None  # the normal class is unknown until training sets it
    head.set_normal_class(0)
    logp = torch.log_softmax(cells, dim=1).flatten(2)
    expected = torch.stack([logp[0, 0].min(), logp[0, 1].max(), logp[0, 2].max()])
    scores = head.decision_scores(cells)[0]
    torch.testing.assert_close(scores, expected)
    assert scores.argmax() == 2  # one confident defect cell outvotes three normal ones


def test_a_voting_defect_map_model_learns_its_normal_class_and_keeps_it_when_saved(tmp_path):
    from ase_ray.models.inference import ClassifierPredictor
    from ase_ray.models.io import load_model, save_model

    fake_feature_store(tmp_path / "store", image_encoder=TINY, per_class=24, signal=0.0, masks=True)
    cfg = _maps_config(tmp_path / "store", "train.model.defect_map_decision=1.0")
    splits, classes = load_task_arrays(tmp_path / "store", "multiclass")
    cfg, splits = with_image_tail(cfg, splits)
    splits = with_defect_targets(cfg, splits, classes)
    train = {**splits["train"].features, LABEL_KEY: splits["train"].labels}
    model = run_epochs(train, {}, cfg.train, classes).module.eval()
    assert int(model.defect_maps.normal_class) == 0  # the fake store's normal class, the commonest cell class
    features = {k: v for k, v in splits["train"].features.items() if k != DEFECT_TARGET}
    batch = to_tensors(features, np.arange(len(splits["train"])), "cpu", torch.float32)
    with torch.no_grad():
        out = model(batch)
        head_alone = model.head(model.defect_maps(batch["image_stem"])[0])
    torch.testing.assert_close(out["logits"], head_alone + model.defect_maps.decision_scores(out[DEFECT_CELLS]))
    assert (out["logits"].argmax(1).numpy() == splits["train"].labels).mean() > 0.8
    save_model(model, tmp_path / "model", model.settings, model.dims, classes)
    assert int(load_model(tmp_path / "model")[0].defect_maps.normal_class) == 0
    served = ClassifierPredictor.from_dir(tmp_path / "model").predict_proba(features)
    np.testing.assert_allclose(served, out["logits"].softmax(-1).numpy(), atol=1e-5)


def test_a_defect_map_model_saved_before_the_vote_still_loads():
    from ase_ray.models.classifier import build_model
    from ase_ray.models.projections import FeatureDims

    settings = load_config().train.model.model_copy(update={"kind": "image_only", "image_pooling": "defect_maps"})
    dims = FeatureDims(image_dim=8, image_tokens=4, text_dim=6, text_len=3, llm_dim=0, stem_dim=7, stem_size=5)
    state = {k: v for k, v in build_model(settings, dims, 3).state_dict().items() if not k.endswith("normal_class")}
    model = build_model(settings, dims, 3)
    model.load_state_dict(state)
    assert int(model.defect_maps.normal_class) == -1


def test_the_vote_needs_the_defect_maps():
    with pytest.raises(Exception, match="defect_map_decision reads the defect maps"):
        load_config(overrides=["train.model.defect_map_decision=1.0"])


def test_eval_views_average_the_logits_of_the_turned_maps_in_eval_mode_only(tmp_path):
    from ase_ray.features.image_encoder import dihedral
    from ase_ray.models.classifier import build_model
    from ase_ray.models import inference
    from ase_ray.models.io import load_model, save_model
    from ase_ray.models.projections import FeatureDims

    base = load_config().train.model.model_copy(update={"kind": "image_only", "image_pooling": "defect_maps"})
    dims = FeatureDims(image_dim=8, image_tokens=4, text_dim=6, text_len=3, llm_dim=0, stem_dim=7, stem_size=5)
    torch.manual_seed(0)
    single = build_model(base, dims, 3).eval()
    averaging = build_model(base.model_copy(update={"eval_views": 8}), dims, 3)
    averaging.load_state_dict(single.state_dict())
    stem = torch.randn(4, 7, 5, 5)
    with torch.no_grad():
        views = torch.stack([single({"image_stem": dihedral(stem, v)})["logits"] for v in range(8)])
        averaging.eval()
        torch.testing.assert_close(averaging({"image_stem": stem})["logits"], views.mean(0))
        assert not torch.allclose(views[0], views.mean(0), atol=1e-4)  # the head is not turn-invariant
    save_model(averaging, tmp_path / "model", averaging.settings, dims, ["a", "b", "c"])
    loaded = load_model(tmp_path / "model")[0]  # what Serve and predict run
    assert loaded.settings.eval_views == 8
    served = inference.predict_proba(loaded, {"image_stem": stem.numpy()})
    np.testing.assert_allclose(served, views.mean(0).softmax(-1).numpy(), atol=1e-5)
    with torch.no_grad():
        averaging.train()
        torch.manual_seed(1)
        trained = averaging({"image_stem": stem})["logits"]
        single.train()
        torch.manual_seed(1)
        torch.testing.assert_close(trained, single({"image_stem": stem})["logits"])  # training sees one view


def test_eval_views_need_a_model_that_reads_the_map():
    with pytest.raises(Exception, match="eval_views turns the stride-16 map"):
        load_config(overrides=["train.model.eval_views=8"])


def test_cmaf_over_defect_maps_reads_the_maps_pooled_vector_and_older_models_load_without_it(tmp_path):
    import json

    from ase_ray.models.classifier import build_model
    from ase_ray.models.io import load_model, save_model
    from ase_ray.models.projections import FeatureDims

    dims = FeatureDims(image_dim=8, image_tokens=4, text_dim=6, text_len=3, llm_dim=0, stem_dim=7, stem_size=5)
    base = load_config().train.model.model_copy(update={"kind": "cmaf", "image_pooling": "defect_maps",
                                                        "text_sources": ["ocr"], "numeric_sources": [],
                                                        "use_llm_hidden": False, "d_model": 8, "heads": 2})
    batch = {"image_stem": torch.randn(3, 7, 5, 5), "text_ocr_tokens": torch.randn(3, 3, 6),
             "text_ocr_mask": torch.ones(3, 3, dtype=torch.long), "text_ocr_pooled": torch.randn(3, 6)}

    def pool_gradient(model) -> float:
        model.eval()
        model(batch)["logits"].sum().backward()
        grad = model.defect_maps.pool_proj.weight.grad
        return 0.0 if grad is None else float(grad.abs().sum())

    torch.manual_seed(0)
    reading = build_model(base.model_copy(update={"cmaf_pooled_image": True}), dims, 3)
    assert reading.head.layers[0].normalized_shape == (3 * 8,)
    assert pool_gradient(reading) > 0  # the pooled vector (its max over cells) reaches the logits
    torch.manual_seed(0)
    older = build_model(base, dims, 3)  # the default
    assert pool_gradient(older) == 0.0  # CMAF alone reads only the cell tokens
    torch.manual_seed(0)
    residual = build_model(base.model_copy(update={"cmaf_pooled_image": True, "image_logits": True}), dims, 3)
    assert residual.head.layers[0].normalized_shape == (2 * 8,)  # the pooled vector feeds the image head instead
    assert pool_gradient(residual) > 0
    with torch.no_grad():  # the fused head starts at zero: the image head alone decides
        torch.testing.assert_close(residual(batch)["logits"], residual.image_head(residual.defect_maps(batch["image_stem"])[0]))
    # A model saved before the option (format 2) loads as it was trained.
    save_model(older, tmp_path / "m", older.settings, dims, ["a", "b", "c"])
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    meta["format"] = 2
    del meta["settings"]["cmaf_pooled_image"]
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    loaded = load_model(tmp_path / "m")[0]
    assert loaded.settings.cmaf_pooled_image is False
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch)["logits"], older.eval()(batch)["logits"])


@pytest.mark.parametrize("context, reach", [(0, False), (2, True)])
def test_context_blocks_let_a_cell_read_cells_further_away(context, reach):
    from ase_ray.models.defect_maps import DefectMapHead

    torch.manual_seed(0)
    head = DefectMapHead(stem_dim=4, stem_size=12, width=8, num_classes=3, d_model=8, dropout=0.0,
                         with_tokens=False, context=context).eval()
    stem = torch.randn(1, 4, 12, 12)
    planted = stem.clone()
    planted[0, :, 6, 9] += 5.0  # three cells to the right of cell (6, 6)
    with torch.no_grad():
        here, there = head(stem)[2], head(planted)[2]
    assert not torch.allclose(here[0, :, 6, 9], there[0, :, 6, 9])  # the planted cell itself moves
    assert torch.allclose(here[0, :, 6, 6], there[0, :, 6, 6]) != reach
