"""Upload validation of the Serve endpoint, without Serve: each bad input is a RequestError (4xx)."""

from __future__ import annotations

import asyncio
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from starlette.datastructures import Headers

from ase_ray.config import load_config
from ase_ray.errors import RequestError
from ase_ray.serve import inputs
from ase_ray.registry import served_model_uri

LIMITS = inputs.Limits(max_upload_bytes=50_000, max_pixels=1_000_000, max_batch_images=3,
                       allowed_formats=("PNG", "JPEG"))


def png(width=40, height=30, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def raw_png(width: int, height: int, idat: bytes = b"") -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def upload(data: bytes, content_type: str | None = "image/png", name="a.png") -> inputs.UploadedFile:
    return inputs.UploadedFile(name, content_type, data)


def rejected(fn, *args) -> RequestError:
    with pytest.raises(RequestError) as info:
        fn(*args)
    assert 400 <= info.value.status < 500
    return info.value


def multipart(parts: list[tuple[str, str | None, bytes, str | None]], boundary="XyZ") -> tuple[Headers, bytes]:
    """parts: (field, filename or None for a text field, payload, content type)."""
    out = b""
    for field, filename, payload, ctype in parts:
        disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if ctype:
            out += f"Content-Type: {ctype}\r\n".encode()
        out += b"\r\n" + payload + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return Headers({"content-type": f"multipart/form-data; boundary={boundary}", "content-length": str(len(out))}), out


def run(coro):
    return asyncio.run(coro)


async def _stream(*chunks: bytes):
    for chunk in chunks:
        yield chunk


def test_a_good_png_is_decoded_with_its_content_address():
    valid = inputs.validate_image(upload(png()), LIMITS)
    assert (valid.width, valid.height, valid.format) == (40, 30, "PNG")
    assert valid.decoded.image.mode == "RGB" and len(valid.decoded.image_id) == 64


@pytest.mark.parametrize("data, ctype, status, code", [
    (b"", "image/png", 400, "empty_file"),
    (b"just some text", "image/png", 400, "not_an_image"),
    (png()[:200], "image/png", 400, "corrupt_image"),
    (raw_png(0, 0), "image/png", 400, "zero_size_image"),
    (raw_png(5000, 5000), "image/png", 413, "too_many_pixels"),
    (png(fmt="BMP"), None, 415, "unsupported_image_format"),
    (png(), "text/plain", 415, "unsupported_media_type"),
    (png(300, 300), "image/png", 413, "payload_too_large"),
])
def test_bad_images_are_refused_with_a_code(data, ctype, status, code):
    error = rejected(inputs.validate_image, upload(data, ctype), LIMITS)
    assert (error.status, error.code) == (status, code)


def test_pixel_limit_is_read_from_the_header_before_decoding():
    assert inputs.png_header_size(raw_png(123, 45)) == (123, 45)
    assert inputs.png_header_size(b"GIF89a....") is None
    # 400 M pixels declared, no pixel data at all: refused on the header alone
    error = rejected(inputs.validate_image, upload(raw_png(20_000, 20_000)), LIMITS)
    assert error.code == "too_many_pixels"


def test_octet_stream_and_missing_part_type_are_accepted():
    assert inputs.validate_image(upload(png(), "application/octet-stream"), LIMITS).format == "PNG"
    assert inputs.validate_image(upload(png(), None), LIMITS).format == "PNG"


def test_body_limits():
    headers = Headers({"content-length": "999999"})
    with pytest.raises(RequestError) as info:
        run(inputs.read_body(headers, _stream(b"x"), 1000))
    assert info.value.status == 413
    with pytest.raises(RequestError) as info:  # no Content-Length: counted while streaming
        run(inputs.read_body(Headers({}), _stream(b"x" * 600, b"y" * 600), 1000))
    assert info.value.code == "payload_too_large"
    with pytest.raises(RequestError) as info:
        run(inputs.read_body(Headers({"content-length": "0"}), _stream(b""), 1000))
    assert info.value.code == "empty_body"
    assert run(inputs.read_body(Headers({}), _stream(b"ab", b"c"), 1000)) == b"abc"


def test_multipart_parsing_files_fields_and_errors():
    headers, body = multipart([("file", "a.png", png(), "image/png"), ("metadata", None, b'{"lot": 3}', None)])
    parsed = run(inputs.parse_upload(headers, body, 3))
    assert [f.filename for f in parsed.files] == ["a.png"] and parsed.files[0].content_type == "image/png"
    assert inputs.parse_metadata(parsed) == [{"lot": 3}]

    error = rejected(lambda: run(inputs.parse_upload(Headers({"content-type": "application/json"}), b"{}", 3)))
    assert (error.status, error.code) == (415, "unsupported_media_type")
    headers, _ = multipart([])
    error = rejected(lambda: run(inputs.parse_upload(headers, b"--XyZ\r\nnot a part", 3)))
    assert error.code == "malformed_multipart"
    headers, body = multipart([("files", f"{i}.png", b"x", "image/png") for i in range(5)])
    error = rejected(lambda: run(inputs.parse_upload(headers, body, 3)))
    assert (error.status, error.code) == (413, "too_many_images")
    headers, body = multipart([("weird", "a.png", b"x", "image/png")])
    assert rejected(lambda: run(inputs.parse_upload(headers, body, 3))).code == "unexpected_field"


def test_metadata_and_file_counts():
    for text in ("{oops", "[1, 2]"):
        error = rejected(inputs.parse_metadata, inputs.Upload(fields={"metadata": text}))
        assert (error.status, error.code) == (400, "malformed_json")
    assert inputs.parse_metadata(inputs.Upload()) == [{}]
    # A batch: one object for every image, or a list of one object per image.
    one = inputs.Upload(fields={"metadata": '{"note": "x"}'})
    assert inputs.parse_metadata(one, 2) == [{"note": "x"}, {"note": "x"}]
    each = inputs.Upload(fields={"metadata": '[{"note": "a"}, {"note": "b"}]'})
    assert inputs.parse_metadata(each, 2) == [{"note": "a"}, {"note": "b"}]
    for text in ('[{"note": "a"}]', '[{"note": "a"}, 3]'):
        error = rejected(inputs.parse_metadata, inputs.Upload(fields={"metadata": text}), 2)
        assert (error.status, error.code) == (400, "malformed_json") and "one JSON object per image" in error.message
    assert rejected(inputs.require_files, inputs.Upload(), LIMITS, False).code == "missing_file"
    two = inputs.Upload(files=[upload(b"a"), upload(b"b")])
    assert rejected(inputs.require_files, two, LIMITS, False).code == "too_many_images"
    assert len(inputs.require_files(two, LIMITS, True)) == 2
    four = inputs.Upload(files=[upload(b"a")] * 4)
    assert rejected(inputs.require_files, four, LIMITS, True).status == 413


def test_api_key_check():
    inputs.check_api_key(None, Headers({}))  # no key configured: open
    digest = inputs.key_digest("k1")
    assert rejected(inputs.check_api_key, digest, Headers({})).code == "missing_api_key"
    assert rejected(inputs.check_api_key, digest, Headers({"x-api-key": "k2"})).code == "invalid_api_key"
    inputs.check_api_key(digest, Headers({"x-api-key": "k1"}))
    inputs.check_api_key(digest, Headers({"authorization": "Bearer k1"}))


def test_serve_config_defaults_and_model_uri():
    cfg = load_config()
    assert cfg.serve.host == "127.0.0.1" and cfg.serve.port == 8000 and cfg.serve.model_uri is None
    assert served_model_uri(cfg) == "models:/ase-ray-multiclass@champion"
    assert served_model_uri(load_config(overrides=["train.task=binary", "registry.prefix=acme"])) == "models:/acme-binary@champion"
    cfg = load_config(overrides=["serve.model_uri=runs:/abc/model", "serve.batching.max_batch_size=1"])
    assert served_model_uri(cfg) == "runs:/abc/model" and cfg.serve.batching.max_batch_size == 1


def test_unterminated_multipart_is_malformed():
    headers, body = multipart([("file", "a.png", png(), "image/png")])
    cut = body[: body.rindex(b"--XyZ--")]  # the upload stopped before the closing boundary
    assert rejected(lambda: run(inputs.parse_upload(headers, cut, 3))).code == "malformed_multipart"
    no_boundary = Headers({"content-type": "multipart/form-data"})
    assert rejected(lambda: run(inputs.parse_upload(no_boundary, body, 3))).code == "malformed_multipart"


def test_a_partial_override_keeps_the_deployments_other_defaults():
    cfg = load_config(overrides=["serve.ingress.max_ongoing_requests=128", "serve.features.num_gpus=1"])
    assert cfg.serve.ingress.num_cpus == 0.1 and cfg.serve.ingress.max_ongoing_requests == 128
    assert cfg.serve.features.num_cpus == 1.0 and cfg.serve.features.num_gpus == 1
