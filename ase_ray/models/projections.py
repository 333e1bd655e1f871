"""Input widths read from the data, and the projections of image and text features into width d."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from ase_ray.errors import DataError
from ase_ray.models.settings import TEXT_SOURCES

Batch = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class FeatureDims:
    """Widths of the feature-store columns (they differ between real and offline models)."""

    image_dim: int  # Di: image_tokens (B, N, Di), and image_pooled (B, Di) unless image_pooled_dim says otherwise
    image_tokens: int  # N
    text_dim: int  # Dt: text_<src>_pooled (B, Dt), text_<src>_tokens (B, L, Dt)
    text_len: int  # L
    llm_dim: int  # H: llm_hidden (B, H); 0 when the batch has no llm_hidden
    numeric_dim: int = 0  # 2F: numeric (B, 2F), the numeric block (ase_ray.models.numeric); 0 without one
    image_pooled_dim: int = 0  # Dp: image_pooled (B, Dp) when wider than the tokens (mean_max, mid stages); 0: Di
    stem_dim: int = 0  # Cs: image_stem (B, Cs, Hs, Hs), the stride-16 map a fine-tuning model reads; 0 without
    stem_size: int = 0  # Hs

    @property
    def pooled_image_dim(self) -> int:
        return self.image_pooled_dim or self.image_dim


def _require(batch: Batch, key: str, ndim: int) -> torch.Tensor:
    if key not in batch:
        raise DataError(f"batch has no {key!r} column (have {sorted(batch)})")
    value = batch[key]
    if value.ndim != ndim:
        raise DataError(f"{key!r} should have {ndim} dims, got shape {tuple(value.shape)}")
    return value


def dims_from_batch(batch: Batch, sources: Sequence[str] = TEXT_SOURCES) -> FeatureDims:
    """Read the widths from one batch; text widths come from the first of ``sources`` in it."""
    image_tokens = _require(batch, "image_tokens", 3)
    present = [s for s in sources if f"text_{s}_tokens" in batch]
    if not present:
        raise DataError(f"batch has no text_<src>_tokens column for any of {list(sources)}")
    text_tokens = _require(batch, f"text_{present[0]}_tokens", 3)
    llm = batch.get("llm_hidden")
    numeric = batch.get("numeric")
    image_dim = int(image_tokens.shape[-1])
    pooled_dim = int(_require(batch, "image_pooled", 2).shape[-1])
    stem = _require(batch, "image_stem", 4) if "image_stem" in batch else None
    return FeatureDims(
        image_dim=image_dim,
        image_pooled_dim=pooled_dim if pooled_dim != image_dim else 0,
        image_tokens=int(image_tokens.shape[1]),
        text_dim=int(text_tokens.shape[-1]),
        text_len=int(text_tokens.shape[1]),
        llm_dim=int(llm.shape[-1]) if llm is not None else 0,
        numeric_dim=int(_require(batch, "numeric", 2).shape[-1]) if numeric is not None else 0,
        stem_dim=int(stem.shape[1]) if stem is not None else 0,
        stem_size=int(stem.shape[2]) if stem is not None else 0,
    )


def _checked(batch: Batch, key: str, width: int, ndim: int, dtype: torch.dtype) -> torch.Tensor:
    value = _require(batch, key, ndim)
    if value.shape[-1] != width:
        raise DataError(f"{key!r} has width {value.shape[-1]}, the model was built for {width}")
    return value.to(dtype)


def query_attention(x: torch.Tensor, queries: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Learned queries (Q, d) attend over x (B, L, d), mask (B, L) True = real -> (B, Q, d)."""
    scores = torch.einsum("bld,qd->bql", x, queries) / x.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, :], torch.finfo(scores.dtype).min)
    return torch.einsum("bql,bld->bqd", scores.softmax(dim=-1), x)


class PatchAttentionPool(nn.Module):
    """Multiple-instance pooling of the projected image tokens (B, N, d) -> (B, d): Q learned queries
    attend over the patches, their Q outputs are joined and mapped to width d. A query can settle on the
    few patches that hold a defect, where the stored mean spreads them over all N."""

    def __init__(self, d_model: int, queries: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(queries, d_model) * 0.02)
        self.out = nn.Linear(queries * d_model, d_model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(query_attention(tokens, self.queries).flatten(1))


class ImageProjection(nn.Module):
    """Image pooled vector and spatial tokens -> width d (learned positions for the tokens, since the
    attention itself is order-blind). Pooled vector and tokens share one linear map when they have the
    same width; a wider pooled vector (mean and max, mid stages) has its own. With ``patch_queries`` the
    pooled vector is not read: :meth:`pooled` is a ``PatchAttentionPool`` over the tokens."""

    def __init__(self, image_dim: int, n_tokens: int, d_model: int, dropout: float, with_tokens: bool,
                 with_pooled: bool = True, pooled_dim: int = 0, patch_queries: int = 0):
        super().__init__()
        self.image_dim = image_dim
        self.pooled_dim = pooled_dim or image_dim
        self.patch_pool = PatchAttentionPool(d_model, patch_queries) if patch_queries else None
        with_tokens = with_tokens or self.patch_pool is not None
        with_pooled = with_pooled and self.patch_pool is None
        separate = self.pooled_dim != image_dim
        self.proj = nn.Linear(image_dim, d_model) if with_tokens or (with_pooled and not separate) else None
        self.pooled_proj = nn.Linear(self.pooled_dim, d_model) if with_pooled and separate else None
        self.norm = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)
        self.position = nn.Parameter(torch.randn(n_tokens, d_model) * 0.02) if with_tokens else None
        self.pool_norm = nn.LayerNorm(d_model) if self.patch_pool is not None else None

    def pooled(self, batch: Batch) -> torch.Tensor:
        if self.patch_pool is not None:
            return self.drop(self.pool_norm(self.patch_pool(self.tokens(batch))))
        proj = self.pooled_proj if self.pooled_proj is not None else self.proj
        if proj is None:
            raise RuntimeError("this ImageProjection was built without the pooled vector")
        x = _checked(batch, "image_pooled", self.pooled_dim, 2, proj.weight.dtype)
        return self.drop(self.norm(proj(x)))

    def tokens(self, batch: Batch) -> torch.Tensor:
        """(B, N, d)."""
        if self.position is None:
            raise RuntimeError("this ImageProjection was built without token support")
        x = _checked(batch, "image_tokens", self.image_dim, 3, self.proj.weight.dtype)
        if x.shape[1] != self.position.shape[0]:
            raise DataError(f"image_tokens has {x.shape[1]} tokens, the model was built for {self.position.shape[0]}")
        return self.drop(self.norm(self.proj(x) + self.position))


class TokenAttentionPool(nn.Module):
    """A text source's projected token states -> ``queries`` vectors of width d.

    The store's mean-pooled vector averages a number's digits away among the other tokens ("LEN 6.2" and
    "LEN 9.8" pool to nearly the same vector). Here a transformer layer (shared by the sources) lets the
    digits of one value and its key meet, then learned queries per source pick what they need.
    """

    def __init__(self, d_model: int, heads: int, dropout: float, n_sources: int, text_len: int, queries: int,
                 layers: int):
        super().__init__()
        self.position = nn.Parameter(torch.randn(text_len, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, heads, 2 * d_model, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False) if layers else None
        self.queries = nn.Parameter(torch.randn(n_sources, queries, d_model) * 0.02)

    @property
    def n_queries(self) -> int:
        return int(self.queries.shape[1])

    def forward(self, x: torch.Tensor, mask: torch.Tensor, source: int) -> torch.Tensor:
        """x (B, L, d) projected states of source number ``source``, mask (B, L) True = real -> (B, Q, d)."""
        x = x + self.position[: x.shape[1]]
        if self.encoder is not None:
            x = self.encoder(x, src_key_padding_mask=~mask)
        return query_attention(x, self.queries[source], mask)


class TextProjection(nn.Module):
    """Per-source text features -> width d, tagged with a learned source embedding.

    The LLM hidden state and the numeric block, when used, are each projected on their own and become
    one extra (always real) token of the text sequence and one extra entry of the pooled set. With a
    ``token_pool`` the pooled set reads each source's token states (``TokenAttentionPool``, Q entries per
    source) instead of its stored mean-pooled vector.
    """

    def __init__(
        self, text_dim: int, llm_dim: int, d_model: int, dropout: float, sources: Sequence[str], use_llm: bool,
        numeric_dim: int = 0, token_pool: TokenAttentionPool | None = None,
    ):
        super().__init__()
        if use_llm and llm_dim < 1:
            raise DataError("use_llm_hidden is on but the features have no llm_hidden column")
        self.text_dim = text_dim
        self.llm_dim = llm_dim
        self.sources = list(sources)
        self.proj = nn.Linear(text_dim, d_model)
        self.source_embedding = nn.Parameter(torch.randn(len(self.sources), d_model) * 0.02)
        self.norm = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)
        self.llm = nn.Sequential(nn.Linear(llm_dim, d_model), nn.LayerNorm(d_model)) if use_llm else None
        self.numeric_dim = numeric_dim
        # Two layers: a field matters through thresholds and combinations, not one direction.
        self.numeric = nn.Sequential(
            nn.Linear(numeric_dim, d_model), nn.GELU(), nn.Linear(d_model, d_model), nn.LayerNorm(d_model)
        ) if numeric_dim > 0 else None
        self.token_pool = token_pool

    @property
    def uses_llm(self) -> bool:
        return self.llm is not None

    @property
    def extra_entries(self) -> int:
        """Entries beyond the text sources: the LLM vector and the numeric block, when used."""
        return int(self.llm is not None) + int(self.numeric is not None)

    @property
    def pooled_entries(self) -> int:
        """Entries of :meth:`source_pooled`: one per source, or Q per source with a token pool."""
        return len(self.sources) * (self.token_pool.n_queries if self.token_pool is not None else 1)

    def _dtype(self) -> torch.dtype:
        return self.proj.weight.dtype

    def _llm_vector(self, batch: Batch) -> torch.Tensor:
        assert self.llm is not None
        return self.drop(self.llm(_checked(batch, "llm_hidden", self.llm_dim, 2, self._dtype())))

    def _extra_vectors(self, batch: Batch) -> list[torch.Tensor]:
        """(B, 1, d) each: the LLM vector, then the numeric block's, for those the model uses."""
        out = []
        if self.llm is not None:
            out.append(self._llm_vector(batch).unsqueeze(1))
        if self.numeric is not None:
            values = _checked(batch, "numeric", self.numeric_dim, 2, self._dtype())
            out.append(self.drop(self.numeric(values)).unsqueeze(1))
        return out

    def source_pooled(self, batch: Batch) -> torch.Tensor:
        """(B, pooled_entries, d): the projected pooled vector(s) of every text source (no LLM entry)."""
        if self.token_pool is not None:
            return torch.cat([self._attention_pooled(batch, i, s) for i, s in enumerate(self.sources)], dim=1)
        pooled = [
            _checked(batch, f"text_{s}_pooled", self.text_dim, 2, self._dtype()) for s in self.sources
        ]
        x = self.proj(torch.stack(pooled, dim=1)) + self.source_embedding
        return self.drop(self.norm(x))

    def _attention_pooled(self, batch: Batch, index: int, source: str) -> torch.Tensor:
        tokens = _checked(batch, f"text_{source}_tokens", self.text_dim, 3, self._dtype())
        mask = ensure_one_real(_require(batch, f"text_{source}_mask", 2) != 0)
        length = _real_length(mask)  # padding past every row's last real token changes nothing
        x = self.proj(tokens[:, :length]) + self.source_embedding[index]
        return self.drop(self.token_pool(self.drop(self.norm(x)), mask[:, :length], index))

    def pooled_set(self, batch: Batch, source_pooled: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S + extra_entries, d); pass ``source_pooled`` when already computed."""
        x = self.source_pooled(batch) if source_pooled is None else source_pooled
        return torch.cat([x, *self._extra_vectors(batch)], dim=1)

    def tokens(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Concatenated token sequence (B, M, d), its mask (B, M) (True = real token) and which input each
        position belongs to (M,) (:meth:`token_segments`). Each source keeps its positions up to the batch's
        last real token (padding past it changes nothing: every step over text positions is per position
        or masked), then come the extra entries (the LLM and numeric tokens)."""
        seqs, masks, lengths = [], [], []
        for i, s in enumerate(self.sources):
            tokens = _checked(batch, f"text_{s}_tokens", self.text_dim, 3, self._dtype())
            mask = _require(batch, f"text_{s}_mask", 2) != 0
            length = _real_length(mask)
            seqs.append(self.proj(tokens[:, :length]) + self.source_embedding[i])
            masks.append(mask[:, :length])
            lengths.append(length)
        x = self.drop(self.norm(torch.cat(seqs, dim=1)))
        mask = torch.cat(masks, dim=1)
        extra = self._extra_vectors(batch)
        if extra:
            x = torch.cat([x, *extra], dim=1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], len(extra))], dim=1)
        return x, ensure_one_real(mask), self.token_segments(lengths, x.device)

    def token_segments(self, lengths: list[int], device: torch.device | str) -> torch.Tensor:
        """(M,) which input each position of :meth:`tokens` belongs to: source i for its ``lengths[i]``
        positions, then one id per extra entry (LLM, numeric)."""
        ids = torch.arange(len(self.sources), device=device).repeat_interleave(
            torch.as_tensor(lengths, device=device))
        extra = torch.arange(len(self.sources), len(self.sources) + self.extra_entries, device=device)
        return torch.cat([ids, extra])


def _real_length(mask: torch.Tensor) -> int:
    """Positions up to the last real token of any row (at least 1: a source with no text keeps one)."""
    real = mask.any(dim=0).nonzero()
    return int(real.max()) + 1 if len(real) else 1


def ensure_one_real(mask: torch.Tensor) -> torch.Tensor:
    """Mark the first position real in rows with no real token: attention over an all-masked key set
    gives NaN, and an empty row (e.g. blank OCR without an LLM token) must not poison the batch."""
    mask = mask.clone()
    mask[:, 0] |= ~mask.any(dim=1)  # no data-dependent branch: no host sync on GPU
    return mask
