"""The bad-input catalogue: every entry point fed something wrong, and what it must answer.

Each case sets up its input in a folder of its own, runs the real entry point (``ase-ray`` as a
subprocess, a ``jobs/*.py`` script, or the Serve endpoint's request checks, ``inputs.read_request``)
and records what came back. The contract: a one-line ``error:`` on stderr and exit 2 (``data validate``
lists bad rows and exits 1, as documented), or the documented 4xx with a JSON error code for Serve;
never a traceback; nothing left half-written: the case's folder holds exactly what its setup put
there, byte for byte, after the command failed.

No case starts Ray, Serve, a model or an MLflow store: the inputs are refused before any of that.

    run_catalogue(workdir) -> one dict per case (bench/reliability.py imports it)
    python -m tests.unit.bad_input_cases --markdown   # the README table
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import socket
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120
# Environment that would point a command at someone else's cluster, tracking server or key.
UNSET_ENV = ("RAY_ADDRESS", "ASE_RAY_TRACKING_URI", "MLFLOW_TRACKING_URI", "ASE_RAY_API_KEY", "ASE_RAY_VERBOSE")


@dataclass(frozen=True)
class Case:
    name: str
    entry: str  # what is exercised: a CLI command, config, manifest, search space, registry URI, job args, Serve
    input: str  # the bad input, in a few words
    keyword: str  # must appear in the error line: the message names the problem
    run: Callable[[Path], dict]  # sets up in the folder it is given, runs, returns the raw outcome
    exit_code: int | None = 2  # CLI cases
    status: int | None = None  # Serve cases: the HTTP status
    code: str | None = None  # Serve cases: the JSON "error" code

    @property
    def expected(self) -> str:
        if self.status is not None:
            return f"HTTP {self.status} `{self.code}`"
        if self.exit_code == 1:
            return f"exit 1, bad rows listed (`{self.keyword}`)"
        return f"exit 2, `error: ...{self.keyword}...`"


# ------------------------------------------------------------------------------------------ inputs
def write_png(path: Path, seed: int = 0, size: tuple[int, int] = (32, 24)) -> Path:
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def png_bytes(size: tuple[int, int] = (32, 24)) -> bytes:
    buf = io.BytesIO()
    from PIL import Image

    Image.new("RGB", size, (120, 30, 200)).save(buf, "PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` (a decompression bomb's header), with no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def good_manifest(folder: Path, rows: int = 4) -> Path:
    """``folder/manifest.csv`` over ``rows`` real PNGs (two classes, one group each)."""
    lines = ["image_path,label,group"]
    for i in range(rows):
        label = "normal" if i % 2 == 0 else "scratch"
        write_png(folder / "images" / f"{i}.png", seed=i)
        lines.append(f"images/{i}.png,{label},g{i}")
    path = folder / "manifest.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def text_file(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def fake_store(folder: Path) -> Path:
    """A folder with a feature store's three parts in place (enough for the cheap checks)."""
    for name in ("features.parquet", "errors.parquet", "store.json"):
        text_file(folder / name, "")
    return folder


def broken_store(folder: Path) -> Path:
    """A store whose tables read but whose features table lacks the ``label`` column."""
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"row_id": [0, 1], "image_path": ["a.png", "b.png"]}).to_parquet(folder / "features.parquet")
    pd.DataFrame({"row_id": pd.Series(dtype="int64"), "message": pd.Series(dtype=str)}).to_parquet(
        folder / "errors.parquet")
    (folder / "store.json").write_text(json.dumps({"shapes": {}, "rows": 2}))
    return folder


def closed_port() -> int:
    """A local port nobody listens on (a dead server, without the network)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------- running
def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in UNSET_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_THREAD_LIMIT": "1", "NO_COLOR": "1"})
    return env


def run_process(folder: Path, argv: list[str]) -> dict:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, cwd=folder, env=subprocess_env(),
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        return {"exit_code": None, "stdout": str(exc.stdout or ""), "stderr": f"timed out after {TIMEOUT_S} s"}
    return {"exit_code": done.returncode, "stdout": done.stdout, "stderr": done.stderr}


def cli(*args: str | Callable[[], str], work: bool = True) -> Callable[[Path], dict]:
    """``ase-ray ARGS`` in the case folder (an argument may be a function, called at run time);
    ``work``: with ``project.work_dir`` inside the folder."""
    def go(folder: Path) -> dict:
        extra = ["--set", f"project.work_dir={folder / 'work'}"] if work else []
        argv = [a() if callable(a) else a for a in args]
        return run_process(folder, [sys.executable, "-m", "ase_ray.cli", *argv, *extra])

    return go


def job(script: str, *args: str) -> Callable[[Path], dict]:
    """``python jobs/<script> ARGS``, as ``ray job submit ... -- python jobs/<script>`` runs it."""
    def go(folder: Path) -> dict:
        return run_process(folder, [sys.executable, str(REPO / "jobs" / script), *args])

    return go


def with_setup(setup: Callable[[Path], object], run: Callable[[Path], dict]) -> Callable[[Path], dict]:
    """Marks the setup step: it runs before the folder's snapshot, ``run`` after it."""
    def go(folder: Path) -> dict:
        return run(folder)

    go.setup = setup  # type: ignore[attr-defined]
    return go


def serve_on_a_taken_port(folder: Path) -> dict:
    """``ase-ray serve --port P`` while this process listens on P."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        return cli("serve", "--port", str(taken.getsockname()[1]))(folder)


# ------------------------------------------------------------------------------------------ serve
def multipart(parts: list[tuple[str, str | None, bytes, str | None]], boundary: str = "CatalogueBoundary"):
    """(headers, body) of a multipart/form-data request; a part is (field, filename or None, payload, type)."""
    body = b""
    for field, filename, payload, ctype in parts:
        disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        body += f"Content-Type: {ctype}\r\n".encode() if ctype else b""
        body += b"\r\n" + payload + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return {"content-type": f"multipart/form-data; boundary={boundary}", "content-length": str(len(body))}, body


def serve_request(request: Callable[[], tuple[dict[str, str], bytes]], batch: bool = False,
                  api_key: str | None = None, overrides: tuple[str, ...] = ()) -> Callable[[Path], dict]:
    """The endpoint's request checks (``inputs.read_request``, what ``/predict`` runs before any model) on
    the (headers, body) that ``request()`` makes."""
    def go(folder: Path) -> dict:
        headers, body = request()
        from starlette.datastructures import Headers

        from ase_ray.config import load_config
        from ase_ray.errors import RequestError
        from ase_ray.serve import inputs

        limits = inputs.Limits.from_config(load_config(None, list(overrides)).serve)
        digest = inputs.key_digest(api_key) if api_key else None

        async def stream():
            for start in range(0, len(body), 64 * 1024):
                yield body[start:start + 64 * 1024]

        async def call():
            return await inputs.read_request(Headers(headers), stream(), limits, digest, batch)

        try:
            asyncio.run(call())
        except RequestError as exc:
            return {"status": exc.status, "code": exc.code, "detail": exc.message}
        except Exception as exc:  # a bug: the endpoint would answer 500
            import traceback

            return {"status": 500, "code": "internal_error", "detail": traceback.format_exc(), "crash": repr(exc)}
        return {"status": 200, "code": "", "detail": "accepted"}

    return go


def one_image(payload: Callable[[], bytes], ctype: str | None = "image/png", name: str = "a.png"):
    return lambda: multipart([("file", name, payload(), ctype)])


# ---------------------------------------------------------------------------------------- catalogue
def _setup_config_files(folder: Path) -> None:
    text_file(folder / "bad.yaml", "train: [1,\n")
    text_file(folder / "list.yaml", "- 1\n- 2\n")
    text_file(folder / "unknown.yaml", "projekt:\n  seed: 1\n")
    text_file(folder / "wrongtype.yaml", "train:\n  epochs: many\n")
    (folder / "latin1.yaml").write_bytes("train:\n  run_name: caf\xe9\n".encode("latin-1"))
    (folder / "a_folder.yaml").mkdir()


def _setup_manifests(folder: Path) -> None:
    good_manifest(folder / "good")
    text_file(folder / "empty.csv", "")
    text_file(folder / "header.csv", "image_path,label,group\n")
    text_file(folder / "columns.csv", "path,class\na.png,normal\n")
    (folder / "utf16.csv").write_bytes("image_path,label\nbild.png,normal\n".encode("utf-16"))
    (folder / "image.csv").write_bytes(png_bytes())
    (folder / "broken.parquet").write_bytes(b"PAR1 not really parquet")
    text_file(folder / "quote.csv", 'image_path,label\n"images/0.png,normal\n')
    (folder / "a_folder.csv").mkdir()
    text_file(folder / "all_bad.csv", "image_path,label\n/nonexistent/a.png,normal\n/nonexistent/b.png,scratch\n")
    text_file(folder / "good" / "mixed.csv", "image_path,label\nimages/0.png,normal\nimages/missing.png,scratch\n")
    text_file(folder / "good" / "masks.csv", "image_path,label,mask_path\nimages/0.png,normal,images/1.png\n"
              "images/1.png,scratch,masks/missing.png\n")
    text_file(folder / "good" / "dupes.csv",
              "image_path,label,group\n" + "".join(f"images/{i % 3}.png,{'normal' if i % 2 else 'scratch'},g{i}\n"
                                                   for i in range(6)))


def _setup_spaces(folder: Path) -> None:
    text_file(folder / "empty_choice.yaml", "params:\n  train.lr: {choice: []}\n")
    text_file(folder / "low_high.yaml", "params:\n  train.lr: {uniform: [0.1, 0.01]}\n")
    text_file(folder / "unknown.yaml", "params:\n  train.learning_rate: {choice: [0.1, 0.01]}\n")
    text_file(folder / "empty.yaml", "")


def _setup_store(folder: Path) -> None:
    fake_store(folder / "store")


CASES: list[Case] = [
    # ------------------------------------------------------------------ config files and --set
    Case("config-missing", "config file", "`--config` names no file", "not found",
         cli("config", "show", "-c", "missing.yaml")),
    Case("config-not-yaml", "config file", "unclosed YAML list", "not valid YAML",
         with_setup(_setup_config_files, cli("config", "show", "-c", "bad.yaml"))),
    Case("config-not-mapping", "config file", "a YAML list at the top", "mapping",
         with_setup(_setup_config_files, cli("config", "show", "-c", "list.yaml"))),
    Case("config-unknown-key", "config file", "a misspelt section (`projekt:`)", "unknown config key 'projekt'",
         with_setup(_setup_config_files, cli("config", "show", "-c", "unknown.yaml"))),
    Case("config-wrong-type", "config file", "`train.epochs: many`", "train.epochs",
         with_setup(_setup_config_files, cli("features", "--manifest", "m.csv", "-c", "wrongtype.yaml"))),
    Case("config-not-utf8", "config file", "Latin-1 bytes in the YAML", "not UTF-8",
         with_setup(_setup_config_files, cli("config", "show", "-c", "latin1.yaml"))),
    Case("config-is-folder", "config file", "`--config` names a folder", "is a folder",
         with_setup(_setup_config_files, cli("train", "-c", "a_folder.yaml"))),
    Case("set-malformed", "--set", "`--set foo` (no `=`)", "key.path=value",
         cli("train", "--set", "foo")),
    Case("set-unknown-key", "--set", "`--set train.epoch=3`", "unknown config key 'train.epoch'",
         cli("train", "--set", "train.epoch=3")),
    Case("set-bad-value", "--set", "`--set train.lr=fast`", "train.lr",
         cli("train", "--set", "train.lr=fast")),
    # ------------------------------------------------------------------------------ manifests
    Case("manifest-missing", "data validate", "the manifest path names no file", "manifest not found",
         cli("data", "validate", "nowhere.csv", work=False)),
    Case("manifest-empty-file", "data validate", "a 0-byte CSV", "is empty",
         with_setup(_setup_manifests, cli("data", "validate", "empty.csv", work=False))),
    Case("manifest-header-only", "data validate", "a header line, no rows", "no rows",
         with_setup(_setup_manifests, cli("data", "validate", "header.csv", work=False))),
    Case("manifest-missing-columns", "data validate", "columns `path,class`", "misses required column",
         with_setup(_setup_manifests, cli("data", "validate", "columns.csv", work=False))),
    Case("manifest-utf16", "data validate", "a UTF-16 CSV (wrong encoding)", "not UTF-8",
         with_setup(_setup_manifests, cli("data", "validate", "utf16.csv", work=False))),
    Case("manifest-binary", "data split", "a PNG saved as `.csv` (binary garbage)", "not UTF-8",
         with_setup(_setup_manifests, cli("data", "split", "image.csv", "--out", "split.csv"))),
    Case("manifest-broken-parquet", "features", "a `.parquet` that is not Parquet", "cannot read manifest",
         with_setup(_setup_manifests, cli("features", "--manifest", "broken.parquet", "--out", "store"))),
    Case("manifest-broken-quotes", "data augment", "an unterminated quote in the CSV", "cannot read manifest",
         with_setup(_setup_manifests, cli("data", "augment", "quote.csv", "--out", "aug"))),
    Case("manifest-unreadable", "data validate", "the manifest path is a folder", "is a folder",
         with_setup(_setup_manifests, cli("data", "validate", "a_folder.csv", work=False))),
    Case("manifest-every-row-bad", "data validate", "no row's image exists", "2 problem(s) in 2 row(s)",
         with_setup(_setup_manifests, cli("data", "validate", "all_bad.csv", work=False)), exit_code=1),
    Case("manifest-mixed-rows", "data validate", "one good row, one missing image", "1 problem(s) in 1 row(s)",
         with_setup(_setup_manifests, cli("data", "validate", "good/mixed.csv", work=False)), exit_code=1),
    Case("manifest-missing-mask", "data validate", "a `mask_path` names no file", "1 problem(s) in 1 row(s)",
         with_setup(_setup_manifests, cli("data", "validate", "good/masks.csv", work=False)), exit_code=1),
    Case("manifest-duplicate-ids", "data split", "the same image path on several rows", "duplicate image path",
         with_setup(_setup_manifests, cli("data", "split", "good/dupes.csv", "--out", "split.csv"))),
    # ----------------------------------------------------------------------------- data commands
    Case("import-magnetic-tile-wrong-folder", "data import magnetic-tile", "`--root` is not the data set",
         "class folder missing",
         with_setup(_setup_manifests, cli("data", "import", "magnetic-tile", "--root", "good", "--out", "mt"))),
    Case("split-one-fold", "data split", "`--folds 1`", "at least 2 folds",
         with_setup(_setup_manifests, cli("data", "split", "good/manifest.csv", "--folds", "1", "--out", "s.csv"))),
    Case("split-bad-fraction", "data split", "`--set data.split.val_fraction=0.7`", "val_fraction",
         with_setup(_setup_manifests, cli("data", "split", "good/manifest.csv", "--out", "s.csv",
                                          "--set", "data.split.val_fraction=0.7"))),
    Case("synth-out-is-file", "data synth", "`--out` names a file", "is a file",
         with_setup(lambda f: text_file(f / "taken", "x"), cli("data", "synth", "--out", "taken", "--scale", "0.06"))),
    Case("augment-without-split", "data augment", "a manifest with no `split` column", "split",
         with_setup(_setup_manifests, cli("data", "augment", "good/manifest.csv", "--out", "aug"))),
    # ----------------------------------------------------------------------------- features
    Case("features-out-is-file", "features", "`--out` names a file", "is a file",
         with_setup(_setup_manifests, cli("features", "--manifest", "good/manifest.csv", "--out", "empty.csv"))),
    Case("features-no-image-exists", "features", "every image path is missing", "none of the 2 image",
         with_setup(_setup_manifests, cli("features", "--manifest", "all_bad.csv", "--out", "store"))),
    # ------------------------------------------------------------------------------ train
    Case("train-missing-store", "train", "`--store` names no folder", "not a feature store",
         cli("train", "--store", "no_store")),
    Case("train-store-without-columns", "train", "a store whose table has no `label` column", "no 'label' column",
         with_setup(lambda f: broken_store(f / "store"), cli("train", "--store", "store"))),
    Case("train-stray-argument", "train", "`train myrun` without `--resume`", "unexpected argument",
         cli("train", "myrun")),
    # ---------------------------------------------------------------------- evaluate / register
    Case("evaluate-unknown-run", "registry URI", "`runs:/nope/model`, no tracking store yet",
         "no MLflow tracking database",
         with_setup(_setup_store, cli("evaluate", "--model", "runs:/nope/model", "--store", "store"))),
    Case("evaluate-dead-server", "registry URI", "`models:/x@y` on a tracking server that does not answer",
         "unreachable",
         with_setup(_setup_store, cli("evaluate", "--model", "models:/x@y", "--store", "store",
                                      "--set", lambda: f"mlflow.tracking_uri=http://127.0.0.1:{closed_port()}"))),
    Case("evaluate-missing-path", "evaluate", "`--model` names a missing folder", "neither a folder",
         with_setup(_setup_store, cli("evaluate", "--model", "no/such/model", "--store", "store"))),
    Case("evaluate-unknown-split", "evaluate", "`--split holdout`", "unknown split",
         with_setup(_setup_store, cli("evaluate", "--model", "no/such/model", "--store", "store",
                                      "--split", "holdout"))),
    Case("register-unknown-run", "register", "`--run-id nope`, no tracking store yet", "no MLflow tracking database",
         cli("register", "--run-id", "nope")),
    Case("register-unknown-task", "register", "`--task tertiary`", "unknown task",
         cli("register", "--run-id", "abc", "--task", "tertiary")),
    # ---------------------------------------------------------------------------- tune
    Case("space-empty-choice", "search space", "`choice: []`", "non-empty list",
         with_setup(_setup_spaces, cli("tune", "--space", "empty_choice.yaml"))),
    Case("space-low-above-high", "search space", "`uniform: [0.1, 0.01]`", "lo < hi",
         with_setup(_setup_spaces, cli("tune", "--space", "low_high.yaml"))),
    Case("space-unknown-parameter", "search space", "`train.learning_rate`", "unknown config key",
         with_setup(_setup_spaces, cli("tune", "--space", "unknown.yaml"))),
    Case("space-empty-file", "search space", "a 0-byte space file", "is empty",
         with_setup(_setup_spaces, cli("tune", "--space", "empty.yaml"))),
    Case("space-missing", "search space", "`--space` names no file", "search space not found",
         cli("tune", "--space", "nowhere.yaml")),
    # ------------------------------------------------------------------------ predict / serve
    Case("predict-missing-images", "predict", "every image of the manifest is missing", "none of the 2 image",
         with_setup(_setup_manifests, cli("predict", "--manifest", "all_bad.csv", "--out", "pred"))),
    Case("predict-image-as-manifest", "predict", "`--manifest` is a PNG, not a table", "not UTF-8",
         with_setup(_setup_manifests, cli("predict", "--manifest", "good/images/0.png", "--out", "pred"))),
    Case("predict-bad-model-uri", "registry URI", "`--model-uri models:/` (no name)", "names no model",
         with_setup(_setup_manifests, cli("predict", "--manifest", "good/manifest.csv", "--out", "pred",
                                          "--model-uri", "models:/"))),
    Case("serve-missing-model-folder", "serve", "`--model-uri` names a missing folder", "no such folder",
         cli("serve", "--model-uri", "exported/model", "--port", lambda: str(closed_port()))),
    Case("serve-bad-port", "serve", "`--port 70000`", "serve.port",
         cli("serve", "--port", "70000")),
    Case("serve-bad-host", "serve", "`--host 'my host!'`", "neither an IP address nor a host name",
         cli("serve", "--host", "my host!", "--port", lambda: str(closed_port()))),
    Case("serve-port-taken", "serve", "`--port` already in use", "cannot serve on",
         serve_on_a_taken_port),
    # ---------------------------------------------------------------------------- ablate
    Case("ablate-out-is-file", "ablate", "`--out` names a file", "is a file",
         with_setup(_setup_manifests, cli("ablate", "--manifest", "good/manifest.csv", "--out", "empty.csv"))),
    # ------------------------------------------------------------------------ job arguments
    Case("job-unknown-option", "job args", "`jobs/train.py --epochs 3`", "No such option",
         job("train.py", "--epochs", "3")),
    Case("job-missing-option", "job args", "`jobs/features.py` without `--manifest`", "Missing option",
         job("features.py")),
    Case("job-bad-option-value", "job args", "`jobs/serve.py --port eighty`", "Invalid value",
         job("serve.py", "--port", "eighty")),
    # ------------------------------------------------------------------------ Serve requests
    Case("request-empty-body", "Serve /predict", "no body", "",
         serve_request(lambda: ({"content-type": "multipart/form-data; boundary=x"}, b"")), status=400, code="empty_body"),
    Case("request-wrong-content-type", "Serve /predict", "`application/json` body", "",
         serve_request(lambda: ({"content-type": "application/json"}, b'{"image": "..."}')),
         status=415, code="unsupported_media_type"),
    Case("request-too-large", "Serve /predict", "a body over the upload limit", "",
         serve_request(one_image(lambda: b"\0" * 3_000_000), overrides=("serve.max_upload_bytes=1048576",)),
         status=413, code="payload_too_large"),
    Case("request-not-an-image", "Serve /predict", "a text file as the image", "",
         serve_request(one_image(lambda: b"just some text, not pixels")), status=400, code="not_an_image"),
    Case("request-bad-metadata", "Serve /predict", "`metadata` field `{lot: 7`", "",
         serve_request(lambda: multipart([("file", "a.png", png_bytes(), "image/png"),
                                          ("metadata", None, b"{lot: 7", None)])),
         status=400, code="malformed_json"),
    Case("request-too-many-files", "Serve /predict/batch", "17 images (limit 16)", "",
         serve_request(lambda: multipart([("files", f"{i}.png", png_bytes(), "image/png") for i in range(17)]),
                       batch=True),
         status=413, code="too_many_images"),
    Case("request-missing-api-key", "Serve /predict", "no X-API-Key while a key is configured", "",
         serve_request(one_image(png_bytes), api_key="s3cret"), status=401, code="missing_api_key"),
    Case("request-decompression-bomb", "Serve /predict", "a PNG header claiming 100000 x 100000 px", "",
         serve_request(one_image(lambda: png_header_only(100_000, 100_000))), status=413, code="too_many_pixels"),
    Case("request-truncated-multipart", "Serve /predict", "a multipart body cut before its end", "",
         serve_request(lambda: ({"content-type": "multipart/form-data; boundary=b"},
                               b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n\x89PNG')),
         status=400, code="malformed_multipart"),
]


# ------------------------------------------------------------------------------------ judging
def snapshot(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` with a digest of its bytes ("dir" for folders)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def leftovers(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """What the failed command added, changed or removed in its folder."""
    added = [p for p in after if p not in before]
    changed = [f"{p} (changed)" for p in before if p in after and after[p] != before[p]]
    removed = [f"{p} (removed)" for p in before if p not in after]
    return [*added, *changed, *removed]


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def judge(case: Case, raw: dict, left: list[str]) -> dict:
    """The catalogue's record of one case, with ``problems`` (empty when the contract holds)."""
    record = {"name": case.name, "entry": case.entry, "input": case.input, "expected": case.expected,
              "leftovers": left}
    problems = [f"left behind: {', '.join(left)}"] if left else []
    if case.status is not None:
        record.update(status=raw["status"], message=f"{raw['status']} {raw['code']}: {raw['detail'].splitlines()[0]}",
                      traceback="Traceback" in raw["detail"])
        if (raw["status"], raw["code"]) != (case.status, case.code):
            problems.append(f"answered {raw['status']} {raw['code']!r}, expected {case.status} {case.code!r}")
    else:
        output = raw["stdout"] + raw["stderr"]
        errors = error_lines(raw["stderr"])
        stderr_lines = [line for line in raw["stderr"].splitlines() if line.strip()]
        message = errors[0] if errors else (stderr_lines[-1] if stderr_lines else "")
        record.update(exit_code=raw["exit_code"], message=message, error_lines=len(errors),
                      traceback="Traceback" in output)
        if raw["exit_code"] != case.exit_code:
            problems.append(f"exit code {raw['exit_code']}, expected {case.exit_code}")
        if case.exit_code == 2 and len(errors) != 1:
            problems.append(f"{len(errors)} `error:` lines on stderr, expected exactly one")
        if case.exit_code == 1 and errors:
            problems.append("bad rows are listed, not reported as an `error:`")
        if case.keyword not in message:
            problems.append(f"the message does not name the problem ({case.keyword!r})")
    if record["traceback"]:
        problems.append("a traceback")
    record.update(ok=not problems, problems=problems)
    return record


def run_case(case: Case, folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    setup = getattr(case.run, "setup", None)
    if setup is not None:
        setup(folder)
    before = snapshot(folder)
    raw = case.run(folder)
    return judge(case, raw, leftovers(before, snapshot(folder)))


def run_catalogue(workdir: Path, workers: int = 4) -> list[dict]:
    """Run every case, each in ``workdir/<name>``; one record per case (see :func:`judge`), in catalogue
    order. ``workers`` cases at a time: most of a case is a subprocess importing the CLI."""
    from concurrent.futures import ThreadPoolExecutor

    workdir = Path(workdir)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda case: run_case(case, workdir / case.name), CASES))


def markdown_table() -> str:
    rows = ["| case | entry | input | outcome |", "|---|---|---|---|"]
    rows += [f"| `{c.name}` | {c.entry} | {c.input} | {c.expected} |" for c in CASES]
    return "\n".join(rows)


if __name__ == "__main__":
    if "--markdown" in sys.argv[1:]:
        print(markdown_table())
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            results = run_catalogue(Path(tmp))
        for r in results:
            print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['name']}: {r['message']}" +
                  ("" if r["ok"] else f"  <- {'; '.join(r['problems'])}"))
        print(f"{sum(r['ok'] for r in results)}/{len(results)} ok")
