"""Ray Serve over real HTTP on 127.0.0.1: a tiny model registered in a temporary SQLite MLflow,
every documented field, the bad-input catalogue, a hot swap, the API key, and the batch job."""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ase_ray.config import load_config
from ase_ray.data.manifest import read_dataset_info
from ase_ray.data.metadata import MetadataColumns
from ase_ray.data.synthetic import generate_synthetic
from ase_ray.features.inmemory import decode_image_bytes
from ase_ray.features.pipeline import apply_layout_hints
from ase_ray.testing import register_untrained_model

pytestmark = pytest.mark.integration

MODEL = "ase-ray-multiclass"
KEY_ENV = "ASE_RAY_TEST_SERVE_KEY"
KEY = "s3cret-test-key"
TINY = [
    "features.describe.backend=tiny", "features.reason.backend=tiny", "features.image_encoder.backend=tiny",
    "features.text_encoder.backend=tiny", "features.describe.max_new_tokens=4",
    "train.model.d_model=16", "train.model.heads=2", "train.model.head_hidden=16",
    # every image setting off its default: Serve must extract exactly what the store holds
    "features.image_encoder.resize=pad", "features.image_encoder.pooling=mean_max",
    "features.image_encoder.mid_stages=true", "features.image_encoder.views=4",
]
MAX_UPLOAD = 300_000
MAX_PIXELS = 4_000_000
MAX_IMAGES = 3


@dataclass
class Served:
    url: str
    config: object
    images: list[Path]
    manifest: Path
    synth: pd.DataFrame
    root: Path

    def client(self, key: str | None = KEY) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, headers={"X-API-Key": key} if key else {})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    from ray import serve

    from ase_ray.serve.deploy import deploy

    root = tmp_path_factory.mktemp("serve")
    cfg = load_config(overrides=[
        f"project.work_dir={root / 'work'}", *TINY, "data.synth.scale=0.02", "data.synth.seed=3",
        f"serve.port={free_port()}", f"serve.max_upload_bytes={MAX_UPLOAD}", f"serve.max_pixels={MAX_PIXELS}",
        f"serve.max_batch_images={MAX_IMAGES}", f"serve.api_key_env={KEY_ENV}", "serve.batching.max_batch_size=4",
        "serve.features.num_cpus=1",
    ])
    synth = generate_synthetic(cfg.data.synth, root / "synth")
    cfg = apply_layout_hints(cfg, read_dataset_info(root / "synth" / "manifest.csv"))
    paths = [Path(p) for p in synth["image_path"][:4]]
    decoded = [decode_image_bytes(p.read_bytes()) for p in paths[:2]]
    assert register_untrained_model(cfg, decoded, MODEL, alias="champion", seed=0, out_dir=root / "m1") == "1"
    assert register_untrained_model(cfg, decoded, MODEL, alias=None, seed=1, out_dir=root / "m2") == "2"
    # v3 reads the records beside the image: the note as text, the reading in its numeric block
    records = synth[["operator_note", "probe_reading"]].iloc[:2].to_dict("records")
    columns = MetadataColumns(text=["operator_note"], numeric=["probe_reading"])
    assert register_untrained_model(cfg, decoded, MODEL, alias=None, seed=2, out_dir=root / "m3",
                                    metadata=columns, records=records) == "3"
    manifest = root / "predict.csv"
    corrupt = root / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    pd.DataFrame({"image_path": [str(p) for p in paths[:3]] + [str(corrupt)]}).to_csv(manifest, index=False)
    os.environ[KEY_ENV] = KEY  # deploy() hands the replicas its sha256, never the key
    try:
        url = deploy(cfg, timeout_s=300)
    finally:
        os.environ.pop(KEY_ENV, None)
    yield Served(url, cfg, paths, manifest, synth, root)
    serve.shutdown()


def png_bytes(path: Path) -> bytes:
    return path.read_bytes()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(width: int, height: int, idat: bytes = b"") -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def decompression_bomb(side: int = 10_000) -> bytes:
    """A real 1-bit PNG of side x side zero pixels (100 M pixels in ~12 KB), written row by row."""
    row = b"\x00" * (1 + (side + 7) // 8)
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return raw_png(side, side, data)


def noise_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------- happy path
def test_predict_returns_every_documented_field(served):
    classes = [c.name for c in served.config.data.synth.classes]
    with served.client() as http:
        r = http.post("/predict", files={"file": ("board.png", png_bytes(served.images[0]), "image/png")},
                      data={"metadata": json.dumps({"line": "A3", "lot": 7})})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["label"] in classes
    assert set(body["probabilities"]) == set(classes)
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-4
    assert body["confidence"] == max(body["probabilities"].values())
    assert body["needs_review"] == (body["confidence"] < body["review_threshold"])
    assert body["review_threshold"] == 0.6
    assert "LEN" in body["ocr"]["text"] and isinstance(body["ocr"]["fields"]["LEN"], float)
    assert isinstance(body["texts"]["description"], str) and isinstance(body["texts"]["reasoning"], str)
    assert body["model"] == {**body["model"], "name": MODEL, "version": "1", "alias": "champion",
                             "uri": f"models:/{MODEL}@champion"}
    assert body["model"]["run_id"]
    assert body["image"]["width"] == 320 and body["image"]["format"] == "PNG" and body["image"]["filename"] == "board.png"
    assert body["metadata"] == {"line": "A3", "lot": 7}
    assert body["latency_ms"] > 0


def test_batch_health_metadata_and_docs(served):
    with served.client() as http:
        files = [("files", (p.name, png_bytes(p), "image/png")) for p in served.images[:3]]
        r = http.post("/predict/batch", files=files)
        assert r.status_code == 200, r.text
        batch = r.json()
        assert batch["count"] == 3 and len(batch["predictions"]) == 3
        assert [p["image"]["filename"] for p in batch["predictions"]] == [p.name for p in served.images[:3]]
        single = http.post("/predict", files={"file": ("a.png", png_bytes(served.images[1]))}).json()
        assert single["probabilities"] == pytest.approx(batch["predictions"][1]["probabilities"], abs=1e-5)

        assert http.get("/healthz").json() == {"status": "ok"}
        meta = http.get("/metadata").json()
        assert meta["model"]["version"] == "1" and meta["model"]["alias"] == "champion"
        assert meta["classes"] == [c.name for c in served.config.data.synth.classes]
        assert meta["review_threshold"] == 0.6 and meta["task"] == "multiclass"
        assert meta["backends"]["ocr"]["backend"] == "tesseract" and meta["backends"]["reason"]["backend"] == "tiny"
        # The models the replica loaded (and where), not the unused hub ids of the config.
        assert meta["backends"]["reason"]["model"] == "tiny-random-llama"
        assert meta["backends"]["describe"]["model"] == "tiny-random-instructblip"
        assert meta["backends"]["describe"]["device"] == "cpu" and "revision" not in meta["backends"]["describe"]
        assert meta["features_source"] == "model"
        assert meta["batching"]["max_batch_size"] == 4
        assert meta["limits"]["max_batch_images"] == MAX_IMAGES and meta["api_key_required"] is True
        for page in ("/docs", "/redoc", "/ui"):  # every asset from this server: no CDN, no web font
            html = http.get(page).text
            assert "://" not in html, page
            for asset in [part.split('"')[0] for part in html.split('="/assets/')[1:]]:
                got = httpx.get(f"{served.url}/assets/{asset}")  # static: no key needed
                assert got.status_code == 200 and len(got.content) > 100, asset
        assert httpx.get(f"{served.url}/assets/..%2Fapp.py").status_code == 404
        assert http.get("/review/queue").json()["error"] == "no_review_queue"  # none configured
        assert httpx.get(f"{served.url}/review/queue").status_code == 401  # data need the key
        paths = http.get("/openapi.json").json()["paths"]
        assert {"/predict", "/predict/batch", "/healthz", "/metadata"} <= set(paths)
        assert "multipart/form-data" in paths["/predict"]["post"]["requestBody"]["content"]


# --------------------------------------------------------------------------- bad-input catalogue
def _bad_requests(served: Served) -> dict[str, tuple[dict, int, str]]:
    good = png_bytes(served.images[0])
    post = "/predict"
    return {
        "empty body": (dict(url=post, content=b"", headers={"content-type": "multipart/form-data; boundary=x"}), 400, "empty_body"),
        "not an image": (dict(url=post, files={"file": ("x.png", b"this is text, not pixels", "image/png")}), 400, "not_an_image"),
        "truncated png": (dict(url=post, files={"file": ("t.png", good[: len(good) // 2], "image/png")}), 400, "corrupt_image"),
        "empty file": (dict(url=post, files={"file": ("e.png", b"", "image/png")}), 400, "empty_file"),
        "wrong content type (json body)": (dict(url=post, json={"image": "aGVsbG8="}), 415, "unsupported_media_type"),
        "wrong content type (part)": (dict(url=post, files={"file": ("a.txt", good, "text/plain")}), 415, "unsupported_media_type"),
        "unsupported format": (dict(url=post, files={"file": ("a.gif", _gif(), "image/gif")}), 415, "unsupported_image_format"),
        "malformed json metadata": (dict(url=post, files={"file": ("a.png", good, "image/png")}, data={"metadata": "{not json"}), 400, "malformed_json"),
        "malformed multipart": (dict(url=post, content=b"--x\r\ngarbage", headers={"content-type": "multipart/form-data; boundary=x"}), 400, "malformed_multipart"),
        "no file part": (dict(url=post, files={"metadata": (None, "{}")}), 400, "missing_file"),
        "too large upload": (dict(url=post, files={"file": ("big.png", noise_png(400), "image/png")}), 413, "payload_too_large"),
        "decompression bomb": (dict(url=post, files={"file": ("bomb.png", decompression_bomb(), "image/png")}), 413, "too_many_pixels"),
        "zero-sized image": (dict(url=post, files={"file": ("zero.png", raw_png(0, 0), "image/png")}), 400, "zero_size_image"),
        "too many images in a batch": (dict(url="/predict/batch", files=[("files", (f"{i}.png", good, "image/png")) for i in range(MAX_IMAGES + 1)]), 413, "too_many_images"),
        "two images to /predict": (dict(url=post, files=[("files", ("a.png", good, "image/png")), ("files", ("b.png", good, "image/png"))]), 400, "too_many_images"),
    }


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, "GIF")
    return buf.getvalue()


def test_every_bad_request_is_a_json_4xx_and_good_requests_still_work(served):
    assert len(noise_png(400)) > MAX_UPLOAD and len(decompression_bomb()) < 50_000
    failures = []
    with served.client() as http:
        for name, (request, status, code) in _bad_requests(served).items():
            r = http.post(**request)
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else None
            if r.status_code != status or body is None or body.get("error") != code or "Traceback" in r.text:
                failures.append(f"{name}: {r.status_code} {r.text[:200]}")
        r = http.post("/predict", files={"file": ("ok.png", png_bytes(served.images[2]), "image/png")})
        assert r.status_code == 200, r.text
    assert not failures, "\n".join(failures)


def test_api_key_is_enforced(served):
    good = {"file": ("a.png", png_bytes(served.images[0]), "image/png")}
    with served.client(key=None) as http:
        missing = http.post("/predict", files=good)
        assert missing.status_code == 401 and missing.json()["error"] == "missing_api_key"
        wrong = http.post("/predict", files=good, headers={"X-API-Key": "nope"})
        assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_api_key"
        assert http.get("/metadata").status_code == 401
        assert http.get("/healthz").status_code == 200  # liveness stays open
        bearer = http.post("/predict", files=good, headers={"Authorization": f"Bearer {KEY}"})
        assert bearer.status_code == 200, bearer.text
    assert KEY not in json.dumps(served.config.model_dump(mode="json"))


# ------------------------------------------------------------------------------------- hot swap
def _metadata_when(http: httpx.Client, check, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        meta = http.get("/metadata").json()
        if check(meta) or time.monotonic() > deadline:
            return meta
        time.sleep(0.5)


def test_hot_swap_changes_version_without_restarting_replicas(served):
    from ase_ray.serve.deploy import swap_model

    app = served.config.serve.app_name
    with served.client() as http:
        before = http.get("/metadata").json()
        assert before["model"]["version"] == "1"
        swap_model(app, model_uri=f"models:/{MODEL}/2", review_threshold=0.01)
        after = _metadata_when(http, lambda m: m["model"]["version"] == "2" and m["review_threshold"] == 0.01)
        assert after["model"]["version"] == "2" and after["model"]["alias"] is None
        assert after["review_threshold"] == 0.01
        assert after["replicas"] == before["replicas"]  # reconfigured in place, not redeployed
        assert after["loaded_at"] > before["loaded_at"]
        r = http.post("/predict", files={"file": ("a.png", png_bytes(served.images[0]), "image/png")})
        assert r.status_code == 200 and r.json()["model"]["version"] == "2"
        assert r.json()["needs_review"] is False  # top probability of 5 classes is >= 0.2 > 0.01

        swap_model(app, model_uri=f"models:/{MODEL}@no-such-alias")
        failed = _metadata_when(http, lambda m: m["swap_error"] is not None, timeout_s=60)
        assert failed["swap_error"] and failed["model"]["version"] == "2"  # the previous model keeps serving
        assert http.post("/predict", files={"file": ("a.png", png_bytes(served.images[0]))}).status_code == 200


def _store_in_process(config, manifest: Path, tmp_path: Path) -> Path:
    from ase_ray.data.manifest import read_manifest
    from ase_ray.features.pipeline import _with_row_ids, stage_plan, with_metadata
    from ase_ray.features.stages import DecodeStage
    from ase_ray.features.store import write_store

    rows, metadata = with_metadata(config, read_manifest(manifest), read_dataset_info(manifest))
    batch = DecodeStage()(_with_row_ids(rows))
    for stage_cls, settings in stage_plan(config):
        batch = stage_cls(settings, str(tmp_path / "cache"))(batch)
    assert not batch["error_stage"].astype(bool).any()
    meta = {"manifest": str(manifest), "metadata_columns": metadata.to_json()}
    write_store(batch, tmp_path / "store", meta)
    return tmp_path / "store"


def test_a_model_that_reads_records_asks_for_them_and_serves_what_evaluate_computes(served, tmp_path):
    from ase_ray.data.manifest import write_manifest
    from ase_ray.serve.deploy import swap_model
    from ase_ray.train.evaluate import evaluate_probabilities

    app = served.config.serve.app_name
    rows = served.synth.iloc[:3].assign(split="test")
    records = rows[["operator_note", "probe_reading"]].to_dict("records")
    files = [("files", (f"{i}.png", png_bytes(Path(p)), "image/png")) for i, p in enumerate(rows["image_path"])]
    with served.client() as http:
        swap_model(app, model_uri=f"models:/{MODEL}/3")
        meta = _metadata_when(http, lambda m: m["model"]["version"] == "3")
        assert meta["metadata_columns"] == {"text": ["operator_note"], "numeric": ["probe_reading"]}
        try:
            r = http.post("/predict", files={"file": ("a.png", png_bytes(served.images[0]), "image/png")})
            assert r.status_code == 400 and r.json()["error"] == "missing_metadata"
            assert "operator_note" in r.json()["detail"] and "probe_reading" in r.json()["detail"]
            partial = [records[0], {"operator_note": "x"}, records[2]]
            r = http.post("/predict/batch", files=files, data={"metadata": json.dumps(partial)})
            assert r.status_code == 400 and "(image 1) lacks ['probe_reading']" in r.json()["detail"]
            r = http.post("/predict/batch", files=files, data={"metadata": json.dumps(records)})
            assert r.status_code == 200, r.text
            served_probs = [p["probabilities"] for p in r.json()["predictions"]]
            assert [p["metadata"] for p in r.json()["predictions"]] == records
            unknown = [{"operator_note": None, "probe_reading": None}] * 3  # null: an unknown value
            r = http.post("/predict/batch", files=files, data={"metadata": json.dumps(unknown)})
            assert r.status_code == 200
            assert not np.allclose([list(p["probabilities"].values()) for p in r.json()["predictions"]],
                                   [list(p.values()) for p in served_probs], atol=1e-6)  # the records reach the model
        finally:
            swap_model(app, model_uri=f"models:/{MODEL}/2")
            _metadata_when(http, lambda m: m["model"]["version"] == "2")
    # offline: the same images and records through the extraction stages into a store, then `evaluate`
    # (the stages in-process: a Ray Data job would wait for the CPUs the Serve app holds)
    with_train = pd.concat([rows, served.synth.iloc[3:4].assign(split="train")], ignore_index=True)
    manifest = write_manifest(with_train, served.root / "synth" / "evaluate.csv")
    store = _store_in_process(served.config, manifest, tmp_path)
    _, probs, arrays, classes, _ = evaluate_probabilities(served.config, f"models:/{MODEL}/3", store, "test")
    order = {image_id: i for i, image_id in enumerate(arrays.rows["image_id"])}
    ids = [decode_image_bytes(png_bytes(Path(p))).image_id for p in rows["image_path"]]
    offline = np.array([probs[order[i]] for i in ids])
    np.testing.assert_allclose([[p[c] for c in classes] for p in served_probs], offline, atol=1e-5)


# ---------------------------------------------------------------------------------- batch job
def test_predict_manifest_batch_job(served, tmp_path):
    from ase_ray.serve.batch import predict_manifest

    config = served.config.model_copy(update={"serve": served.config.serve.model_copy(
        update={"predict": served.config.serve.predict.model_copy(update={"num_cpus": 0.5})})})
    result = predict_manifest(config, served.manifest, tmp_path / "pred", model_uri=f"models:/{MODEL}/1")
    df = pd.read_parquet(tmp_path / "pred" / "predictions.parquet")
    assert len(df) == 4 and list(df["row_id"]) == [0, 1, 2, 3]
    assert (df["error"][:3] == "").all() and df["error"][3].startswith("decode")
    assert set(df["predicted_label"][:3]) <= {c.name for c in served.config.data.synth.classes}
    assert df["ocr_text"][0].startswith("LOT") and (df["model_version"] == "1").all()
    assert result.summary["predicted"] == 3 and result.summary["errors"] == 1
    assert (tmp_path / "pred" / "predictions.csv").is_file()


# ---------------------------------------------------------------------------- the CLI, end to end
@pytest.mark.slow
def test_ase_ray_serve_command_serves_until_interrupted(served, tmp_path):
    """`ase-ray serve` in its own process (its own local Ray): the default config names the offline
    backends, the model's recorded settings (tiny) win; SIGINT stops it and frees the port."""
    import shutil
    import signal
    import subprocess
    import sys

    exe = shutil.which("ase-ray", path=str(Path(sys.executable).parent)) or "ase-ray"
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([exe, "serve", "--port", str(port), "--set",
                             f"project.work_dir={served.config.project.work_dir}"],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RAY_DEDUP_LOGS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
        r = httpx.post(f"{url}/predict", files={"file": ("a.png", png_bytes(served.images[0]), "image/png")}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["model"]["version"] == "1" and "LEN" in r.json()["ocr"]["text"]
        meta = httpx.get(f"{url}/metadata", timeout=30).json()
        assert meta["backends"]["image_encoder"]["backend"] == "tiny" and meta["features_source"] == "model"
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-2000:]
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/healthz", timeout=2)
