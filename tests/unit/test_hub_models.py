"""Hub models on a cluster: pinned revisions in the cache key, loading from a pulled models directory.

The pull itself needs the hub (not reachable here); these tests prepare a directory in the layout
`snapshot_download(cache_dir=...)` writes (models--org--name/snapshots/<commit>/..., refs/<revision>)
with tiny random models of the real classes, and load it through the stages' real loading code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ase_ray.config import load_config
from ase_ray.features.base import BackendUnavailable
from ase_ray.features.describe import InstructBlipDescriber, build_tiny_instructblip
from ase_ray.features.hub import HubModel, hub_models, pull_models
from ase_ray.features.image_encoder import ResNetEncoder
from ase_ray.features.reason import build_tiny_causal_lm
from ase_ray.features.settings import DescribeSettings, ImageEncoderSettings, ReasonSettings, TextEncoderSettings
from ase_ray.features.stages import DescribeStage, ImageEncodeStage, ReasonStage, TextEncodeStage
from ase_ray.features.text_encoder import build_tiny_bert
from tests.conftest import REPO

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40
TEXTS = ["LEN 12.4 AREA 0.53", "a bright board with 2 pink dot markers"]


def images(n: int = 2) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)) for _ in range(n)]


def put_in_hub_cache(models_dir: Path, repo_id: str, commit: str, *parts, refs: tuple[str, ...] = ("main",)) -> Path:
    """Save ``parts`` (objects with save_pretrained) as one snapshot of ``repo_id``; point ``refs`` at it."""
    repo = models_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for part in parts:
        part.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def seeded_bert(seed: int):
    import torch

    tokenizer, model = build_tiny_bert()
    torch.manual_seed(seed)
    for parameter in model.parameters():
        parameter.data.normal_(0, 0.2)
    return tokenizer, model


def test_the_text_encoder_stage_loads_bert_from_models_dir_at_its_revision(tmp_path):
    from ase_ray.features.text_encoder import TextEncoder

    tokenizer_a, model_a = seeded_bert(1)
    tokenizer_b, model_b = seeded_bert(2)
    put_in_hub_cache(tmp_path, "tiny-org/bert", COMMIT_A, tokenizer_a, model_a, refs=("main",))
    put_in_hub_cache(tmp_path, "tiny-org/bert", COMMIT_B, tokenizer_b, model_b, refs=("v2",))

    def encoded(revision: str) -> np.ndarray:
        settings = TextEncoderSettings(backend="bert", model_id="tiny-org/bert", revision=revision,
                                       max_length=32, device="cpu")
        return TextEncodeStage(settings, None, str(tmp_path)).backend.encode_batch(TEXTS).pooled

    settings = TextEncoderSettings(backend="tiny", max_length=32, device="cpu")
    expect_a = TextEncoder(settings, tokenizer_a, model_a).encode_batch(TEXTS).pooled
    expect_b = TextEncoder(settings, tokenizer_b, model_b).encode_batch(TEXTS).pooled
    np.testing.assert_allclose(encoded("main"), expect_a, atol=1e-6)
    np.testing.assert_allclose(encoded("v2"), expect_b, atol=1e-6)
    np.testing.assert_allclose(encoded(COMMIT_B), expect_b, atol=1e-6)  # a pinned commit hash
    assert not np.allclose(expect_a, expect_b)


def test_the_image_encoder_stage_loads_resnet_from_models_dir(tmp_path):
    tiny = ResNetEncoder(ImageEncoderSettings(backend="tiny", image_size=64, device="cpu"))
    put_in_hub_cache(tmp_path, "tiny-org/resnet", COMMIT_A, tiny.model)
    settings = ImageEncoderSettings(backend="resnet", model_id="tiny-org/resnet", image_size=64, device="cpu")
    stage = ImageEncodeStage(settings, None, str(tmp_path))
    np.testing.assert_allclose(stage.backend.encode_batch(images()).pooled, tiny.encode_batch(images()).pooled,
                               atol=1e-6)
    assert stage.ran_model["source"] == f"models_dir {tmp_path}" and stage.ran_model["revision"] == "main"


def test_the_reason_stage_loads_the_llm_from_models_dir(tmp_path):
    from ase_ray.features.reason import LlmReasoner

    forward = ReasonSettings(backend="tiny", mode="forward", device="cpu")
    tokenizer, model = build_tiny_causal_lm(forward)
    put_in_hub_cache(tmp_path, "tiny-org/llama", COMMIT_A, tokenizer, model)
    settings = ReasonSettings(backend="hf", model_id="tiny-org/llama", mode="forward", device="cpu")
    loaded = ReasonStage(settings, None, str(tmp_path)).backend
    expected = LlmReasoner(forward, tokenizer, model).reason_batch(TEXTS, TEXTS).hidden
    np.testing.assert_allclose(loaded.reason_batch(TEXTS, TEXTS).hidden, expected, atol=1e-5)


def test_the_describe_stage_loads_instructblip_from_models_dir(tmp_path):
    processor, model = build_tiny_instructblip()
    put_in_hub_cache(tmp_path, "tiny-org/instructblip", COMMIT_A, processor, model)
    settings = DescribeSettings(backend="instructblip", model_id="tiny-org/instructblip", max_new_tokens=4,
                                device="cpu")
    loaded = DescribeStage(settings, None, str(tmp_path)).backend
    tiny = InstructBlipDescriber(DescribeSettings(backend="tiny", max_new_tokens=4, device="cpu"))
    assert loaded.describe_batch(images()) == tiny.describe_batch(images())


def test_a_model_missing_from_models_dir_says_to_pull_it(tmp_path):
    settings = TextEncoderSettings(backend="bert", model_id="bert-base-uncased", device="cpu")
    with pytest.raises(BackendUnavailable, match=f"ase-ray models pull --models-dir {tmp_path}"):
        TextEncodeStage(settings, None, str(tmp_path)).backend  # noqa: B018 - loads the model


@pytest.mark.parametrize("stage_cls, settings_cls", [
    (DescribeStage, DescribeSettings), (ReasonStage, ReasonSettings),
    (ImageEncodeStage, ImageEncoderSettings), (TextEncodeStage, TextEncoderSettings),
])
def test_the_revision_is_part_of_the_stage_cache_key(tmp_path, stage_cls, settings_cls):
    def key(revision: str) -> str:
        return stage_cls(settings_cls(revision=revision), str(tmp_path)).cache.key("image-or-texts")

    assert key("main") == key("main") != key(COMMIT_A)


def test_the_cluster_config_names_every_hub_model_once():
    config = load_config(REPO / "configs" / "cluster.yaml")
    assert config.features.models_dir == Path("/mnt/ase-ray/models")
    assert {(m.repo_id, m.revision) for m in hub_models(config.features)} == {
        ("Salesforce/instructblip-vicuna-7b", "main"), ("meta-llama/Llama-2-7b-chat-hf", "main"),
        ("microsoft/resnet-50", "main"), ("bert-base-uncased", "main"),
    }
    assert hub_models(load_config().features) == []  # the offline defaults load nothing from the hub


def test_pull_downloads_each_model_into_models_dir_and_the_stage_loads_it(tmp_path, monkeypatch):
    """The hub cannot exist here: a stand-in for snapshot_download writes what the real one writes
    (a snapshot and its ref) and records the call; the real loader then reads that directory."""
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        tokenizer, model = seeded_bert(3)
        return str(put_in_hub_cache(Path(kwargs["cache_dir"]), repo_id, COMMIT_A, tokenizer, model,
                                    refs=(kwargs["revision"],)))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    config = load_config(overrides=[f"features.models_dir={tmp_path / 'models'}", "features.text_encoder.backend=bert",
                                    "features.text_encoder.model_id=tiny-org/bert", "features.text_encoder.revision=v1",
                                    "features.text_encoder.device=cpu"])
    lines = []
    pulled = pull_models(config.features, echo=lines.append)
    assert pulled[0][0] == HubModel("text_encoder", "tiny-org/bert", "v1")
    assert calls == [("tiny-org/bert", {"revision": "v1", "cache_dir": str(tmp_path / "models")})]  # no token passed
    assert f"pin it: features.text_encoder.revision={COMMIT_A}" in lines[-1]
    stage = TextEncodeStage(config.features.text_encoder, None, str(tmp_path / "models"))
    assert stage.backend.encode_batch(TEXTS).pooled.shape == (2, 32)


def test_extraction_stops_at_start_when_a_hub_model_was_not_pulled(tmp_path):
    from ase_ray.features.pipeline import check_backends_available

    tokenizer, model = seeded_bert(1)
    put_in_hub_cache(tmp_path, "tiny-org/bert", COMMIT_A, tokenizer, model)
    config = load_config(overrides=[f"features.models_dir={tmp_path}", "features.text_encoder.backend=bert",
                                    "features.text_encoder.model_id=tiny-org/bert"])
    check_backends_available(config)  # pulled: fine
    pinned = load_config(overrides=[
        f"features.models_dir={tmp_path}", "features.text_encoder.backend=bert", "features.reason.backend=hf",
        "features.text_encoder.model_id=tiny-org/bert", f"features.text_encoder.revision={COMMIT_B}",
    ])
    with pytest.raises(BackendUnavailable, match=f"meta-llama/Llama-2-7b-chat-hf at main .*tiny-org/bert at {COMMIT_B}"):
        check_backends_available(pinned)  # an unpulled model, and a revision that was not pulled
