"""Shared pieces of the per-item model stages: device choice, the backend error, result types.

The backends themselves are registered and built in ``ase_ray.features.backends``."""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ase_ray.errors import AseRayError

if TYPE_CHECKING:
    import tokenizers
    import torch


class BackendUnavailable(AseRayError):
    """A model backend cannot be loaded here (offline package missing, model id unreachable...)."""


def resolve_device(device: str) -> "torch.device":
    """``auto`` means cuda when a GPU is visible, else cpu; anything else is passed to torch. On the CPU
    torch's threads are capped at OMP_THREAD_LIMIT first (bf16 comes back wrong otherwise)."""
    import torch

    from ase_ray.torch_threads import respect_omp_thread_limit

    resolved = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if resolved.type == "cpu":
        respect_omp_thread_limit()
    return resolved


# Characters the tiny test tokenizers know; anything else maps to the unknown token.
TINY_CHARACTERS = string.ascii_lowercase + string.digits + string.punctuation + " \n"


def build_char_tokenizer(special_tokens: list[str], unk_token: str) -> "tokenizers.Tokenizer":
    """A lower-casing, one-token-per-character tokenizer built in memory (no download).

    Special tokens take the first ids, in the order given. Used by the ``tiny`` backends.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {token: index for index, token in enumerate(special_tokens)}
    for char in TINY_CHARACTERS:
        vocab.setdefault(char, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk_token))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return tokenizer


# ------------------------------------------------------------------ per-image stages (OCR, VLM, image)
class StageItemError(AseRayError):
    """One item of a batch failed (the batch can go on); ``index`` is its position when known."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


@dataclass
class OcrResult:
    """The text an OCR backend read, and its ``KEY value`` pairs (numbers as float, see parse_fields)."""

    text: str
    fields: dict[str, float | str]


@dataclass
class ImageFeatures:
    """Image encoder outputs for a batch of B images.

    ``pooled``: (B, D) float32, the global vector; ``tokens``: (B, N, D) float32, the last spatial
    feature map flattened row-major (N = H*W). D is read from the model, never assumed.
    """

    pooled: np.ndarray
    tokens: np.ndarray
    stem: np.ndarray | None = None  # (B, C, H, W): the stride-16 map of the untransformed image, when asked


# ------------------------------------------------------------------ per-text stages (LLM, text encoder)
def masked_mean(hidden: "torch.Tensor", mask: "torch.Tensor") -> "torch.Tensor":
    """Mean of ``hidden`` (B, L, H) over the positions where ``mask`` (B, L) is 1 (padding excluded)."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
