"""Image describers: the tiny InstructBLIP runs the real generate path; the measuring stand-in."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ase_ray.features.base import BackendUnavailable
from ase_ray.features.backends import build_describer
from ase_ray.features.describe import (
    DOT_COLOR,
    InstructBlipDescriber,
    MeasureDescriber,
    find_dots,
    position_word,
)
from ase_ray.features.settings import DescribeSettings

MAX_NEW_TOKENS = 6


def board(size: tuple[int, int] = (300, 240), seed: int = 0) -> Image.Image:
    """A mid-grey surface with mild pixel noise (no blobs, no dots)."""
    rng = np.random.default_rng(seed)
    pixels = 120 + rng.normal(0, 4, (size[1], size[0], 1)).repeat(3, axis=2)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def with_dots(image: Image.Image, centres: list[tuple[int, int]], radius: int = 4) -> Image.Image:
    image = image.copy()
    draw = ImageDraw.Draw(image)
    for x, y in centres:
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=DOT_COLOR)
    return image


# ------------------------------------------------------------------------------- InstructBLIP
@pytest.fixture(scope="module")
def tiny_describer() -> InstructBlipDescriber:
    describer = build_describer(DescribeSettings(backend="tiny", max_new_tokens=MAX_NEW_TOKENS, device="cpu"))
    assert isinstance(describer, InstructBlipDescriber)
    return describer


def test_tiny_instructblip_generates_bounded_text_for_a_batch(tiny_describer: InstructBlipDescriber) -> None:
    from transformers import InstructBlipForConditionalGeneration

    assert isinstance(tiny_describer.model, InstructBlipForConditionalGeneration)
    images = [board((64, 48)), with_dots(board((90, 120), seed=1), [(30, 30)])]
    texts = tiny_describer.describe_batch(images)
    assert len(texts) == 2
    for text in texts:
        assert isinstance(text, str)
        assert 0 < len(text) <= MAX_NEW_TOKENS  # one character per token; the prompt is cut off
    assert tiny_describer.describe_batch(images) == texts  # greedy: deterministic


def test_tiny_instructblip_empty_batch(tiny_describer: InstructBlipDescriber) -> None:
    assert tiny_describer.describe_batch([]) == []


@pytest.mark.parametrize("model_id", ["no-such-org/no-such-instructblip", "/no/such/folder"])
def test_unreachable_model_id_is_a_clear_error(model_id: str) -> None:
    settings = DescribeSettings(backend="instructblip", model_id=model_id, device="cpu")
    with pytest.raises(BackendUnavailable, match="describe.backend: measure"):
        build_describer(settings)


# ------------------------------------------------------------------------- measuring stand-in
def test_measure_describer_counts_and_places_dots() -> None:
    describer = build_describer(DescribeSettings(backend="measure"))
    assert isinstance(describer, MeasureDescriber)
    image = with_dots(board(), [(40, 35), (260, 210)])
    text = describer.describe_batch([image])[0]
    assert "2 pink dot markers at upper left" in text
    assert "lower right" in text
    assert describer.describe_batch([image, image]) == [text, text]  # deterministic


def test_measure_describer_without_dots_and_single_dot() -> None:
    describer = MeasureDescriber(DescribeSettings())
    assert "no pink dot markers" in describer.describe(board())
    assert "1 pink dot marker at center (x 50%, y 50%)" in describer.describe(with_dots(board(), [(150, 120)]))


def test_measure_describer_reports_brightness_contrast_and_blobs() -> None:
    image = board()
    draw = ImageDraw.Draw(image)
    for x in (30, 120, 210):
        draw.rectangle((x, 100, x + 12, 112), fill=(10, 10, 10))
    draw.rectangle((100, 200, 115, 215), fill=(250, 250, 250))
    text = MeasureDescriber(DescribeSettings()).describe(image)
    assert "medium-bright image" in text
    assert "3 dark blobs and 1 bright blob" in text
    assert "% edge pixels" in text and "contrast (std" in text


def test_measure_describer_ignores_the_text_band() -> None:
    image = with_dots(board(), [(150, 10), (150, 180)])  # one dot inside the top band
    ImageDraw.Draw(image).rectangle((0, 0, 80, 20), fill=(10, 10, 10))
    settings = DescribeSettings(ignore_region=(0.0, 0.0, 1.0, 0.1))
    text = MeasureDescriber(settings).describe(image)
    assert "1 pink dot marker at lower center" in text
    assert "0 dark blobs" in text


def test_find_dots_returns_centres_top_to_bottom() -> None:
    rgb = np.asarray(with_dots(board(), [(200, 150), (50, 40)]), dtype=np.int16)
    dots = find_dots(rgb, np.asarray(DOT_COLOR), 24, np.ones(rgb.shape[:2], dtype=bool))
    assert [(round(x), round(y)) for x, y in dots] == [(50, 40), (200, 150)]


@pytest.mark.parametrize(
    ("x", "y", "word"),
    [
        (10, 10, "upper left"),
        (150, 10, "upper center"),
        (290, 230, "lower right"),
        (150, 120, "center"),
        (10, 120, "middle left"),
    ],
)
def test_position_word(x: float, y: float, word: str) -> None:
    assert position_word(x, y, 300, 240) == word
