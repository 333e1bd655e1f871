"""OCR backends and field parsing: real tesseract on rendered text, fake binaries for failures."""

from __future__ import annotations

import io
import os
import stat
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ase_ray.errors import AseRayError
from ase_ray.features.base import BackendUnavailable, OcrResult, StageItemError
from ase_ray.features.backends import build_ocr
from ase_ray.features.ocr import (
    OcrImageError,
    RapidOcr,
    TesseractOcr,
    crop_text_region,
    join_boxes_into_lines,
    parse_fields,
)
from ase_ray.features.settings import OcrSettings

LINES = ("LOT A7 ID 0123", "LEN 12.4 AREA 0.53 DIFF 41")
EXPECTED = {"LOT": "A7", "ID": 123.0, "LEN": 12.4, "AREA": 0.53, "DIFF": 41.0}
BAND_FRACTION = 0.3  # of the 160 px test image: the 49 px text band


def render_band(lines: tuple[str, ...] = LINES, size: tuple[int, int] = (320, 160)) -> Image.Image:
    """A board-green image with a dark top band and light printed lines, like the AOI images."""
    image = Image.new("RGB", size, (70, 110, 80))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=16)
    draw.rectangle((0, 0, size[0] - 1, 48), fill=(18, 22, 20))
    for i, line in enumerate(lines):
        draw.text((8, 4 + 22 * i), line, font=font, fill=(232, 232, 220))
    return image


def fake_tesseract(folder: Path, body: str) -> str:
    """An executable that answers ``--list-langs`` like tesseract and runs ``body`` otherwise."""
    script = folder / "tesseract"
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "--list-langs" ]; then printf "List of available languages (1):\\neng\\n"; exit 0; fi\n'
        f"{body}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


@pytest.fixture(scope="module")
def tesseract() -> TesseractOcr:
    return TesseractOcr(OcrSettings(text_region=(0.0, 0.0, 1.0, BAND_FRACTION)))


# ---------------------------------------------------------------------------------- tesseract
def test_tesseract_reads_rendered_fields_as_numbers(tesseract: TesseractOcr) -> None:
    result = tesseract.read(render_band())
    assert isinstance(result, OcrResult)
    assert result.text.splitlines() == list(LINES)
    assert result.fields == EXPECTED
    assert all(isinstance(result.fields[key], float) for key in ("ID", "LEN", "AREA", "DIFF"))
    assert isinstance(result.fields["LOT"], str)


def test_tesseract_whole_image_without_text_region() -> None:
    result = TesseractOcr(OcrSettings()).read(render_band())
    assert result.fields == EXPECTED


def test_read_batch_keeps_order_and_accepts_mixed_sizes(tesseract: TesseractOcr) -> None:
    other = ("LOT C3 ID 0042", "LEN 7.5 AREA 1.20 DIFF 9")
    results = tesseract.read_batch([render_band(), render_band(other, size=(400, 200))])
    assert [r.fields["LOT"] for r in results] == ["A7", "C3"]
    assert results[1].fields == {"LOT": "C3", "ID": 42.0, "LEN": 7.5, "AREA": 1.2, "DIFF": 9.0}
    assert tesseract.read_batch([]) == []


def test_missing_binary_fails_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    import pytesseract

    monkeypatch.setattr(pytesseract.pytesseract, "tesseract_cmd", "/nonexistent/bin/tesseract")
    with pytest.raises(BackendUnavailable, match="tesseract binary .* not found") as caught:
        TesseractOcr(OcrSettings(engine="binary"))
    assert isinstance(caught.value, AseRayError)


def test_binary_missing_from_path_fails_at_construction(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BackendUnavailable, match="apt-get install tesseract-ocr"):
        build_ocr(OcrSettings(backend="tesseract", engine="binary"))


@pytest.mark.parametrize("engine", ["library", "binary"])
def test_missing_language_fails_at_construction(engine: str) -> None:
    with pytest.raises(BackendUnavailable, match="no language data"):
        TesseractOcr(OcrSettings(lang="xxx", engine=engine))


def test_timeout_raises_per_image_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import pytesseract

    monkeypatch.setattr(pytesseract.pytesseract, "tesseract_cmd", fake_tesseract(tmp_path, "exec sleep 30"))
    ocr = TesseractOcr(OcrSettings(timeout_s=0.3, engine="binary"))
    with pytest.raises(OcrImageError, match="timed out after 0.3 s") as caught:
        ocr.read_batch([render_band()])
    assert isinstance(caught.value, StageItemError)
    assert caught.value.index == 0


def test_tesseract_error_raises_per_image_error_with_index(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import pytesseract

    # Fails on the second image only: the first call leaves a marker file behind.
    marker = tmp_path / "called"
    body = (
        f'if [ -e "{marker}" ]; then echo "Error in pixReadStream" >&2; exit 1; fi\n'
        f'touch "{marker}"; printf "LEN 1" > "$2.txt"'
    )
    monkeypatch.setattr(pytesseract.pytesseract, "tesseract_cmd", fake_tesseract(tmp_path, body))
    ocr = TesseractOcr(OcrSettings(engine="binary"))
    with pytest.raises(OcrImageError, match="pixReadStream") as caught:
        ocr.read_batch([render_band(), render_band()])
    assert caught.value.index == 1


# ------------------------------------------------------------------- tesseract's library engine
def test_library_and_binary_read_the_same_text() -> None:
    settings = OcrSettings(text_region=(0.0, 0.0, 1.0, BAND_FRACTION))
    library, binary = TesseractOcr(settings), TesseractOcr(settings.model_copy(update={"engine": "binary"}))
    images = [render_band(), render_band(("LOT C3 ID 42", "LEN 7.5 AREA 1.2 DIFF 9")),
              render_band(("SN 0815 X", "W 3.25 H 0.5")), Image.new("RGB", (320, 160), (70, 110, 80))]
    read = [r.text for r in library.read_batch(images)]
    assert read == [r.text for r in binary.read_batch(images)]
    assert "LEN 7.5" in read[1]


def test_library_timeout_fails_the_image_and_the_next_read_works() -> None:
    ocr = TesseractOcr(OcrSettings(timeout_s=0.001, upscale=8.0))  # no band is read in a millisecond
    first = ocr._library._idle.get()
    ocr._library._idle.put(first)
    with pytest.raises(OcrImageError, match="timed out after 0.001 s") as caught:
        ocr.read_batch([render_band(), render_band()])
    assert caught.value.index == 0
    assert not first.alive  # the helper that hung was stopped
    ocr.settings = ocr.settings.model_copy(update={"timeout_s": 30.0})
    assert ocr.read(render_band()).fields["LEN"] == 12.4


def test_library_helper_killed_between_reads_is_replaced(tesseract: TesseractOcr) -> None:
    helper = tesseract._library._idle.get()
    tesseract._library._idle.put(helper)
    helper.process.kill()
    helper.process.wait()
    assert tesseract.read(render_band()).fields == EXPECTED  # a new helper reads it
    assert not any(h is helper for h in tesseract._library._all)


def test_library_helpers_hold_openmp_to_one_thread(tesseract: TesseractOcr) -> None:
    tesseract.read(render_band())
    helper = tesseract._library._idle.get()
    tesseract._library._idle.put(helper)
    environ = Path(f"/proc/{helper.process.pid}/environ").read_bytes().split(b"\0")
    assert b"OMP_THREAD_LIMIT=1" in environ


def test_corrupt_image_raises_per_image_error(tesseract: TesseractOcr) -> None:
    buffer = io.BytesIO()
    render_band().save(buffer, format="PNG")
    truncated = Image.open(io.BytesIO(buffer.getvalue()[:300]))  # decodes lazily, fails on use
    with pytest.raises(OcrImageError, match="cannot be prepared"):
        tesseract.read(truncated)


def test_empty_text_region_raises_per_image_error(tesseract: TesseractOcr) -> None:
    ocr = TesseractOcr(OcrSettings(text_region=(0.5, 0.5, 0.5, 0.9)))
    with pytest.raises(OcrImageError, match="empty"):
        ocr.read(render_band())


def test_crop_text_region_uses_fractions() -> None:
    image = Image.new("RGB", (200, 100))
    assert crop_text_region(image, (0.0, 0.0, 1.0, 0.25)).size == (200, 25)
    assert crop_text_region(image, None) is image


# ----------------------------------------------------------------------------------- rapidocr
def test_rapidocr_reads_rendered_fields() -> None:
    pytest.importorskip("rapidocr")
    ocr = build_ocr(OcrSettings(backend="rapidocr", text_region=(0.0, 0.0, 1.0, BAND_FRACTION)))
    assert isinstance(ocr, RapidOcr)
    assert ocr.read_batch([render_band()])[0].fields == EXPECTED


def test_rapidocr_missing_names_the_pip_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "rapidocr", None)  # makes the import fail
    with pytest.raises(BackendUnavailable, match="pip install rapidocr onnxruntime"):
        RapidOcr(OcrSettings(backend="rapidocr"))


def test_join_boxes_into_lines_merges_split_boxes() -> None:
    def box(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
        return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]

    boxes = [box(60, 25, 200, 40), box(3, 4, 120, 21), box(3, 24, 50, 41)]
    texts = ("12.4 AREA 0.53", "LOT A7 ID 0123", "LEN")
    assert join_boxes_into_lines(boxes, texts) == "LOT A7 ID 0123\nLEN 12.4 AREA 0.53"
    assert join_boxes_into_lines(None, None) == ""


# ------------------------------------------------------------------------------- parse_fields
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("LOT A7 ID 0123\nLEN 12.4 AREA 0.53 DIFF 41", EXPECTED),
        ("LEN: 12.4  AREA=0.53   DIFF : 41", {"LEN": 12.4, "AREA": 0.53, "DIFF": 41.0}),
        ("len 12.4 area 0.53", {"LEN": 12.4, "AREA": 0.53}),
        ("LEN 12.4AREA0.53 DIFF 41", {"LEN": 12.4, "AREA": 0.53, "DIFF": 41.0}),  # glued tokens
        ("LOT A7 1D 0123", {"LOT": "A7", "ID": 123.0}),  # I read as 1
        ("AREA 0,53", {"AREA": 0.53}),  # decimal comma
        ("DIFF -3 GAIN +1.5 X .5", {"DIFF": -3.0, "GAIN": 1.5, "X": 0.5}),
        ("STATUS OK LEN 2", {"STATUS": "OK", "LEN": 2.0}),
        ("x AREA 0.53", {"AREA": 0.53}),  # a stray word before a key is dropped
        ("LEN 1.0\nLEN 2.0", {"LEN": 1.0}),  # the first occurrence wins
        ("| LEN 3 | ~ 41 ", {"LEN": 3.0}),
        ("", {}),
        ("12.4 0.53", {}),
    ],
)
def test_parse_fields(text: str, expected: dict) -> None:
    assert parse_fields(text) == expected


def test_parallel_batch_reads_the_same_in_order_and_names_the_failing_image(tesseract):
    parallel = TesseractOcr(tesseract.settings.model_copy(update={"parallel": 3}))
    images = [render_band(("LOT A7 ID 0123", f"LEN {i}.5 AREA 0.53 DIFF 41")) for i in range(4)]
    assert [r.fields["LEN"] for r in parallel.read_batch(images)] == [0.5, 1.5, 2.5, 3.5]
    broken = images[:2] + [Image.new("RGB", (0, 0))] + images[2:]
    with pytest.raises(OcrImageError) as info:
        parallel.read_batch(broken)
    assert info.value.index == 2
    assert os.environ.get("OMP_THREAD_LIMIT") == "1"  # restored as it was (conftest sets it)
