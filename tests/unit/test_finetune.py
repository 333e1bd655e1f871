"""Fine-tuning the image encoder's later stages (train.finetune) from the stored stride-16 map."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ase_ray.config import load_config
from ase_ray.errors import DataError
from ase_ray.features.backends import build_image_encoder
from ase_ray.features.settings import ImageEncoderSettings
from ase_ray.models.augment import augment_batch
from ase_ray.models.classifier import build_model
from ase_ray.models.inference import ClassifierPredictor
from ase_ray.models.io import load_model, save_model
from ase_ray.models.projections import dims_from_batch
from ase_ray.models.settings import ImageTailSpec
from ase_ray.testing import fake_feature_store
from ase_ray.train.data import LABEL_KEY, image_tail_spec, load_task_arrays
from ase_ray.train.engine import parameter_groups
from ase_ray.train.fit import with_image_tail
from ase_ray.train.loop import run_epochs

TINY = {"backend": "tiny", "image_size": 64, "pooling": "mean_max", "resize": "pad"}


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40 + 7 * i, 70, 3), dtype=np.uint8)) for i in range(n)]


@pytest.mark.parametrize("backend", ["tiny", "efficientnet-lite0"])
def test_the_tail_on_the_stored_stem_gives_the_encoders_own_final_map(backend):
    settings = ImageEncoderSettings(backend=backend, image_size=96, resize="pad", stem=True, mid_stages=True,
                                    device="cpu")
    encoder = build_image_encoder(settings)
    features = encoder.encode_batch(_images(3))
    assert features.stem.shape == (3, *encoder.stem_shape)
    with torch.no_grad():
        final = encoder.tail().eval()(torch.from_numpy(features.stem))
    np.testing.assert_allclose(final.flatten(2).transpose(1, 2).numpy(), features.tokens, atol=1e-5)
    assert build_image_encoder(settings.model_copy(update={"stem": False})).encode_batch(_images(1)).stem is None


def _finetune_config(store, *extra):
    cfg = load_config(overrides=[f"train.store_dir={store}", "train.model.kind=image_only", "train.pfa.enabled=false",
                                 "train.finetune.enabled=true", "train.epochs=5", "train.lr=3e-3", *extra])
    splits, classes = load_task_arrays(store, "multiclass")
    cfg, splits = with_image_tail(cfg, splits)
    return cfg, splits, classes


def test_finetuning_moves_the_tail_lowers_the_loss_and_keeps_batchnorm_statistics(tmp_path):
    fake_feature_store(tmp_path / "store", image_encoder=TINY, per_class=12)
    cfg, splits, classes = _finetune_config(tmp_path / "store")
    assert cfg.train.model.image_tail == ImageTailSpec(backend="tiny", image_size=64, pooling="mean_max")
    train = {**splits["train"].features, LABEL_KEY: splits["train"].labels}
    pretrained = build_model(cfg.train.model, dims_from_batch({k: torch.from_numpy(v[:1]) for k, v in
                                                                splits["train"].features.items()}), len(classes))
    result = run_epochs(train, {}, cfg.train, classes)
    losses = [h["train_ce"] for h in result.history]
    assert losses[-1] < losses[0]
    before, after = pretrained.image_tail.state_dict(), result.module.image_tail.state_dict()
    weights = [k for k in before if k.endswith("weight") and "normalization" not in k and "bn" not in k]
    assert weights and all(not torch.equal(before[k], after[k]) for k in weights)
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)
    groups = parameter_groups(result.module, cfg.train)
    assert [g.get("lr") for g in groups] == [None, pytest.approx(3e-3 * cfg.train.finetune.lr_scale)]


def test_a_model_that_does_not_finetune_never_reads_the_stem(tmp_path):
    fake_feature_store(tmp_path / "store", image_encoder=TINY)
    cfg = load_config(overrides=[f"train.store_dir={tmp_path / 'store'}"])
    splits, _ = load_task_arrays(tmp_path / "store", "multiclass")
    assert "image_stem" in splits["train"].features
    cfg, splits = with_image_tail(cfg, splits)
    assert cfg.train.model.image_tail is None and "image_stem" not in splits["train"].features


def test_finetuning_a_store_without_the_stem_says_how_to_extract_it(tmp_path):
    fake_feature_store(tmp_path / "store")
    with pytest.raises(DataError, match="features.image_encoder.stem=true"):
        _finetune_config(tmp_path / "store")
    with pytest.raises(DataError, match="image_stem"):
        image_tail_spec({"shapes": {}})


def test_augmentation_keeps_shapes_and_labels_and_mixes_with_one_lambda():
    rng = np.random.default_rng(0)
    batch = {"image_stem": torch.randn(6, 5, 4, 4), "image_pooled": torch.randn(6, 8),
             "image_tokens": torch.randn(6, 4, 8), "text_ocr_mask": torch.ones(6, 3, dtype=torch.long)}
    labels = torch.arange(6)
    out, mix = augment_batch(batch, True, 0.4, rng)
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in batch.items()}
    assert torch.equal(out["text_ocr_mask"], batch["text_ocr_mask"]) and torch.equal(labels, torch.arange(6))
    partners, lam = mix
    assert 0 < lam < 1 and sorted(partners.tolist()) == list(range(6))
    expected = lam * batch["image_pooled"] + (1 - lam) * batch["image_pooled"][partners]
    torch.testing.assert_close(out["image_pooled"], expected)
    # without mixup the stem is only turned: the same values, one of the 8 dihedral views
    turned, none = augment_batch(batch, True, 0.0, np.random.default_rng(3))
    assert none is None and torch.equal(turned["image_pooled"], batch["image_pooled"])
    assert torch.allclose(turned["image_stem"].flatten(1).sort().values, batch["image_stem"].flatten(1).sort().values)


def test_the_served_model_runs_the_moved_encoder_on_an_extracted_image(tmp_path):
    """The in-memory extraction Serve and ``predict`` use, a fine-tuned model saved and loaded as Serve
    loads it: the same image gives the trained model's prediction, not the pretrained encoder's."""
    from ase_ray.features.inmemory import FeatureExtractor, decode_image_bytes

    cfg = load_config(overrides=["features.reason.backend=tiny", "features.image_encoder.backend=tiny",
                                 "features.image_encoder.image_size=64", "features.image_encoder.stem=true"])
    images = []
    for i, image in enumerate(_images(4, seed=1)):
        path = tmp_path / f"{i}.png"
        image.save(path)
        images.append(decode_image_bytes(path.read_bytes()))
    arrays = FeatureExtractor(cfg.features).load()(images).arrays
    assert arrays["image_stem"].shape == (4, 30, 4, 4)
    spec = image_tail_spec({"shapes": {"image_stem": [30, 4, 4]},
                            "features": {"image_encoder": cfg.features.image_encoder.model_dump(mode="json")}})
    settings = cfg.train.model.model_copy(update={"kind": "image_only", "image_tail": spec})
    dims = dims_from_batch({k: torch.from_numpy(np.asarray(v[:1], dtype=np.float32)) for k, v in arrays.items()})
    model = build_model(settings, dims, 3).eval()
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # what training does to the tail, in short
        for name, p in model.image_tail.named_parameters():
            p.add_(torch.randn_like(p) * 0.5)
    save_model(model, tmp_path / "model", settings, dims, ["a", "b", "c"])
    served = ClassifierPredictor.from_dir(tmp_path / "model").predict_proba(arrays)
    with torch.no_grad():
        batch = {k: torch.from_numpy(np.asarray(v, dtype=np.float32 if v.dtype.kind == "f" else np.int64))
                 for k, v in arrays.items()}
        np.testing.assert_allclose(served, model(batch)["logits"].softmax(-1).numpy(), atol=1e-5)
        reloaded, _ = load_model(tmp_path / "model")
        reloaded.load_state_dict(pretrained)
        assert not np.allclose(served, reloaded(batch)["logits"].softmax(-1).numpy(), atol=1e-4)
