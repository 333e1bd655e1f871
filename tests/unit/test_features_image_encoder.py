"""Image encoders: documented shapes per backend, mixed image sizes, the real ResNet loading path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ase_ray.features.base import BackendUnavailable, ImageFeatures
from ase_ray.features.backends import build_image_encoder
from ase_ray.features.image_encoder import EfficientNetLiteEncoder, ResNetEncoder, images_to_tensor
from ase_ray.features.settings import ImageEncoderSettings


def random_images(sizes: list[tuple[int, int]]) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


MIXED = random_images([(320, 256), (60, 100), (224, 224)]) + [Image.new("L", (50, 40), 128)]


def check_features(features: ImageFeatures, batch: int, tokens: int, dim: int) -> None:
    assert features.pooled.shape == (batch, dim)
    assert features.tokens.shape == (batch, tokens, dim)
    assert features.pooled.dtype == np.float32 and features.tokens.dtype == np.float32
    assert np.isfinite(features.pooled).all() and np.isfinite(features.tokens).all()
    # pooled is the mean of the token map
    np.testing.assert_allclose(features.pooled, features.tokens.mean(axis=1), rtol=1e-4, atol=1e-5)


def test_tiny_resnet_shapes_with_mixed_sizes() -> None:
    encoder = build_image_encoder(ImageEncoderSettings(backend="tiny", image_size=64, device="cpu"))
    assert isinstance(encoder, ResNetEncoder)
    assert encoder.feature_dim == 40  # the tiny config's last stage width, read from the model
    features = encoder.encode_batch(MIXED)
    check_features(features, batch=4, tokens=(64 // 32) ** 2, dim=40)
    alone = encoder.encode_batch(MIXED[:1]).pooled[0]  # batching does not change an image's vector
    np.testing.assert_allclose(alone, features.pooled[0], rtol=1e-5, atol=1e-6)


def test_efficientnet_lite0_offline_shapes() -> None:
    encoder = build_image_encoder(ImageEncoderSettings(backend="efficientnet-lite0", device="cpu"))
    assert isinstance(encoder, EfficientNetLiteEncoder)
    assert encoder.feature_dim == 1280
    features = encoder.encode_batch(MIXED[:3])
    check_features(features, batch=3, tokens=7 * 7, dim=1280)
    assert features.pooled.std() > 0  # pretrained weights, not a constant map


def test_resnet_real_loading_path_from_a_saved_tiny_model(tmp_path: Path) -> None:
    tiny = ResNetEncoder(ImageEncoderSettings(backend="tiny", device="cpu"))
    tiny.model.save_pretrained(tmp_path / "tiny-resnet")
    model_id = str(tmp_path / "tiny-resnet")
    settings = ImageEncoderSettings(backend="resnet", model_id=model_id, image_size=96, device="cpu")
    encoder = build_image_encoder(settings)
    assert isinstance(encoder, ResNetEncoder)
    features = encoder.encode_batch(MIXED[:2])
    check_features(features, batch=2, tokens=3 * 3, dim=40)
    reference = ResNetEncoder(ImageEncoderSettings(backend="tiny", image_size=96, device="cpu"))
    np.testing.assert_allclose(features.pooled, reference.encode_batch(MIXED[:2]).pooled, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_id", ["no-such-org/no-such-resnet", "/no/such/folder"])
def test_unreachable_resnet_is_a_clear_error(model_id: str) -> None:
    settings = ImageEncoderSettings(backend="resnet", model_id=model_id, device="cpu")
    with pytest.raises(BackendUnavailable, match="efficientnet-lite0"):
        build_image_encoder(settings)


def test_empty_batch() -> None:
    encoder = build_image_encoder(ImageEncoderSettings(backend="tiny", image_size=64, device="cpu"))
    features = encoder.encode_batch([])
    assert features.pooled.shape == (0, 40) and features.tokens.shape[0] == 0


def test_preprocessing_normalises_with_imagenet_statistics() -> None:
    pixels = images_to_tensor([Image.new("RGB", (10, 30), (124, 116, 104))], size=32)
    assert tuple(pixels.shape) == (1, 3, 32, 32)
    assert float(pixels.abs().max()) < 0.01  # the ImageNet mean colour maps to ~0


def test_no_torchvision_or_timm_imported() -> None:
    build_image_encoder(ImageEncoderSettings(backend="tiny", image_size=64, device="cpu")).encode_batch(MIXED[:1])
    assert "torchvision" not in sys.modules
    assert "timm" not in sys.modules


# ------------------------------------------------------------- what an image becomes (issue 14 part 1)
def tiny(**settings) -> ResNetEncoder:
    return build_image_encoder(ImageEncoderSettings(backend="tiny", image_size=64, device="cpu", **settings))


def test_pad_keeps_the_aspect_ratio_and_fills_with_the_imagenet_mean() -> None:
    image = Image.new("RGB", (200, 50), (255, 255, 255))
    pixels = images_to_tensor([image], size=64, resize="pad")[0]
    assert tuple(pixels.shape) == (3, 64, 64)
    content = (pixels.abs().sum(dim=0) > 0.1).nonzero()
    rows, cols = content[:, 0], content[:, 1]
    assert (int(cols.min()), int(cols.max())) == (0, 63)
    assert (int(rows.min()), int(rows.max())) == (24, 39)  # 50/200 * 64 = 16 rows, centred
    assert float(pixels[:, :24].abs().max()) < 0.01  # the padding is the ImageNet mean: 0 once normalised
    squashed = images_to_tensor([image], size=64, resize="squash")[0]
    assert float(squashed.abs().sum(dim=0).min()) > 0.1  # squash fills the square with the image


def test_mean_max_pooling_appends_the_max_of_the_final_map() -> None:
    plain, both = tiny(), tiny(pooling="mean_max")
    assert (plain.pooled_dim, both.pooled_dim) == (40, 80)
    a, b = plain.encode_batch(MIXED[:2]), both.encode_batch(MIXED[:2])
    np.testing.assert_allclose(b.pooled[:, :40], a.pooled, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.pooled[:, 40:], a.tokens.max(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.tokens, a.tokens, rtol=1e-5, atol=1e-6)


def test_mid_stages_append_the_stride_8_and_16_maps() -> None:
    encoder = tiny(mid_stages=True, pooling="mean_max")
    assert encoder.mid_dims == (20, 30) and encoder.pooled_dim == 2 * (40 + 20 + 30)
    features = encoder.encode_batch(MIXED[:2])
    assert features.pooled.shape == (2, 180) and features.tokens.shape == (2, 4, 40)
    assert features.pooled[:, 80:].std() > 0  # the mid-stage part carries something
    lite = build_image_encoder(ImageEncoderSettings(backend="efficientnet-lite0", image_size=96, device="cpu",
                                                    mid_stages=True))
    assert lite.mid_dims == (40, 112) and lite.pooled_dim == 1280 + 40 + 112


@pytest.mark.parametrize("views", [4, 8])
def test_views_make_the_features_blind_to_flips(views: int) -> None:
    encoder = tiny(views=views, mid_stages=True, pooling="mean_max")
    image = MIXED[0]
    flipped = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    a, b = encoder.encode_batch([image]), encoder.encode_batch([flipped])
    np.testing.assert_allclose(a.pooled, b.pooled, rtol=1e-4, atol=1e-5)
    grid = a.tokens.reshape(1, 2, 2, 40)
    np.testing.assert_allclose(b.tokens.reshape(1, 2, 2, 40), grid[:, :, ::-1], rtol=1e-4, atol=1e-5)
    single = tiny().encode_batch([image, flipped])  # one view: the flip changes the vector
    assert not np.allclose(single.pooled[0], single.pooled[1], atol=1e-3)


@pytest.mark.parametrize("backend", ["efficientnet-lite1", "efficientnet-lite2"])
def test_stronger_offline_backbones_load_their_shipped_weights(backend: str) -> None:
    encoder = build_image_encoder(ImageEncoderSettings(backend=backend, image_size=96, device="cpu"))
    assert isinstance(encoder, EfficientNetLiteEncoder) and encoder.feature_dim == 1280
    features = encoder.encode_batch(MIXED[:2])
    check_features(features, batch=2, tokens=3 * 3, dim=1280)
    assert features.pooled.std() > 0
    lite0 = build_image_encoder(ImageEncoderSettings(backend="efficientnet-lite0", image_size=96, device="cpu"))
    assert not np.allclose(lite0.encode_batch(MIXED[:2]).pooled, features.pooled, atol=1e-3)


def test_image_settings_are_validated_and_part_of_the_cache_key() -> None:
    from pydantic import ValidationError

    from ase_ray.features.cache import fingerprint

    for bad in ({"views": 3}, {"resize": "crop"}, {"pooling": "max"}, {"backend": "efficientnet-lite5"}):
        with pytest.raises(ValidationError):
            ImageEncoderSettings(**bad)
    base = fingerprint("image_encoder", ImageEncoderSettings())
    for change in ({"views": 8}, {"resize": "pad"}, {"pooling": "mean_max"}, {"mid_stages": True}):
        assert fingerprint("image_encoder", ImageEncoderSettings(**change)) != base
