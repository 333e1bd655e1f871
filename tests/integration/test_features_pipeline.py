"""The Ray Data extraction on real tesseract and tiny model configs: store, errors, cache, MLflow."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from ase_ray.config import load_config
from ase_ray.data.manifest import read_manifest
from ase_ray.features.pipeline import extract_features
from ase_ray.features.store import load_store, stack
from ase_ray.tracking import tracking_uri
from tests.conftest import synthetic_with_a_corrupt_image

pytestmark = pytest.mark.integration

TINY = [
    "features.describe.backend=tiny", "features.reason.backend=tiny", "features.image_encoder.backend=tiny",
    "features.text_encoder.backend=tiny", "features.describe.max_new_tokens=4",
]
RAN = {"ocr": "tesseract", "describe": "tiny-random-instructblip", "reason": "tiny-random-llama",
       "image_encoder": "tiny-random-resnet", "text_encoder": "tiny-random-bert"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("feat")
    synthetic_with_a_corrupt_image(root, scale=0.02, seed=5)
    return root


def _config(root, *extra):
    return load_config(overrides=[f"project.work_dir={root / 'work'}", *TINY, *extra])


def test_store_errors_cache_and_mlflow(ray_session, dataset):
    manifest = dataset / "synth" / "manifest.csv"
    n = len(read_manifest(manifest))
    cfg = _config(dataset, "features.shard_rows=4")
    first = extract_features(cfg, manifest, dataset / "store")
    assert first.summary["rows"] == n
    # The workers wrote the store: shards of at most 4 rows each, read back as one table in row order.
    shards = sorted((dataset / "store" / "features.parquet").glob("part-*.parquet"))
    assert len(shards) >= (n - 1 + 3) // 4 and all(pd.read_parquet(s).shape[0] <= 4 for s in shards)
    assert first.summary["stored"] == n - 1 and first.summary["errors"] == 1
    errors = pd.read_parquet(dataset / "store" / "errors.parquet")
    assert errors.loc[0, "stage"] == "decode" and errors.loc[0, "image_path"].endswith("corrupt.png")

    store = load_store(dataset / "store")
    features = pd.read_parquet(dataset / "store" / "features.parquet")  # plain pandas reads it
    assert len(features) == n - 1
    assert list(store.features["row_id"]) == list(range(n - 1))  # the corrupt image was the last row
    assert list(store.features["image_path"]) == list(read_manifest(manifest)["image_path"][: n - 1])
    assert features["ocr_text"].str.contains("LEN").all()
    fields = json.loads(features.loc[0, "ocr_fields"])
    assert {"LEN", "AREA", "DIFF"} <= set(fields) and isinstance(fields["DIFF"], float)
    tokens = stack(store, "image_tokens")
    assert tokens.shape[0] == n - 1 and tokens.ndim == 3
    assert stack(store, "text_ocr_mask").shape[:1] == (n - 1,)
    assert store.meta["backends"]["reason"]["backend"] == "tiny"
    # What ran, not the cluster's model ids that the tiny backends never read.
    assert {s: m["model"] for s, m in store.meta["backends"].items()} == RAN
    assert json.loads((dataset / "store" / "store.json").read_text())["backends"] == store.meta["backends"]
    # forward mode: no reasoning text (absent, flagged); every other source varies; nothing is cut
    assert features["reasoning"].eq("").all()
    assert first.summary["absent_sources"] == ["reasoning"] and "reasoning" in first.summary["constant_sources"]
    assert store.meta["constant_sources"] == first.summary["constant_sources"]
    assert store.meta["text_stats"]["ocr"]["pooled_std"] > 0 and not store.meta["text_stats"]["ocr"]["constant"]
    assert store.meta["text_stats"]["ocr"]["tokens_cut"] == 0 and (features["text_ocr_tokens_cut"] == 0).all()
    assert store.meta["features"]["reason"]["domain"] == "automated optical inspection image"  # dataset.yaml

    assert first.summary["models_loaded"]["text_encoder"] >= 1
    second = extract_features(cfg, manifest, dataset / "store2")
    for stage in ("ocr", "describe", "reason", "image_encoder", "text_encoder"):
        assert second.summary["stages"][stage]["cache_hits"] == n - 1, stage
    assert second.summary["from_cache"] == n - 1
    assert second.summary["models_loaded"] == dict.fromkeys(RAN, 0)  # an all-hit run loads no model
    # The cache is Parquet shards, one per stage batch (no file per entry).
    describe_shards = list((dataset / "work" / "cache" / "describe").rglob("*.parquet"))
    assert 1 <= len(describe_shards) < n - 1 and not list((dataset / "work" / "cache").rglob("*.npz"))
    again = load_store(dataset / "store2")
    assert (again.features["ocr_text"] == store.features["ocr_text"]).all()

    client = MlflowClient(tracking_uri(cfg))
    runs = client.search_runs([client.get_experiment_by_name("ase-ray").experiment_id],
                              "tags.`ase_ray.stage` = 'features'")
    assert len(runs) == 2
    run = runs[0]
    assert run.data.params["features.reason.backend"] == "tiny"
    assert {s: run.data.params[f"ran.{s}.model"] for s in RAN} == RAN
    assert {s: run.data.tags[f"ase_ray.model.{s}"] for s in RAN} == RAN
    assert not [k for k in run.data.params if k.endswith((".model_id", ".revision"))]  # no Llama-2 "ran"
    assert run.data.metrics["errors"] == 1 and run.data.metrics["rows"] == n
    assert run.data.metrics["text_ocr_tokens_cut"] == 0 and run.data.metrics["text_ocr_pooled_std"] > 0
    assert "reasoning" in run.data.tags["ase_ray.constant_sources"].split(",")
    assert run.data.tags["ase_ray.absent_sources"] == "reasoning"
    assert "sample_texts.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_changed_setting_recomputes_only_that_stage(ray_session, dataset):
    manifest = dataset / "synth" / "manifest.csv"
    # The two-pool layout (fuse_cpu_stages) reads the cache the one pool (the default) wrote.
    cfg = _config(dataset, "features.describe.max_new_tokens=3", "features.fuse_all_stages=false")
    result = extract_features(cfg, manifest, dataset / "store3", track=False)
    stages = result.summary["stages"]
    assert stages["ocr"]["cache_hits"] == result.summary["stored"]
    assert stages["image_encoder"]["cache_hits"] == result.summary["stored"]
    assert stages["describe"]["cache_hits"] == 0
    assert result.summary["models_loaded"]["describe"] >= 1 and result.summary["models_loaded"]["ocr"] == 0


@pytest.mark.parametrize("engine", ["library", "binary"])
def test_missing_tesseract_fails_at_start(ray_session, dataset, monkeypatch, engine):
    import pytesseract

    from ase_ray.features.base import BackendUnavailable

    monkeypatch.setattr(pytesseract.pytesseract, "tesseract_cmd", "/nonexistent/tesseract")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("ASE_RAY_LIBTESSERACT", "/nonexistent/libtesseract.so.5")
    config = _config(dataset, f"features.ocr.engine={engine}")
    expected = "libtesseract not found" if engine == "library" else "tesseract binary"
    with pytest.raises(BackendUnavailable, match=expected):
        extract_features(config, dataset / "synth" / "manifest.csv", dataset / "store4", track=False)


def test_a_manifest_whose_rows_all_fail_gets_an_empty_store_the_errors_and_a_message(ray_session, dataset, tmp_path):
    from ase_ray.errors import DataError

    # Files that exist but are no images: a manifest whose every image is missing is refused before
    # any work (tests/unit/bad_input_cases.py), this one fails row by row at decode.
    moved = tmp_path / "elsewhere" / "manifest.csv"
    (moved.parent / "images").mkdir(parents=True)
    for i in range(5):
        (moved.parent / "images" / f"broken_{i}.png").write_bytes(b"not a png %d" % i)
    rows = read_manifest(dataset / "synth" / "manifest.csv").head(5)
    rows.assign(image_path=[f"images/broken_{i}.png" for i in range(5)]).to_csv(moved, index=False)
    with pytest.raises(DataError, match="every one of the 5 images failed extraction") as err:
        extract_features(_config(dataset), moved, tmp_path / "store", track=False)
    assert "errors.parquet" in str(err.value)
    store = load_store(tmp_path / "store")
    assert len(store.features) == 0 and len(store.errors) == 5 and store.meta["rows"] == 0
    assert set(store.errors["stage"]) == {"decode"}
    with pytest.raises(DataError, match="no rows: every image failed"):
        stack(store, "image_pooled")
