"""Zero-shot image descriptions: the paper's VLM (InstructBLIP) and an offline stand-in.

Backends (chosen by :func:`ase_ray.features.backends.build_describer` from ``DescribeSettings.backend``):

- ``instructblip``: :class:`InstructBlipDescriber` loads ``settings.model_id`` with transformers
  (needs the hub or a local mirror) and answers ``settings.prompt`` for every image;
- ``tiny``: the same class and code path on a tiny randomly initialised ``InstructBlipConfig`` with
  an in-memory character tokenizer (no download; for tests, its text is random);
- ``measure``: :class:`MeasureDescriber`, the OFFLINE STAND-IN used where no VLM weights exist. It is
  not a model: it writes one sentence of what it measures in the pixels (brightness, contrast, edge
  density, dark/bright blobs, pink-dot markers and where they are). It never sees the label.

Every describer has ``describe_batch(images) -> list[str]``, one description per image, in order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ase_ray.features.base import BackendUnavailable, build_char_tokenizer, resolve_device
from ase_ray.features.hub import load_kwargs, where

if TYPE_CHECKING:
    from ase_ray.features.settings import DescribeSettings

# ---------------------------------------------------------------------------------- InstructBLIP
# Shapes of the tiny test model, after transformers' own InstructBLIP tests.
TINY_IMAGE_SIZE = 30
TINY_NUM_QUERY_TOKENS = 10
TINY_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3: bos, pad, eos, unk as in OPT


class InstructBlipDescriber:
    """InstructBLIP answering ``settings.prompt`` for each image (greedy, ``max_new_tokens``).

    ``backend == "instructblip"`` loads ``settings.model_id`` at ``settings.revision`` (from
    ``models_dir`` only, when given); ``backend == "tiny"`` builds a tiny random model of the same
    class (tests). The model is loaded once, here.
    """

    def __init__(self, settings: DescribeSettings, models_dir: str | None = None) -> None:
        import torch

        self.settings = settings
        self.device = resolve_device(settings.device)
        self.dtype = getattr(torch, settings.dtype)
        if settings.backend == "tiny":
            self.processor, self.model = build_tiny_instructblip()
        else:
            self.processor, self.model = load_pretrained_instructblip(settings, self.dtype, models_dir)
        self.model.to(self.device, dtype=self.dtype).eval()

    def describe_batch(self, images: list[Image.Image]) -> list[str]:
        """One generated description per image (the prompt itself is not part of the text)."""
        import torch

        if not images:
            return []
        inputs = self.processor(
            images=[image.convert("RGB") for image in images],
            text=[self.settings.prompt] * len(images),
            return_tensors="pt",
            padding=True,
        )
        inputs = {name: value.to(self.device) for name, value in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            generated = self.model.generate(
                **inputs,
                max_new_tokens=self.settings.max_new_tokens,
                do_sample=False,
                pad_token_id=self.processor.tokenizer.pad_token_id,
            )
        if self.model.config.use_decoder_only_language_model:
            # A decoder-only LM returns the image tokens and the prompt before the new tokens.
            generated = generated[:, inputs["input_ids"].shape[1] :]
        texts = self.processor.batch_decode(generated, skip_special_tokens=True)
        return [text.strip() for text in texts]


def load_pretrained_instructblip(
    settings: DescribeSettings, dtype: object, models_dir: str | None = None
) -> tuple[object, object]:
    from huggingface_hub.errors import HFValidationError
    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

    model_id, hub = settings.model_id, load_kwargs(settings.revision, models_dir)
    try:
        processor = InstructBlipProcessor.from_pretrained(model_id, **hub)
        model = InstructBlipForConditionalGeneration.from_pretrained(model_id, dtype=dtype, **hub)
    except (OSError, HFValidationError) as error:  # not on the hub / no hub / not a valid id
        raise BackendUnavailable(
            f"cannot load InstructBLIP {where(model_id, settings.revision, models_dir)}: {error}. "
            "Offline, use describe.backend: measure"
        ) from error
    return processor, model


def build_tiny_instructblip(seed: int = 0) -> tuple[object, object]:
    """A tiny random InstructBLIP (vision 30 px / patch 2, Q-Former and OPT of width 32/16, 2 layers,
    4 heads; Q-Former vocab 99, OPT vocab = the tokenizer's 75) with a character tokenizer built in
    memory, so no file is downloaded."""
    import torch
    from transformers import (
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
        PreTrainedTokenizerFast,
    )
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    def char_tokenizer() -> PreTrainedTokenizerFast:
        return PreTrainedTokenizerFast(
            tokenizer_object=build_char_tokenizer(TINY_SPECIAL_TOKENS, unk_token="<unk>"),
            bos_token="<s>",
            pad_token="<pad>",
            eos_token="</s>",
            unk_token="<unk>",
            padding_side="left",
        )

    processor = InstructBlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}),
        tokenizer=char_tokenizer(),
        qformer_tokenizer=char_tokenizer(),
        num_query_tokens=TINY_NUM_QUERY_TOKENS,
    )
    # The processor adds the "<image>" token; the model must use the same id, and its vocabulary
    # must be the tokenizer's so that every generated id decodes to a character.
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    vocab_size = len(processor.tokenizer)
    config = InstructBlipConfig(
        vision_config=dict(
            image_size=TINY_IMAGE_SIZE, patch_size=2, hidden_size=32, projection_dim=32,
            num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        ),
        qformer_config=dict(
            vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=512,
        ),
        text_config=dict(
            model_type="opt", vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
            ffn_dim=4, max_position_embeddings=512, word_embed_proj_dim=16,
            bos_token_id=0, pad_token_id=1, eos_token_id=2,
        ),
        num_query_tokens=TINY_NUM_QUERY_TOKENS,
        image_token_index=image_token_id,
    )
    torch.manual_seed(seed)
    return processor, InstructBlipForConditionalGeneration(config)


# ----------------------------------------------------------------------------- measuring stand-in
DOT_COLOR = (255, 60, 200)
DOT_TOLERANCE = 24  # per channel: survives mild compression, far from any board colour
MIN_DOT_PIXELS = 3
BLOB_SIGMAS = 2.0  # a blob pixel is this many standard deviations darker/brighter than the mean
MIN_BLOB_FRACTION = 0.0002  # of the measured area (13 px on a 320x200 area), smaller is noise
MIN_BLOB_PIXELS = 6
EDGE_THRESHOLD = 40.0  # grey levels per pixel of gradient magnitude


class MeasureDescriber:
    """OFFLINE STAND-IN for the VLM: describes what it measures, not what a model sees.

    For each image it writes one sentence with: mean brightness and contrast (grey std) in words and
    numbers, the share of edge pixels, the counts of dark and bright blobs (connected regions
    ``BLOB_SIGMAS`` standard deviations off the mean), and the pink dot markers (pixels within
    ``dot_tolerance`` of ``dot_color``): how many and where, as "upper left" ... "lower right" with
    their centre in percent of the image. ``settings.ignore_region`` (fractions x0, y0, x1, y1), e.g.
    the printed text band, is left out of every measurement. Deterministic; never sees the label.
    """

    def __init__(
        self,
        settings: DescribeSettings,
        dot_color: tuple[int, int, int] = DOT_COLOR,
        dot_tolerance: int = DOT_TOLERANCE,
    ) -> None:
        self.settings = settings
        self.dot_color = np.asarray(dot_color, dtype=np.int16)
        self.dot_tolerance = dot_tolerance

    def describe_batch(self, images: list[Image.Image]) -> list[str]:
        return [self.describe(image) for image in images]

    def describe(self, image: Image.Image) -> str:
        rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
        measured = measured_area_mask(rgb.shape[:2], self.settings.ignore_region)
        dots = find_dots(rgb, self.dot_color, self.dot_tolerance, measured)
        grey = grey_levels(rgb)
        surface = measured & ~dot_pixels(rgb, self.dot_color, self.dot_tolerance)
        if not surface.any():
            return "Nothing to measure: the image has no pixels outside the ignored region and the dots."
        values = grey[surface]
        brightness, contrast = float(values.mean()), float(values.std())
        edges = edge_fraction(grey, surface)
        dark = count_blobs(grey < brightness - BLOB_SIGMAS * contrast, surface)
        bright = count_blobs(grey > brightness + BLOB_SIGMAS * contrast, surface)
        return (
            f"A {brightness_word(brightness)} image (mean brightness {brightness:.0f}/255) with "
            f"{contrast_word(contrast)} contrast (std {contrast:.0f}); {edges * 100:.1f}% edge pixels "
            f"({edge_word(edges)}); {plural(dark, 'dark blob')} and {plural(bright, 'bright blob')}; "
            f"{describe_dots(dots, rgb.shape[1], rgb.shape[0])}."
        )


def measured_area_mask(shape: tuple[int, int], ignore_region: tuple[float, float, float, float] | None) -> np.ndarray:
    height, width = shape
    mask = np.ones((height, width), dtype=bool)
    if ignore_region is not None:
        x0, y0, x1, y1 = ignore_region
        mask[round(y0 * height) : round(y1 * height), round(x0 * width) : round(x1 * width)] = False
    return mask


def grey_levels(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma, as PIL's "L" conversion, in float32."""
    return (rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114).astype(np.float32)


def dot_pixels(rgb: np.ndarray, dot_color: np.ndarray, tolerance: int) -> np.ndarray:
    return (np.abs(rgb - dot_color) <= tolerance).all(axis=-1)


def find_dots(
    rgb: np.ndarray, dot_color: np.ndarray, tolerance: int, measured: np.ndarray
) -> list[tuple[float, float]]:
    """Centres (x, y) in pixels of the pink dot markers, top to bottom then left to right."""
    from scipy import ndimage

    mask = dot_pixels(rgb, dot_color, tolerance) & measured
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    if count == 0:
        return []
    index = np.arange(1, count + 1)
    sizes = ndimage.sum_labels(mask, labels, index)
    centres = ndimage.center_of_mass(mask, labels, index)
    dots = [(float(x), float(y)) for (y, x), size in zip(centres, sizes, strict=True) if size >= MIN_DOT_PIXELS]
    return sorted(dots, key=lambda xy: (round(xy[1]), round(xy[0])))


def edge_fraction(grey: np.ndarray, surface: np.ndarray) -> float:
    dy, dx = np.gradient(grey)
    return float((np.hypot(dx, dy)[surface] > EDGE_THRESHOLD).mean())


def count_blobs(candidates: np.ndarray, surface: np.ndarray) -> int:
    from scipy import ndimage

    mask = candidates & surface
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    if count == 0:
        return 0
    sizes = ndimage.sum_labels(mask, labels, np.arange(1, count + 1))
    min_size = max(MIN_BLOB_PIXELS, MIN_BLOB_FRACTION * surface.sum())
    return int((sizes >= min_size).sum())


def position_word(x: float, y: float, width: int, height: int) -> str:
    """Thirds of the image: upper/middle/lower and left/center/right; the middle cell is "center"."""
    row = ("upper", "middle", "lower")[min(2, int(3 * y / height))]
    column = ("left", "center", "right")[min(2, int(3 * x / width))]
    if row == "middle" and column == "center":
        return "center"
    if row == "middle":
        return f"middle {column}"
    return f"{row} {column}"


def describe_dots(dots: list[tuple[float, float]], width: int, height: int) -> str:
    if not dots:
        return "no pink dot markers"
    places = ", ".join(
        f"{position_word(x, y, width, height)} (x {100 * x / width:.0f}%, y {100 * y / height:.0f}%)"
        for x, y in dots
    )
    return f"{plural(len(dots), 'pink dot marker')} at {places}"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def brightness_word(mean: float) -> str:
    return "dark" if mean < 85 else "medium-bright" if mean < 170 else "bright"


def contrast_word(std: float) -> str:
    return "low" if std < 20 else "moderate" if std < 50 else "high"


def edge_word(fraction: float) -> str:
    return "smooth" if fraction < 0.02 else "some edges" if fraction < 0.08 else "busy"
