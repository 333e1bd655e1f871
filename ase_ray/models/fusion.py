"""Fusion of projected image and text features into one vector: CMAF and the pooled baselines.

Every fusion returns ``(fused (B, out_dim), gates (B, 2) or None)``; gates are (image, text).
"""

from __future__ import annotations

import torch
from torch import nn


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, T, d) over the positions where mask (B, T) is True."""
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def segment_mean(x: torch.Tensor, mask: torch.Tensor, segments: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Mean over segments of each segment's masked mean: (B, T, d) with segment ids (T,) in
    [0, n_segments) -> (B, d). Every segment with a real token weighs the same, however many tokens it
    has, so a one-token input (the numeric block) is not drowned by a text's hundred."""
    one_hot = torch.nn.functional.one_hot(segments, n_segments).to(x.dtype)  # (T, S)
    weights = mask.to(x.dtype).unsqueeze(-1) * one_hot.unsqueeze(0)  # (B, T, S)
    counts = weights.sum(dim=1)  # (B, S)
    per_segment = torch.einsum("bts,btd->bsd", weights, x) / counts.clamp_min(1.0).unsqueeze(-1)
    present = (counts > 0).to(x.dtype)
    return (per_segment * present.unsqueeze(-1)).sum(dim=1) / present.sum(dim=1, keepdim=True).clamp_min(1.0)


class ModalityGates(nn.Module):
    """Sigmoid gates (g_img, g_txt) in (0, 1) from a linear layer over [image; text]."""

    def __init__(self, d_model: int):
        super().__init__()
        self.linear = nn.Linear(2 * d_model, 2)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear(torch.cat([image, text], dim=-1)))


class CrossAttentionBlock(nn.Module):
    """Queries attend over a key/value token sequence; residual + LayerNorm."""

    def __init__(self, d_model: int, heads: int, dropout: float):
        super().__init__()
        self.attention = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """queries (B, Tq, d), keys (B, Tk, d), key_mask (B, Tk) True = real (None: all real)."""
        padding = None if key_mask is None else ~key_mask
        attended, _ = self.attention(queries, keys, keys, key_padding_mask=padding, need_weights=False)
        return self.norm(queries + self.drop(attended))


class CmafFusion(nn.Module):
    """Cross-modality attention fusion over token sequences.

    Image tokens attend over text tokens (padding masked out) and text tokens attend over image
    tokens; each side is then mean-pooled (text: over real tokens only; given ``text_segments``, as the
    mean of each input's own mean), weighed by its sigmoid gate, and the two gated vectors are
    concatenated: out_dim = 2 * d.
    """

    def __init__(self, d_model: int, heads: int, dropout: float):
        super().__init__()
        self.image_to_text = CrossAttentionBlock(d_model, heads, dropout)
        self.text_to_image = CrossAttentionBlock(d_model, heads, dropout)
        self.gates = ModalityGates(d_model)
        self.out_dim = 2 * d_model

    def forward(
        self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor,
        text_segments: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.image_to_text(image_tokens, text_tokens, text_mask)
        text = self.text_to_image(text_tokens, image_tokens, None)
        image_vec = image.mean(dim=1)
        if text_segments is None:  # padded text queries are dropped here
            text_vec = masked_mean(text, text_mask)
        else:
            text_vec = segment_mean(text, text_mask, text_segments, int(text_segments.max()) + 1)
        gates = self.gates(image_vec, text_vec)
        fused = torch.cat([gates[:, :1] * image_vec, gates[:, 1:] * text_vec], dim=-1)
        return fused, gates


class GatedFusion(nn.Module):
    """Sigmoid-gated sum of the pooled image vector and the mean pooled text vector: out_dim = d."""

    def __init__(self, d_model: int):
        super().__init__()
        self.gates = ModalityGates(d_model)
        self.out_dim = d_model

    def forward(self, image: torch.Tensor, text_set: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        text = text_set.mean(dim=1)
        gates = self.gates(image, text)
        return gates[:, :1] * image + gates[:, 1:] * text, gates


class ClassificationHead(nn.Module):
    """LayerNorm -> Linear -> GELU -> Dropout -> Linear: fused vector to logits."""

    def __init__(self, in_dim: int, hidden: int, num_classes: int, dropout: float):
        super().__init__()
        self.layers = nn.Sequential(
            nn.LayerNorm(in_dim),
            nn.Linear(in_dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def zero_output(self) -> None:
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
