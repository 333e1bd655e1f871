"""tesseract through its library (``ocr.engine: library``): libtesseract's C API, loaded once in a helper
process that reads image after image.

Why: the ``tesseract`` program loads its model for every image it is started on. On the AOI text bands
that start-up (about 90 ms) was two thirds of OCR's time; the library keeps the model loaded and reads a
band in about 30 ms, with the same text (the same engine, called as the program calls it).

Why a helper process and not the library in the caller: tesseract's OpenMP loops ask for 4 threads,
and only ``OMP_THREAD_LIMIT`` (read once, when a process starts OpenMP) holds them to one; several
threads per call on a busy core made a page 3-4x slower. torch shares that OpenMP runtime, so setting it
in the caller would hold torch to one thread too. The helper starts with ``OMP_THREAD_LIMIT=1`` and
imports nothing but the standard library. It also keeps a crash or a hang in tesseract out of the caller:
a read that outlasts ``timeout_s`` kills the helper, and the next read starts a new one.

Protocol on the helper's stdin/stdout: the helper first writes one status line (``OK`` or ``ERR
<message>``); then per image the caller writes ``<II`` (width, height) and width x height grey bytes
(8-bit, rows top to bottom), and the helper answers ``<BI`` (0 ok / 1 failed, length) and that many bytes
of UTF-8 (the text, or the error).

The library is found as the system finds it (``ctypes.util.find_library("tesseract")``) unless
``ASE_RAY_LIBTESSERACT`` names it (a path, for a tesseract installed elsewhere): like ``PATH`` for the binary,
it describes the machine, not the run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import queue
import select
import struct
import subprocess
import sys
import threading
from pathlib import Path

LIBRARY_ENV = "ASE_RAY_LIBTESSERACT"
REQUEST = struct.Struct("<II")
REPLY = struct.Struct("<BI")
START_TIMEOUT_S = 30.0  # loading the library and its language model


class TesseractLibraryError(RuntimeError):
    """The helper could not start (no library, no language data): the backend cannot run."""


class TesseractReadError(RuntimeError):
    """One image could not be read (tesseract failed on it, timed out, or took its helper down)."""


# ------------------------------------------------------------------------------------ the helper
def _load_api(lang: str, psm: int):
    name = os.environ.get(LIBRARY_ENV) or ctypes.util.find_library("tesseract") or "libtesseract.so.5"
    try:
        lib = ctypes.CDLL(name)
    except OSError as error:
        raise TesseractLibraryError(f"libtesseract not found ({name}: {error}); install tesseract-ocr "
                                    "(Debian: apt-get install tesseract-ocr) or set ocr.engine: binary") from None
    lib.TessBaseAPICreate.restype = ctypes.c_void_p
    lib.TessBaseAPIInit3.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]
    lib.TessBaseAPISetPageSegMode.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.TessBaseAPISetImage.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int,
                                        ctypes.c_int, ctypes.c_int]
    lib.TessBaseAPIGetUTF8Text.argtypes = [ctypes.c_void_p]
    lib.TessBaseAPIGetUTF8Text.restype = ctypes.POINTER(ctypes.c_char)
    lib.TessDeleteText.argtypes = [ctypes.POINTER(ctypes.c_char)]
    lib.TessBaseAPIClear.argtypes = [ctypes.c_void_p]
    api = lib.TessBaseAPICreate()
    if lib.TessBaseAPIInit3(api, None, lang.encode()) != 0:
        raise TesseractLibraryError(f"tesseract has no language data for {lang!r} (install e.g. "
                                    "tesseract-ocr-<lang>)")
    lib.TessBaseAPISetPageSegMode(api, psm)
    return lib, api


def _read_exactly(stream, size: int) -> bytes | None:
    data = bytearray()
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def helper_main(lang: str, psm: int) -> None:
    """The helper's loop: one image in, its text out, until stdin closes."""
    stdin = sys.stdin.buffer
    # The replies get their own copy of stdout; the library's own prints (to fd 1) go to stderr instead,
    # where they cannot corrupt a reply.
    stdout = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    try:
        lib, api = _load_api(lang, psm)
    except TesseractLibraryError as error:
        stdout.write(f"ERR {error}\n".encode())
        stdout.flush()
        return
    stdout.write(b"OK\n")
    stdout.flush()
    while (header := _read_exactly(stdin, REQUEST.size)) is not None:
        width, height = REQUEST.unpack(header)
        pixels = _read_exactly(stdin, width * height)
        if pixels is None:
            return
        lib.TessBaseAPISetImage(api, pixels, width, height, 1, width)
        text = lib.TessBaseAPIGetUTF8Text(api)
        if text:
            status, body = 0, ctypes.string_at(text)
            lib.TessDeleteText(text)
        else:
            status, body = 1, b"tesseract returned no text (recognition failed)"
        lib.TessBaseAPIClear(api)
        stdout.write(REPLY.pack(status, len(body)) + body)
        stdout.flush()


# ------------------------------------------------------------------------------------ the caller
class _Helper:
    """One running helper process."""

    def __init__(self, lang: str, psm: int) -> None:
        env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), lang, str(psm)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
        )
        status = self._line(START_TIMEOUT_S)
        if status != "OK":
            self.close()
            raise TesseractLibraryError(status.removeprefix("ERR ") if status else "the tesseract helper did not start")

    def _line(self, timeout_s: float) -> str | None:
        if not self._ready(timeout_s):
            return None
        return self.process.stdout.readline().decode(errors="replace").strip() or None

    def _ready(self, timeout_s: float) -> bool:
        # select() sees the pipe, not the reader's buffer: safe because the helper writes one reply per
        # request and nothing else, so nothing is ever left buffered between reads.
        readable, _, _ = select.select([self.process.stdout], [], [], timeout_s)
        return bool(readable)

    def read(self, pixels: bytes, width: int, height: int, timeout_s: float) -> str:
        try:
            self.process.stdin.write(REQUEST.pack(width, height) + pixels)
            self.process.stdin.flush()
        except (BrokenPipeError, OSError) as error:
            raise TesseractReadError(f"the tesseract helper is gone ({error})") from None
        if not self._ready(timeout_s):
            self.close()
            raise TesseractReadError(f"timed out after {timeout_s:g} s")
        header = _read_exactly(self.process.stdout, REPLY.size)
        body = _read_exactly(self.process.stdout, REPLY.unpack(header)[1]) if header else None
        if header is None or body is None:
            code = self.process.wait()
            raise TesseractReadError(f"tesseract exited (code {code}) on this image")
        if REPLY.unpack(header)[0]:
            raise TesseractReadError(body.decode(errors="replace"))
        return body.decode(errors="replace")

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass


class TesseractLibrary:
    """Helpers for one language and page segmentation mode: one per thread reading at a time, started when
    first needed and kept; a helper that timed out or died is replaced by the next read."""

    def __init__(self, lang: str, psm: int) -> None:
        self.lang, self.psm = lang, psm
        self._idle: queue.SimpleQueue[_Helper] = queue.SimpleQueue()
        self._all: list[_Helper] = []
        self._lock = threading.Lock()
        self._idle.put(self._start())  # fails here, at construction, when the library or language is missing

    def _start(self) -> _Helper:
        helper = _Helper(self.lang, self.psm)
        with self._lock:
            self._all.append(helper)
        return helper

    def read(self, pixels: bytes, width: int, height: int, timeout_s: float) -> str:
        """The text of one grey image (``width`` x ``height`` bytes); :class:`TesseractReadError` when it
        cannot be read."""
        try:
            helper = self._idle.get_nowait()
        except queue.Empty:
            helper = self._start()
        if not helper.alive:  # died since its last read (killed, out of memory): it had no image
            self._discard(helper)
            helper = self._start()
        try:
            return helper.read(pixels, width, height, timeout_s)
        finally:
            if helper.alive:
                self._idle.put(helper)
            else:
                self._discard(helper)

    def _discard(self, helper: _Helper) -> None:
        helper.close()
        with self._lock:
            self._all = [h for h in self._all if h is not helper]

    def close(self) -> None:
        with self._lock:
            helpers, self._all = self._all, []
        for helper in helpers:
            helper.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the helpers end anyway when their stdin closes
            pass


if __name__ == "__main__":
    helper_main(sys.argv[1], int(sys.argv[2]))
