"""The image encoder's later stages inside the classifier, for fine-tuning (``train.finetune``).

Extraction keeps the frozen early stages' stride-16 map (``image_stem``, ``features.image_encoder.stem``);
the classifier carries a trainable copy of the stages after it (``ImageTail``) and recomputes the final
map, so its image tokens and the final map's part of the pooled vector come from the adapted encoder,
in training, ``evaluate``, ``predict`` and Serve alike. The early stages stay frozen and cached: an
epoch costs the later stages only (affordable on 2 CPU cores).

The tail's BatchNorm layers keep the backbone's ImageNet statistics (always in eval mode): a few
hundred images in batches of ten would otherwise replace them with noise.
"""

from __future__ import annotations

import copy
from functools import lru_cache

import torch
from torch import nn

from ase_ray.models.settings import ImageTailSpec


class EfficientNetTail(nn.Module):
    """EfficientNet-lite blocks ``first`` onwards, the 1x1 head convolution and its BatchNorm (copies)."""

    def __init__(self, model: nn.Module, first: int):
        super().__init__()
        self.blocks = nn.ModuleList(copy.deepcopy(list(model._blocks)[first:]))
        self.conv_head = copy.deepcopy(model._conv_head)
        self.bn1 = copy.deepcopy(model._bn1)
        self.swish = copy.deepcopy(model._swish)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.swish(self.bn1(self.conv_head(x)))


def freeze_batchnorm(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eval()


class ImageTail(nn.Module):
    """``image_stem`` (B, C, H, W) -> the final map, and from it the image inputs the classifier reads."""

    def __init__(self, spec: ImageTailSpec):
        super().__init__()
        self.spec = spec
        self.net = load_tail(spec)

    def train(self, mode: bool = True) -> "ImageTail":
        super().train(mode)
        freeze_batchnorm(self.net)
        return self

    def with_adapted_image(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch`` with ``image_tokens`` and the final map's part of ``image_pooled`` recomputed."""
        from ase_ray.errors import DataError
        from ase_ray.features.image_encoder import pool_map

        if "image_stem" not in batch:
            raise DataError("this model fine-tunes the image encoder and needs the 'image_stem' column "
                            "(extract with features.image_encoder.stem: true)")
        final = self.net(batch["image_stem"])
        pooled = batch["image_pooled"]
        own = pool_map(final, self.spec.pooling).to(pooled.dtype)
        return {**batch, "image_tokens": final.flatten(2).transpose(1, 2).to(pooled.dtype),
                "image_pooled": torch.cat([own, pooled[:, own.shape[1]:]], dim=1)}


def load_tail(spec: ImageTailSpec) -> nn.Module:
    """The stages after the stride-16 map of the backbone ``spec`` names, with its pretrained weights
    (a trained model's own weights are loaded over them): a fresh copy each call, the backbone loaded
    once per process (training builds a model for scoring and for every epoch's export)."""
    return copy.deepcopy(_pretrained_tail(spec.model_dump_json())).train()


@lru_cache(maxsize=2)
def _pretrained_tail(spec_json: str) -> nn.Module:
    """The global RNG is left as it was: the tiny test backbone seeds itself."""
    from ase_ray.features.backends import build_image_encoder
    from ase_ray.features.settings import ImageEncoderSettings

    spec = ImageTailSpec.model_validate_json(spec_json)
    settings = ImageEncoderSettings(backend=spec.backend, model_id=spec.model_id, revision=spec.revision,
                                    image_size=spec.image_size, device="cpu")
    with torch.random.fork_rng(devices=[]):
        encoder = build_image_encoder(settings)
    return encoder.tail()
