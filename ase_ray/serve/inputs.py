"""Upload validation for the Serve endpoint: every bad request becomes a :class:`RequestError` (4xx).

Order of checks (cheapest and most dangerous first): API key; body present; declared size and the
streamed size against the limit (the body is never read past it); ``multipart/form-data`` content
type; multipart parse (file and field counts bounded); per file: declared content type, empty file,
pixel count from the header (before any pixel is decoded: a decompression bomb is refused here),
zero size, format, then a full decode (a truncated file fails here) and conversion to RGB.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import struct
import warnings
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from PIL import Image, UnidentifiedImageError

from ase_ray.errors import RequestError
from ase_ray.features.inmemory import DecodedImage

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FORM_OVERHEAD_BYTES = 1024 * 1024  # multipart headers and text fields on top of the images
FILE_FIELDS = ("file", "files", "image", "images")
METADATA_FIELD = "metadata"
MAX_FIELD_BYTES = 64 * 1024
ACCEPTED_PART_TYPES = ("application/octet-stream",)


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int
    max_pixels: int
    max_batch_images: int
    allowed_formats: tuple[str, ...]

    @classmethod
    def from_config(cls, serve) -> "Limits":
        return cls(serve.max_upload_bytes, serve.max_pixels, serve.max_batch_images, tuple(serve.allowed_formats))

    def body_limit(self, images: int) -> int:
        return images * self.max_upload_bytes + FORM_OVERHEAD_BYTES


@dataclass
class UploadedFile:
    filename: str
    content_type: str | None
    data: bytes


@dataclass
class Upload:
    files: list[UploadedFile] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)


@dataclass
class ValidImage:
    decoded: DecodedImage
    filename: str
    format: str
    width: int
    height: int


# ------------------------------------------------------------------------------------------- auth
def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def env_key_digest(env_name: str | None) -> str | None:
    """sha256 of the API key in ``env_name`` (None when unset or empty); the key itself is never kept."""
    key = os.environ.get(env_name) if env_name else None
    return key_digest(key) if key else None


def check_api_key(expected_digest: str | None, headers) -> None:
    """Nothing to check when no key is configured; otherwise X-API-Key or ``Authorization: Bearer``."""
    if not expected_digest:
        return
    given = headers.get("x-api-key")
    auth = headers.get("authorization", "")
    if not given and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if not given:
        raise RequestError(401, "missing_api_key", "this endpoint needs an API key (X-API-Key header)")
    if not hmac.compare_digest(key_digest(given), expected_digest):
        raise RequestError(401, "invalid_api_key", "the API key is not valid")


# ------------------------------------------------------------------------------------------- body
async def read_body(headers, stream: AsyncIterator[bytes], limit: int) -> bytes:
    """The request body, refusing (413) as soon as it passes ``limit``; 400 when empty."""
    declared = headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise RequestError(400, "bad_content_length", f"Content-Length {declared!r} is not a number") from None
        if size > limit:
            raise RequestError(413, "payload_too_large", f"the request body is {size} bytes; the limit is {limit}")
    chunks, total = [], 0
    async for chunk in stream:
        total += len(chunk)
        if total > limit:
            raise RequestError(413, "payload_too_large", f"the request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        raise RequestError(400, "empty_body", "the request has no body: send multipart/form-data with a 'file' part")
    return body


async def parse_upload(headers, body: bytes, max_files: int) -> Upload:
    """Parse ``multipart/form-data``: files (under ``file``/``files``/``image``/``images``) and text fields."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    content_type = headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "multipart/form-data":
        shown = content_type.split(";")[0].strip() or "none"
        raise RequestError(415, "unsupported_media_type",
                           f"send the image as multipart/form-data (got content type {shown})")

    boundary = _boundary(content_type)
    if not boundary or f"--{boundary}--".encode() not in body:
        raise RequestError(400, "malformed_multipart",
                           "the multipart body has no boundary or is not terminated by it (truncated upload?)")

    async def one_chunk() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(headers, one_chunk(), max_files=max_files, max_fields=32, max_part_size=MAX_FIELD_BYTES)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        status, code = (413, "too_many_images") if "too many files" in str(exc).lower() else (400, "malformed_multipart")
        raise RequestError(status, code, f"the multipart body cannot be read: {exc}") from None
    except Exception as exc:  # python-multipart raises its own types on broken framing
        raise RequestError(400, "malformed_multipart", f"the multipart body cannot be read: {type(exc).__name__}") from None
    upload = Upload()
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name not in FILE_FIELDS:
                    raise RequestError(400, "unexpected_field", f"file field {name!r}: use one of {list(FILE_FIELDS)}")
                upload.files.append(UploadedFile(value.filename or "", value.content_type, await value.read()))
            else:
                upload.fields[name] = value
    finally:
        await form.close()
    return upload


def _boundary(content_type: str) -> str | None:
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "boundary":
            return value.strip().strip('"') or None
    return None


def parse_metadata(upload: Upload, images: int = 1) -> list[dict[str, Any]]:
    """The optional ``metadata`` field, one record per image: a JSON object (the same record for every
    image), or for a batch a JSON list of one object per image. The records the model reads
    (``data.metadata_columns``) are taken from it; every record is echoed back with its prediction."""
    text = upload.fields.get(METADATA_FIELD)
    if text is None or not text.strip():
        return [{} for _ in range(images)]
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(400, "malformed_json", f"the metadata field is not valid JSON: {exc.msg} at {exc.pos}") from None
    if isinstance(value, dict):
        return [dict(value) for _ in range(images)]
    if isinstance(value, list) and images > 1:
        if len(value) != images or not all(isinstance(v, dict) for v in value):
            raise RequestError(400, "malformed_json", f"a metadata list must hold one JSON object per image "
                               f"({images}), got {len(value)} item(s)")
        return [dict(v) for v in value]
    kind = "a JSON object or a list of one object per image" if images > 1 else "a JSON object"
    raise RequestError(400, "malformed_json", f"the metadata field must be {kind}, not {type(value).__name__}")


def require_files(upload: Upload, limits: Limits, batch: bool) -> list[UploadedFile]:
    if not upload.files:
        raise RequestError(400, "missing_file", "no image: send it as a multipart file part named 'file'")
    if not batch and len(upload.files) > 1:
        raise RequestError(400, "too_many_images", f"{len(upload.files)} images sent to /predict: use /predict/batch")
    if len(upload.files) > limits.max_batch_images:
        raise RequestError(413, "too_many_images",
                           f"{len(upload.files)} images in one request; the limit is {limits.max_batch_images}")
    return upload.files


async def read_request(headers, stream: AsyncIterator[bytes], limits: Limits, api_key_sha256: str | None,
                       batch: bool) -> tuple[list[ValidImage], list[dict[str, Any]]]:
    """Every check of a ``/predict`` (``batch=False``) or ``/predict/batch`` request, in order: the
    images and their metadata records, or the first :class:`RequestError`. The endpoint runs this;
    tests and the bad-input catalogue run it without Serve."""
    check_api_key(api_key_sha256, headers)
    body = await read_body(headers, stream, limits.body_limit(limits.max_batch_images if batch else 1))
    upload = await parse_upload(headers, body, limits.max_batch_images)
    files = require_files(upload, limits, batch)
    metadata = parse_metadata(upload, len(files))
    return [validate_image(f, limits, i) for i, f in enumerate(files)], metadata


# ------------------------------------------------------------------------------------------ image
def png_header_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG's IHDR (the first 24 bytes), or None for other formats."""
    if len(data) >= 24 and data.startswith(PNG_SIGNATURE) and data[12:16] == b"IHDR":
        return struct.unpack(">II", data[16:24])
    return None


def check_size(width: int, height: int, limits: Limits, where: str) -> None:
    if width <= 0 or height <= 0:
        raise RequestError(400, "zero_size_image", f"{where} has zero size ({width}x{height})")
    if width * height > limits.max_pixels:
        raise RequestError(413, "too_many_pixels", f"{where} is {width}x{height} = {width * height} pixels; "
                           f"the limit is {limits.max_pixels} (a decompression bomb is refused before decoding)")


def validate_image(upload: UploadedFile, limits: Limits, index: int = 0) -> ValidImage:
    """Checks, then a full decode; every failure is a 4xx :class:`RequestError` naming the image."""
    where = f"image {index} ({upload.filename or 'unnamed'})"
    declared = (upload.content_type or "").split(";")[0].strip().lower()
    if declared and not (declared.startswith("image/") or declared in ACCEPTED_PART_TYPES):
        raise RequestError(415, "unsupported_media_type", f"{where} is declared as {declared}, not an image type")
    data = upload.data
    if not data:
        raise RequestError(400, "empty_file", f"{where} is empty (0 bytes)")
    if len(data) > limits.max_upload_bytes:
        raise RequestError(413, "payload_too_large",
                           f"{where} is {len(data)} bytes; the limit is {limits.max_upload_bytes}")
    header = png_header_size(data)
    if header is not None:
        check_size(*header, limits, where)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))  # reads the header only
        except Image.DecompressionBombError:
            raise RequestError(413, "too_many_pixels", f"{where} has too many pixels (decompression bomb)") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, struct.error):
            raise RequestError(400, "not_an_image", f"{where} is not a readable image") from None
        with img:
            check_size(img.width, img.height, limits, where)
            fmt = (img.format or "").upper()
            if fmt not in limits.allowed_formats:
                raise RequestError(415, "unsupported_image_format",
                                   f"{where} is {fmt or 'an unknown format'}; accepted: {list(limits.allowed_formats)}")
            try:
                img.load()
                rgb = img.convert("RGB")
            except Image.DecompressionBombError:
                raise RequestError(413, "too_many_pixels", f"{where} has too many pixels (decompression bomb)") from None
            except Exception as exc:  # truncated or corrupt data; PIL raises assorted types
                raise RequestError(400, "corrupt_image", f"{where} cannot be decoded: {_short(exc)}") from None
    decoded = DecodedImage(rgb, hashlib.sha256(data).hexdigest())
    return ValidImage(decoded, upload.filename, fmt, rgb.width, rgb.height)


def _short(exc: Exception) -> str:
    text = str(exc).split("\n")[0]
    return text[:200] or type(exc).__name__
