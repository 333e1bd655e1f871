"""OCR of the measurement text printed on AOI images, and parsing of its ``KEY value`` pairs.

Backends (chosen by :func:`ase_ray.features.backends.build_ocr` from ``OcrSettings.backend``):

- :class:`TesseractOcr`: the Debian ``tesseract`` binary through pytesseract (default);
- :class:`RapidOcr`: the PyPI ``rapidocr`` package on onnxruntime (PP-OCR models, as the paper's
  CnOCR), models shipped inside the wheel.

Both read one image at a time (``read``) or a list (``read_batch``) and return :class:`OcrResult`.
A failure on one image (tesseract timeout or error, an image that cannot be decoded) raises
:class:`OcrImageError`; callers that want one error row per bad image call ``read`` per image and
catch it. A backend that cannot run at all raises ``BackendUnavailable`` from its constructor.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from ase_ray.features.base import BackendUnavailable, OcrResult, StageItemError

if TYPE_CHECKING:
    from ase_ray.features.settings import OcrSettings

RAPIDOCR_INSTALL = "pip install rapidocr onnxruntime"


class OcrImageError(StageItemError):
    """OCR failed on one image (timeout, tesseract error, undecodable image); the batch can go on."""


# ------------------------------------------------------------------------------------ parsing
# A key: letters/underscores, starting at a word boundary. OCR often reads a leading I/O/S as
# 1/0/5 ("1D" for "ID"), so a key may start with one of those digits when letters follow.
_KEY = r"(?<![A-Za-z])(?P<key>(?:[A-Za-z]|[015](?=[A-Za-z]))[A-Za-z_]*)"
_SEP = r"[ \t]*[:=]?[ \t]*"
_NUMBER = r"[-+]?(?:\d+(?:[.,]\d+)?|[.,]\d+)"
# A word value (e.g. a lot "A7") must not be followed by a lone number: then the word is the next
# key and the key before it was OCR noise ("x AREA 0.53").
_WORD = r"[A-Za-z][A-Za-z0-9_.\-]*+(?![ \t]*[:=]?[ \t]*[-+]?\d+(?:[.,]\d+)?(?![A-Za-z]))"
_PAIR = re.compile(rf"{_KEY}{_SEP}(?P<value>{_NUMBER}|{_WORD})")
_FULL_NUMBER = re.compile(rf"{_NUMBER}")
_KEY_DIGIT_FIXES = str.maketrans({"0": "O", "1": "I", "5": "S"})


def parse_fields(text: str) -> dict[str, float | str]:
    """``KEY value`` pairs of OCR text, line by line.

    - keys are upper-cased (``len`` -> ``LEN``); a leading 0/1/5 misread for O/I/S is repaired;
    - separators may be spaces, ``:`` or ``=``; extra spaces are ignored; a number glued to the
      next key (``12.4AREA``) still splits;
    - numeric values become ``float`` (integers too: ``0123`` -> ``123.0``; a decimal comma is read
      as a point), anything else stays ``str`` (``A7``);
    - the first occurrence of a key wins; tokens that pair with nothing are dropped.
    """
    fields: dict[str, float | str] = {}
    for line in text.splitlines():
        for match in _PAIR.finditer(line):
            key = normalise_key(match.group("key"))
            fields.setdefault(key, convert_value(match.group("value")))
    return fields


def normalise_key(raw: str) -> str:
    return (raw[0].translate(_KEY_DIGIT_FIXES) + raw[1:]).upper()


def convert_value(raw: str) -> float | str:
    if _FULL_NUMBER.fullmatch(raw):
        return float(raw.replace(",", "."))
    return raw.rstrip(".-")


# ------------------------------------------------------------------------------ preprocessing
TESSERACT_BORDER_PX = 16


def crop_text_region(image: Image.Image, region: tuple[float, float, float, float] | None) -> Image.Image:
    """Crop ``region`` (x0, y0, x1, y1 as fractions of width/height); the whole image when None."""
    if region is None:
        return image
    x0, y0, x1, y1 = region
    width, height = image.size
    box = (round(x0 * width), round(y0 * height), round(x1 * width), round(y1 * height))
    if box[2] <= box[0] or box[3] <= box[1]:
        raise OcrImageError(f"text_region {region} is empty on a {width}x{height} image")
    return image.crop(box)


def prepare_for_tesseract(image: Image.Image, settings: OcrSettings) -> Image.Image:
    """Grey, dark text on light, upscaled (bicubic) and padded: the input tesseract reads best.

    On the synthetic AOI band (Pillow's default font at 16 px) bicubic x2 read 85-100% of images
    with every field exact; binarising, sharper or larger resampling did not do better.
    """
    grey = crop_text_region(image, settings.text_region).convert("L")
    if np.median(np.asarray(grey)) < 128:  # light text on a dark band
        grey = ImageOps.invert(grey)
    if settings.upscale != 1.0:
        size = (round(grey.width * settings.upscale), round(grey.height * settings.upscale))
        grey = grey.resize(size, Image.Resampling.BICUBIC)
    # A white margin keeps glyphs that touch the crop edge from being dropped by tesseract.
    return ImageOps.expand(grey, border=TESSERACT_BORDER_PX, fill=255)


# ----------------------------------------------------------------------------------- tesseract
@contextmanager
def single_openmp_thread() -> Iterator[None]:
    """Set OMP_THREAD_LIMIT=1 for the tesseract child process (several OpenMP threads per call
    fight each other and made a page 3-4x slower); pytesseract passes os.environ to the child."""
    previous = os.environ.get("OMP_THREAD_LIMIT")
    os.environ["OMP_THREAD_LIMIT"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("OMP_THREAD_LIMIT", None)
        else:
            os.environ["OMP_THREAD_LIMIT"] = previous


class TesseractOcr:
    """OCR through tesseract: its library kept loaded in a helper process (``settings.engine: library``,
    :mod:`ase_ray.features.tesseract_library`) or the tesseract binary started per image through
    pytesseract (``binary``). Both run the same engine on the same prepared image and read the same text.

    ``settings.timeout_s`` bounds each image; ``settings.psm`` and ``settings.lang`` go to
    tesseract; ``settings.text_region`` crops and ``settings.upscale`` enlarges before reading.
    The binary is ``pytesseract.pytesseract.tesseract_cmd`` (``tesseract`` on PATH by default).
    """

    def __init__(self, settings: OcrSettings) -> None:
        self.settings = settings
        self._library = None
        if settings.engine == "library":
            from ase_ray.features.tesseract_library import TesseractLibrary, TesseractLibraryError

            try:
                self._library = TesseractLibrary(settings.lang, settings.psm)
            except TesseractLibraryError as error:
                raise BackendUnavailable(str(error)) from None
            return
        import pytesseract

        self._pytesseract = pytesseract
        self._check_binary()
        self._check_languages()

    def _check_binary(self) -> None:
        command = self._pytesseract.pytesseract.tesseract_cmd
        if shutil.which(command) is None:
            raise BackendUnavailable(
                f"tesseract binary {command!r} not found: install it (Debian/Ubuntu: "
                "apt-get install tesseract-ocr) or choose ocr.backend: rapidocr"
            )

    def _check_languages(self) -> None:
        try:
            with single_openmp_thread():
                available = set(self._pytesseract.get_languages(config=""))
        except (OSError, RuntimeError) as error:
            raise BackendUnavailable(f"tesseract does not run: {error}") from error
        missing = [lang for lang in self.settings.lang.split("+") if lang not in available]
        if missing:
            raise BackendUnavailable(
                f"tesseract has no language data for {missing} (installed: {sorted(available)}); "
                "install e.g. tesseract-ocr-<lang>"
            )

    def read(self, image: Image.Image) -> OcrResult:
        """OCR one image. Raises :class:`OcrImageError` on timeout, tesseract error or a bad image."""
        try:
            prepared = prepare_for_tesseract(image, self.settings)
        except OcrImageError:
            raise
        except (OSError, ValueError, TypeError) as error:  # undecodable or unsupported image
            raise OcrImageError(f"image cannot be prepared for OCR: {error}") from error
        text = self._read_library(prepared) if self._library is not None else self._read_binary(prepared)
        text = text.strip()
        return OcrResult(text=text, fields=parse_fields(text))

    def _read_library(self, prepared: Image.Image) -> str:
        from ase_ray.features.tesseract_library import TesseractLibraryError, TesseractReadError

        try:
            return self._library.read(prepared.tobytes(), prepared.width, prepared.height, self.settings.timeout_s)
        except (TesseractReadError, TesseractLibraryError) as error:  # the latter: a replacement did not start
            raise OcrImageError(f"tesseract failed: {error}") from error

    def _read_binary(self, prepared: Image.Image) -> str:
        try:
            with single_openmp_thread():
                return self._pytesseract.image_to_string(
                    prepared,
                    lang=self.settings.lang,
                    config=f"--psm {self.settings.psm}",
                    timeout=self.settings.timeout_s,
                )
        except self._pytesseract.TesseractNotFoundError as error:
            raise BackendUnavailable(f"tesseract binary disappeared: {error}") from error
        except RuntimeError as error:  # TesseractError and pytesseract's timeout are RuntimeErrors
            raise OcrImageError(f"tesseract failed: {describe_tesseract_error(error, self.settings)}") from error
        except (OSError, ValueError, TypeError) as error:  # an image tesseract cannot take
            raise OcrImageError(f"image cannot be prepared for OCR: {error}") from error

    def read_batch(self, images: list[Image.Image]) -> list[OcrResult]:
        """OCR each image in order (``settings.parallel`` tesseract processes at once); the first failure
        raises :class:`OcrImageError` with ``index``."""
        if self.settings.parallel > 1 and len(images) > 1:
            with single_openmp_thread():  # set once around the threads, so no thread restores it early
                return read_parallel(self, images, self.settings.parallel)
        return read_each(self, images)


def describe_tesseract_error(error: RuntimeError, settings: OcrSettings) -> str:
    message = str(error)
    if "timeout" in message.lower():
        return f"timed out after {settings.timeout_s} s"
    return message


def read_each(backend: TesseractOcr | RapidOcr, images: list[Image.Image]) -> list[OcrResult]:
    results = []
    for index, image in enumerate(images):
        try:
            results.append(backend.read(image))
        except OcrImageError as error:
            error.index = index
            raise
    return results


def read_parallel(backend: TesseractOcr, images: list[Image.Image], workers: int) -> list[OcrResult]:
    """Like :func:`read_each` with up to ``workers`` images read at once (each read runs in a tesseract
    child process, a helper of its own or the binary, so threads run them on separate cores); results and
    the first error keep the input order."""
    from concurrent.futures import ThreadPoolExecutor

    def read(index: int) -> OcrResult:
        try:
            return backend.read(images[index])
        except OcrImageError as error:
            error.index = index
            raise

    with ThreadPoolExecutor(max_workers=min(workers, len(images))) as pool:
        return list(pool.map(read, range(len(images))))


# ------------------------------------------------------------------------------------ rapidocr
# The detector's default ("limit_type: min", 736 px) upscales a small band to 736 px on its short
# side: ~2 s per image on a CPU core. Capping the long side instead reads the same text in ~0.4 s.
RAPIDOCR_PARAMS = {
    "Global.log_level": "warning",
    "Global.use_cls": False,  # printed text is never rotated 180 degrees
    "Det.limit_type": "max",
    "Det.limit_side_len": 960,
}


class RapidOcr:
    """OCR through ``rapidocr`` (PP-OCR detection + recognition on onnxruntime).

    ``settings.text_region`` crops before reading; ``upscale`` is not applied (the detector resizes
    on its own) and ``timeout_s`` is not enforced (the model runs in-process and cannot be
    interrupted). Detected boxes are joined into lines by their vertical position.
    """

    def __init__(self, settings: OcrSettings) -> None:
        self.settings = settings
        try:
            from rapidocr import RapidOCR
        except ImportError as error:
            raise BackendUnavailable(
                f"ocr.backend rapidocr needs the rapidocr package: {RAPIDOCR_INSTALL} ({error})"
            ) from error
        self._engine = RapidOCR(params=dict(RAPIDOCR_PARAMS))

    def read(self, image: Image.Image) -> OcrResult:
        """OCR one image. Raises :class:`OcrImageError` when the image cannot be read."""
        try:
            region = crop_text_region(image, self.settings.text_region).convert("RGB")
            output = self._engine(region)  # a PIL image: rapidocr converts RGB to its BGR itself
        except OcrImageError:
            raise
        except Exception as error:  # onnxruntime / OpenCV raise assorted types on bad input
            raise OcrImageError(f"rapidocr failed: {error}") from error
        text = join_boxes_into_lines(output.boxes, output.txts)
        return OcrResult(text=text, fields=parse_fields(text))

    def read_batch(self, images: list[Image.Image]) -> list[OcrResult]:
        """OCR each image in order; the first failure raises :class:`OcrImageError` with ``index``."""
        return read_each(self, images)


def join_boxes_into_lines(boxes: np.ndarray | None, texts: tuple[str, ...] | None) -> str:
    """Group detected text boxes into lines (by vertical centre), left to right within a line."""
    if boxes is None or not texts:
        return ""
    items = []
    for box, text in zip(boxes, texts, strict=True):
        box = np.asarray(box, dtype=np.float32)
        items.append((box[:, 1].mean(), box[:, 1].max() - box[:, 1].min(), box[:, 0].min(), text.strip()))
    items.sort(key=lambda item: item[0])
    lines: list[list[tuple[float, float, float, str]]] = []
    for item in items:
        # Same line when the centre lies within half a box height of the line's first box.
        if lines and abs(item[0] - lines[-1][0][0]) <= max(item[1], lines[-1][0][1]) / 2:
            lines[-1].append(item)
        else:
            lines.append([item])
    return "\n".join(" ".join(part[3] for part in sorted(line, key=lambda p: p[2])) for line in lines)
