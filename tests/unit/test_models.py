"""The pure-torch model package: settings, projections, CMAF and baselines, PFA loss and schedule, I/O."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from ase_ray.errors import DataError
from ase_ray.models.classifier import build_model, compute_loss
from ase_ray.models.fusion import CmafFusion
from ase_ray.models.io import load_model, save_model
from ase_ray.models.pfa import class_aware_info_nce, self_similarity
from ase_ray.models.projections import FeatureDims, dims_from_batch
from ase_ray.models.schedule import progressive_schedule, select_subset
from ase_ray.models.settings import TEXT_SOURCES, ModelSettings, PfaSettings

KINDS = ["image_only", "text_only", "concat", "gated", "cmaf"]
B, DI, N, DT, L, H = 6, 24, 9, 16, 7, 20
SMALL = dict(d_model=16, heads=4, head_hidden=16)


def make_batch(b: int = B, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random features; text masks have 2..L real tokens (the rest padded with zeros, as in the store)."""
    g = torch.Generator().manual_seed(seed)
    batch = {
        "image_pooled": torch.randn(b, DI, generator=g),
        "image_tokens": torch.randn(b, N, DI, generator=g),
        "llm_hidden": torch.randn(b, H, generator=g),
    }
    for src in TEXT_SOURCES:
        lengths = torch.randint(2, L + 1, (b,), generator=g)
        mask = (torch.arange(L)[None, :] < lengths[:, None]).to(torch.int8)
        batch[f"text_{src}_pooled"] = torch.randn(b, DT, generator=g)
        batch[f"text_{src}_tokens"] = torch.randn(b, L, DT, generator=g) * mask[..., None]
        batch[f"text_{src}_mask"] = mask
    return batch


def model_for(kind: str, pfa: bool = True, num_classes: int = 3, **overrides):
    torch.manual_seed(0)
    settings = ModelSettings(kind=kind, **{**SMALL, **overrides})
    return build_model(settings, dims_from_batch(make_batch()), num_classes, PfaSettings(enabled=pfa, proj_dim=8))


# ---------------------------------------------------------------------------------------- settings
def test_settings_defaults_and_validation():
    s = ModelSettings()
    assert (s.kind, s.d_model, s.heads, s.dropout, s.head_hidden) == ("cmaf", 128, 4, 0.1, 128)
    assert s.text_sources == list(TEXT_SOURCES) and s.use_llm_hidden
    p = PfaSettings()
    assert (p.enabled, p.temperature, p.align_weight, p.first_fraction, p.stride) == (True, 0.07, 0.5, 0.2, 0.2)
    assert (p.epochs_per_stage, p.ordering, p.proj_dim) == (5, "easy_first", 64)
    bad = [
        lambda: ModelSettings(d_model=30, heads=4),
        lambda: ModelSettings(kind="transformer"),
        lambda: ModelSettings(text_sources=[]),
        lambda: ModelSettings(text_sources=["ocr", "ocr"]),
        lambda: ModelSettings(dropout=1.0),
        lambda: ModelSettings(text_pooling="max"),
        lambda: ModelSettings(text_pool_queries=0),
        lambda: ModelSettings(unknown=1),
        lambda: PfaSettings(temperature=0),
        lambda: PfaSettings(first_fraction=0),
        lambda: PfaSettings(stride=1.5),
        lambda: PfaSettings(epochs_per_stage=0),
        lambda: PfaSettings(ordering="random"),
    ]
    for make in bad:
        with pytest.raises(ValidationError):
            make()


def test_dims_come_from_the_data():
    expected = FeatureDims(image_dim=DI, image_tokens=N, text_dim=DT, text_len=L, llm_dim=H)
    assert dims_from_batch(make_batch()) == expected
    batch = make_batch()
    del batch["llm_hidden"]
    assert dims_from_batch(batch).llm_dim == 0
    with pytest.raises(DataError, match="llm_hidden"):
        build_model(ModelSettings(kind="cmaf", **SMALL), dims_from_batch(batch), 3)
    with pytest.raises(DataError, match="image_tokens"):
        dims_from_batch({"image_pooled": torch.zeros(2, DI)})


def test_wrong_input_width_is_a_clear_error():
    model = model_for("concat")
    batch = make_batch()
    batch["image_pooled"] = torch.zeros(B, DI + 1)
    with pytest.raises(DataError, match="width"):
        model(batch)


# ---------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_classes", [2, 5])
def test_output_shapes(kind, num_classes):
    out = model_for(kind, num_classes=num_classes)(make_batch())
    assert out["logits"].shape == (B, num_classes)
    assert out["img_align"].shape == out["txt_align"].shape == (B, 8)
    assert torch.allclose(out["img_align"].norm(dim=-1), torch.ones(B), atol=1e-5)
    assert ("gates" in out) == (kind in ("gated", "cmaf"))
    no_pfa = model_for(kind, pfa=False, num_classes=num_classes)(make_batch())
    assert set(no_pfa) == {"logits"} | ({"gates"} if kind in ("gated", "cmaf") else set())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pfa", [True, False])
def test_gradient_reaches_every_parameter(kind, pfa):
    model = model_for(kind, pfa=pfa).train()
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    loss, parts = compute_loss(model(make_batch()), labels, PfaSettings(enabled=pfa, proj_dim=8))
    assert ("align" in parts) == pfa
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", KINDS)
def test_padded_text_tokens_do_not_change_outputs(kind):
    model = model_for(kind).eval()
    batch = make_batch()
    noisy = dict(batch)
    for src in TEXT_SOURCES:
        pad = (batch[f"text_{src}_mask"] == 0)[..., None]
        assert pad.any()
        noisy[f"text_{src}_tokens"] = torch.where(pad, torch.randn(B, L, DT) * 100, batch[f"text_{src}_tokens"])
    with torch.no_grad():
        a, b = model(batch), model(noisy)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key


@pytest.mark.parametrize("kind", ["cmaf", "concat"])
def test_padding_past_every_rows_last_token_is_trimmed_without_changing_outputs(kind):
    """The store pads every text to text_len; CMAF and attention pooling cut a batch to its longest text
    (the demo's descriptions fill 85 of 128 positions), with the same outputs as the padded batch."""
    model = model_for(kind, text_pooling="attention").eval()
    batch = make_batch()
    padded = dict(batch)
    for src in TEXT_SOURCES:
        padded[f"text_{src}_tokens"] = torch.cat([batch[f"text_{src}_tokens"], torch.zeros(B, 9, DT)], dim=1)
        padded[f"text_{src}_mask"] = torch.cat([batch[f"text_{src}_mask"], torch.zeros(B, 9, dtype=torch.int8)], dim=1)
    with torch.no_grad():
        a, b = model(batch), model(padded)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)


def test_empty_text_row_gives_finite_outputs():
    model = model_for("cmaf", use_llm_hidden=False, text_sources=["ocr"]).eval()
    batch = make_batch()
    batch["text_ocr_mask"][0] = 0
    with torch.no_grad():
        assert torch.isfinite(model(batch)["logits"]).all()


def test_cross_attention_attends_over_the_text_sequence():
    model = model_for("cmaf", use_llm_hidden=False, text_sources=["description"]).eval()
    batch = make_batch()
    changed = dict(batch)
    tokens = batch["text_description_tokens"].clone()
    tokens[:, 1] += 3.0  # position 1 is real in every row (>= 2 real tokens)
    changed["text_description_tokens"] = tokens
    with torch.no_grad():
        a, b = model(batch), model(changed)
    assert not torch.allclose(a["logits"], b["logits"], atol=1e-4)
    # the image side alone (image queries attending text keys) must see the change too
    torch.manual_seed(0)
    fusion = CmafFusion(16, 4, 0.0).eval()
    img, txt = torch.randn(B, N, 16), torch.randn(B, L, 16)
    mask = torch.ones(B, L, dtype=torch.bool)
    txt2 = txt.clone()
    txt2[:, 3] += 1.0
    with torch.no_grad():
        fused_a, _ = fusion(img, txt, mask)
        fused_b, _ = fusion(img, txt2, mask)
        img_side = fusion.image_to_text(img, txt, mask)
    assert not torch.allclose(fused_a[:, :16], fused_b[:, :16], atol=1e-4)
    assert not torch.allclose(img_side[:, 0], img_side[:, 1], atol=1e-4)  # tokens stay distinct


@pytest.mark.parametrize("kind", ["gated", "cmaf"])
def test_gates_are_in_the_open_unit_interval(kind):
    gates = model_for(kind)(make_batch())["gates"]
    assert gates.shape == (B, 2)
    assert ((gates > 0) & (gates < 1)).all()


# ---------------------------------------------------------------------------------------- PFA loss
def test_info_nce_prefers_class_agreement():
    torch.manual_seed(0)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    centers = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    img = torch.nn.functional.normalize(centers[labels] + 0.05 * torch.randn(8, 8), dim=-1)
    txt = torch.nn.functional.normalize(centers[labels] + 0.05 * torch.randn(8, 8), dim=-1)
    agree = class_aware_info_nce(img, txt, labels, 0.1)
    shuffled = class_aware_info_nce(img, txt[torch.tensor([2, 4, 6, 0, 3, 7, 1, 5])], labels, 0.1)
    assert agree < shuffled


def test_info_nce_hand_values():
    eye = torch.eye(2)
    # different classes, t=1: logits = I, each row -log(e / (e + 1)) = log(1 + e^-1), both directions
    value = class_aware_info_nce(eye, eye, torch.tensor([0, 1]), 1.0).item()
    assert math.isclose(value, math.log(1 + math.exp(-1)), rel_tol=1e-6)
    # same class: both entries positive, -(log p_same + log p_other) / 2 = log(1 + e) - 1/2
    value = class_aware_info_nce(eye, eye, torch.tensor([0, 0]), 1.0).item()
    assert math.isclose(value, math.log(1 + math.e) - 0.5, rel_tol=1e-6)
    # asymmetric 2x2: img = [e1, e1], txt = [e1, e2], classes differ, t = 0.5
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # logits = [[2, 0], [2, 0]]; i->t: row0 -log sm(2 vs 0), row1 -log sm(0 vs 2); t->i rows [2,2],[0,0]: log 2 each
    i2t = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(2))) / 2
    expected = 0.5 * (i2t + math.log(2))
    assert math.isclose(class_aware_info_nce(img, txt, torch.tensor([0, 1]), 0.5).item(), expected, rel_tol=1e-6)


def test_compute_loss_adds_weighted_alignment():
    model = model_for("cmaf")
    out = model(make_batch())
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    pfa = PfaSettings(proj_dim=8, align_weight=0.25, temperature=0.2)
    total, parts = compute_loss(out, labels, pfa)
    assert math.isclose(parts["loss"], parts["ce"] + 0.25 * parts["align"], rel_tol=1e-5)
    assert math.isclose(total.item(), parts["loss"], rel_tol=1e-6)
    total_off, parts_off = compute_loss(out, labels, PfaSettings(enabled=False))
    assert set(parts_off) == {"ce", "loss"} and math.isclose(total_off.item(), parts["ce"], rel_tol=1e-6)


def test_self_similarity_is_a_cosine_per_sample_and_keeps_mode():
    model = model_for("concat").train()
    sim = self_similarity(model, make_batch())
    assert sim.shape == (B,) and (sim.abs() <= 1 + 1e-5).all()
    assert model.training
    with pytest.raises(ValueError, match="alignment heads"):
        self_similarity(model_for("concat", pfa=False), make_batch())


# ---------------------------------------------------------------------------------------- schedule
@pytest.mark.parametrize(
    "n,first,stride,per_stage,total",
    [(100, 0.2, 0.2, 5, 30), (100, 0.2, 0.2, 5, 12), (7, 0.3, 0.25, 2, 9), (10, 0.1, 0.05, 1, 40),
     (50, 1.0, 0.5, 3, 4), (13, 0.2, 0.2, 5, 3), (1, 0.5, 0.5, 2, 5), (100, 0.07, 0.07, 2, 5)],
)
def test_progressive_schedule_grows_by_stride_and_ends_full(n, first, stride, per_stage, total):
    sizes = progressive_schedule(n, first, stride, per_stage, total)
    assert len(sizes) == total
    assert sizes[-1] == n
    assert all(a <= b for a, b in zip(sizes, sizes[1:]))
    assert all(1 <= s <= n for s in sizes)
    step = max(1, math.ceil(stride * n - 1e-9))
    stages = [sizes[i] for i in range(0, total, per_stage)]
    assert all(len({sizes[i] for i in range(k, min(k + per_stage, total))}) == 1 for k in range(0, total, per_stage))
    if len(stages) > 1:
        assert stages[0] == min(n, max(1, math.ceil(first * n - 1e-9)))
    for a, b in zip(stages[:-2], stages[1:-1]):
        assert b == min(n, a + step)  # every stage but the (possibly forced) last grows by the stride


def test_progressive_schedule_documented_examples():
    assert progressive_schedule(100, 0.2, 0.2, 5, 30) == [20] * 5 + [40] * 5 + [60] * 5 + [80] * 5 + [100] * 10
    assert progressive_schedule(100, 0.2, 0.2, 5, 12) == [20] * 5 + [40] * 5 + [100] * 2
    assert progressive_schedule(100, 0.07, 0.07, 1, 3) == [7, 14, 100]
    assert progressive_schedule(10, 0.2, 0.2, 5, 3) == [10] * 3  # one stage: the full set
    assert progressive_schedule(10, 0.2, 0.2, 5, 0) == []
    with pytest.raises(ValueError):
        progressive_schedule(0, 0.2, 0.2, 5, 10)


def test_select_subset_per_class_keeps_every_class_share_in_each_stage():
    # Class 1 (rare) matches its texts worst: the global ranking leaves it out of the first half.
    sim = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.2, 0.1])
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    assert select_subset(sim, 4, "easy_first").tolist() == [0, 1, 2, 3]
    half = select_subset(sim, 4, "easy_first", labels).tolist()
    assert half == [0, 1, 2, 6]  # shares 1/6, 2/6, 3/6 and class 1's best 1/2 (a tie: more similar first)
    assert select_subset(sim, 2, "hard_first", labels).tolist() == [5, 4]
    assert select_subset(sim, 8, "easy_first", labels).tolist() == [0, 1, 2, 6, 3, 4, 5, 7]
    with pytest.raises(ValueError, match="labels has 3 entries"):
        select_subset(sim, 2, "easy_first", labels[:3])


def test_select_subset_orders_by_similarity_with_stable_ties():
    sim = np.array([0.1, 0.9, 0.5, 0.9, -0.3, 0.5])
    assert select_subset(sim, 4, "easy_first").tolist() == [1, 3, 2, 5]
    assert select_subset(sim, 4, "hard_first").tolist() == [4, 0, 2, 5]
    assert select_subset(sim, 6, "easy_first").tolist() == [1, 3, 2, 5, 0, 4]
    assert select_subset(sim, 0, "hard_first").tolist() == []
    with pytest.raises(ValueError):
        select_subset(sim, 7, "easy_first")
    with pytest.raises(ValueError):
        select_subset(np.array([0.1, np.nan]), 1, "easy_first")


# ---------------------------------------------------------------------------------------- I/O
@pytest.mark.parametrize("kind,pfa", [("cmaf", True), ("gated", False), ("text_only", True)])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, kind, pfa):
    model = model_for(kind, pfa=pfa).eval()
    classes = ["normal", "scratch", "void"]
    save_model(model, tmp_path / "m", model.settings, model.dims, classes, {"epoch": 3})
    assert (tmp_path / "m" / "weights.pt").is_file() and (tmp_path / "m" / "model.json").is_file()
    loaded, meta = load_model(tmp_path / "m")
    assert not loaded.training
    assert meta["classes"] == classes and meta["extra"] == {"epoch": 3}
    assert meta["settings"]["kind"] == kind and meta["dims"]["image_dim"] == DI
    batch = make_batch(seed=3)
    with torch.no_grad():
        a, b = model(batch), loaded(batch)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    with pytest.raises(ValueError):
        save_model(model, tmp_path / "x", ModelSettings(kind="concat", **SMALL), model.dims, classes, {})


# ---------------------------------------------------------------------------------------- training
def separable_problem(n: int = 48, classes: int = 3, seed: int = 0):
    """Each class shifts its image tokens and its text tokens along its own random direction."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    batch = make_batch(n, seed=seed + 1)
    img_dirs, txt_dirs = torch.randn(classes, DI, generator=g), torch.randn(classes, DT, generator=g)
    batch["image_tokens"] = batch["image_tokens"] + 1.5 * img_dirs[labels][:, None, :]
    batch["image_pooled"] = batch["image_tokens"].mean(dim=1)
    for src in TEXT_SOURCES:
        mask = batch[f"text_{src}_mask"]
        tokens = batch[f"text_{src}_tokens"] + 1.5 * txt_dirs[labels][:, None, :]
        batch[f"text_{src}_tokens"] = tokens * mask[..., None]
        batch[f"text_{src}_pooled"] = tokens.mul(mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return batch, labels


@pytest.mark.parametrize("kind", ["cmaf", "concat"])
def test_tiny_training_loop_fits_a_separable_problem(kind):
    batch, labels = separable_problem()
    model = model_for(kind, num_classes=3).train()
    pfa = PfaSettings(proj_dim=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        optimizer.zero_grad()
        loss, _ = compute_loss(model(batch), labels, pfa)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(batch)["logits"].argmax(-1) == labels).float().mean().item()
    assert accuracy > 0.9


# ------------------------------------------------------------------------------ the numeric block
@pytest.mark.parametrize("kind", ["text_only", "concat", "gated", "cmaf"])
def test_the_numeric_block_is_an_input_of_its_own(kind):
    from ase_ray.models.inference import feature_shapes

    batch = {**make_batch(), "numeric": torch.randn(B, 6, generator=torch.Generator().manual_seed(1))}
    torch.manual_seed(0)
    model = build_model(ModelSettings(kind=kind, **SMALL), dims_from_batch(batch), 3).eval()
    assert model.dims.numeric_dim == 6 and model.text.extra_entries == 2  # the LLM vector and the block
    with torch.no_grad():
        logits = model(batch)["logits"]
        moved = model({**batch, "numeric": batch["numeric"] + 3.0})["logits"]
    assert not torch.allclose(logits, moved)
    meta = {"dims": dataclasses.asdict(model.dims), "settings": model.settings.model_dump(mode="json")}
    assert feature_shapes(meta)["numeric"] == (6,)
    # without numeric sources the block is not built, and not asked for
    off = build_model(ModelSettings(kind=kind, numeric_sources=[], **SMALL), dims_from_batch(batch), 3)
    assert off.text.numeric is None
    assert "numeric" not in feature_shapes({"dims": dataclasses.asdict(off.dims), "settings": off.settings.model_dump()})


def test_cmaf_pools_text_as_the_mean_of_each_inputs_mean():
    from ase_ray.models.fusion import segment_mean

    x = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 0, 0, 0, 1]], dtype=torch.bool)
    segments = torch.tensor([0, 0, 0, 1, 2])  # a 3-token text, then two one-token inputs
    out = segment_mean(x, mask, segments, 3)
    first = (x[0, :2].mean(0) + x[0, 3] + x[0, 4]) / 3
    second = (x[1, 0] + x[1, 4]) / 2  # segment 1 has no real token in row 1: left out
    torch.testing.assert_close(out, torch.stack([first, second]))
    model = model_for("cmaf", pfa=False)
    ids = model.text.token_segments([L] * len(TEXT_SOURCES), "cpu")
    assert ids.tolist() == [i for i in range(len(TEXT_SOURCES)) for _ in range(L)] + [len(TEXT_SOURCES)]
    _, mask, segments = model.text.tokens(make_batch())
    assert segments.shape == mask.shape[1:] and segments.tolist() == sorted(segments.tolist())


# ------------------------------------------------------------------- attention pooling of the texts
def test_attention_pooling_reads_the_token_states_and_mean_pooling_the_stored_vector():
    batch = make_batch()
    tokens = batch["text_ocr_tokens"].clone()
    tokens[:, 1] += 3.0  # position 1 is real in every row
    token_changed = {**batch, "text_ocr_tokens": tokens}
    pooled_changed = {**batch, "text_ocr_pooled": batch["text_ocr_pooled"] + 3.0}
    attention = model_for("text_only", pfa=False).eval()
    mean = model_for("text_only", pfa=False, text_pooling="mean").eval()
    assert ModelSettings().text_pooling == "attention" and attention.text.token_pool is not None
    assert mean.text.token_pool is None and model_for("cmaf").text.token_pool is None  # cmaf reads tokens itself
    assert attention.text.pooled_entries == len(TEXT_SOURCES) * 4 and mean.text.pooled_entries == len(TEXT_SOURCES)
    with torch.no_grad():
        base_a, base_m = attention(batch)["logits"], mean(batch)["logits"]
        assert not torch.allclose(attention(token_changed)["logits"], base_a, atol=1e-4)
        torch.testing.assert_close(attention(pooled_changed)["logits"], base_a)
        assert not torch.allclose(mean(pooled_changed)["logits"], base_m, atol=1e-4)
        torch.testing.assert_close(mean(token_changed)["logits"], base_m)


def order_problem(n: int = 64, seed: int = 0):
    """Class 0 writes pattern u then v, class 1 v then u: the mean of the tokens is the same for both."""
    patterns = torch.Generator().manual_seed(0)
    u, v = torch.randn(DT, generator=patterns) * 2, torch.randn(DT, generator=patterns) * 2
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    batch = make_batch(n, seed=seed + 1)
    for src in TEXT_SOURCES:
        mask = torch.zeros(n, L, dtype=torch.int8)
        mask[:, :3] = 1
        tokens = torch.zeros(n, L, DT)
        tokens[:, 2] = torch.randn(n, DT, generator=g) * 0.3  # row noise
        tokens[:, 0] = torch.where(labels[:, None] == 0, u, v)
        tokens[:, 1] = torch.where(labels[:, None] == 0, v, u)
        batch[f"text_{src}_tokens"], batch[f"text_{src}_mask"] = tokens, mask
        batch[f"text_{src}_pooled"] = tokens[:, :3].mean(dim=1)
    return batch, labels


def held_out_accuracy(model, problem, steps: int, held_out_seed: int) -> float:
    """Train ``model`` with Adam on ``problem()`` for ``steps`` full-batch steps; accuracy on
    ``problem(seed=held_out_seed)``."""
    batch, labels = problem()
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        loss, _ = compute_loss(model(batch), labels, None)
        loss.backward()
        optimizer.step()
    model.eval()
    held_out, held_out_labels = problem(seed=held_out_seed)
    with torch.no_grad():
        return (model(held_out)["logits"].argmax(-1) == held_out_labels).float().mean().item()


@pytest.mark.parametrize("pooling", ["attention", "mean"])
def test_attention_pooling_keeps_what_the_mean_averages_away(pooling):
    model = model_for("text_only", pfa=False, num_classes=2, use_llm_hidden=False, text_sources=["ocr"],
                      numeric_sources=[], text_pooling=pooling)
    accuracy = held_out_accuracy(model, order_problem, steps=80, held_out_seed=7)
    if pooling == "attention":
        assert accuracy > 0.95
    else:  # both classes give the same pooled vectors up to the row noise: what it learnt is the noise
        assert accuracy < 0.7


def test_a_format_1_model_loads_with_mean_pooled_texts(tmp_path):
    import json

    model = model_for("concat", text_pooling="mean").eval()
    save_model(model, tmp_path / "m", model.settings, model.dims, ["a", "b", "c"], {})
    meta_path = tmp_path / "m" / "model.json"
    meta = json.loads(meta_path.read_text())
    assert meta["format"] == 3
    meta["format"] = 1
    for key in ("text_pooling", "text_pool_queries", "text_pool_layers"):
        del meta["settings"][key]
    meta_path.write_text(json.dumps(meta))
    loaded, _ = load_model(tmp_path / "m")
    assert loaded.settings.text_pooling == "mean"
    batch = make_batch(seed=4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch)["logits"], model(batch)["logits"])


@pytest.mark.parametrize("kind", KINDS)
def test_a_wider_pooled_image_vector_gets_its_own_projection(kind):
    from ase_ray.models.inference import feature_shapes

    batch = {**make_batch(), "image_pooled": torch.randn(B, 3 * DI, generator=torch.Generator().manual_seed(2))}
    dims = dims_from_batch(batch)
    assert (dims.image_dim, dims.image_pooled_dim, dims.pooled_image_dim) == (DI, 3 * DI, 3 * DI)
    assert dims_from_batch(make_batch()).image_pooled_dim == 0  # same width: one shared map, as before
    torch.manual_seed(0)
    model = build_model(ModelSettings(kind=kind, **SMALL), dims, 3, PfaSettings(proj_dim=8)).train()
    loss, _ = compute_loss(model(batch), torch.tensor([0, 1, 2, 0, 1, 2]), PfaSettings(proj_dim=8))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    meta = {"dims": dataclasses.asdict(dims), "settings": model.settings.model_dump(mode="json")}
    assert feature_shapes(meta)["image_pooled"] == (3 * DI,) and feature_shapes(meta)["image_tokens"] == (N, DI)
    with pytest.raises(DataError, match="width"):
        model(make_batch())


def planted_patch_problem(n: int = 96, seed: int = 0):
    """Class 1 has +v on one random patch and -v on another: its mean over the patches is unchanged."""
    patterns = torch.Generator().manual_seed(0)
    v = torch.randn(DI, generator=patterns) * 3
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    batch = make_batch(n, seed=seed + 1)
    tokens = torch.randn(n, N, DI, generator=g) * 0.5
    for row in torch.nonzero(labels == 1).flatten().tolist():
        i, j = torch.randperm(N, generator=g)[:2].tolist()
        tokens[row, i] += v
        tokens[row, j] -= v
    batch["image_tokens"], batch["image_pooled"] = tokens, tokens.mean(dim=1)
    return batch, labels


@pytest.mark.parametrize("pooling", ["attention", "stored"])
def test_patch_attention_finds_a_planted_patch_the_mean_hides(pooling):
    model = model_for("image_only", pfa=False, num_classes=2, image_pooling=pooling)
    assert (model.image.patch_pool is not None) == (pooling == "attention")
    accuracy = held_out_accuracy(model, planted_patch_problem, steps=120, held_out_seed=9)
    if pooling == "attention":
        assert accuracy > 0.9
    else:
        assert accuracy < 0.7


@pytest.mark.parametrize("kind", KINDS)
def test_patch_attention_trains_every_parameter_and_round_trips(kind, tmp_path):
    model = model_for(kind, image_pooling="attention").train()
    loss, _ = compute_loss(model(make_batch()), torch.tensor([0, 1, 2, 0, 1, 2]), PfaSettings(proj_dim=8))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.eval()
    save_model(model, tmp_path / "m", model.settings, model.dims, ["a", "b", "c"], {})
    loaded, _ = load_model(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(loaded(make_batch(seed=5))["logits"], model(make_batch(seed=5))["logits"])


def test_the_model_divides_its_logits_by_its_temperature(tmp_path):
    from ase_ray.models.io import WEIGHTS_FILE

    model = model_for("concat").eval()
    batch = make_batch()
    with torch.no_grad():
        plain = model(batch)["logits"]
        model.temperature.fill_(2.5)
        torch.testing.assert_close(model(batch)["logits"], plain / 2.5)
    save_model(model, tmp_path / "m", model.settings, model.dims, ["a", "b", "c"], {})
    loaded, _ = load_model(tmp_path / "m")
    assert float(loaded.temperature) == 2.5
    state = torch.load(tmp_path / "m" / WEIGHTS_FILE, weights_only=True)
    del state["temperature"]  # a model saved before calibration existed
    torch.save(state, tmp_path / "m" / WEIGHTS_FILE)
    old, _ = load_model(tmp_path / "m")
    with torch.no_grad():
        assert float(old.temperature) == 1.0
        torch.testing.assert_close(old(batch)["logits"], plain)


@pytest.mark.parametrize("kind", ["concat", "gated", "cmaf"])
def test_image_logits_start_from_the_image_decision_and_learn_a_text_correction(kind, tmp_path):
    model = model_for(kind, pfa=False, image_logits=True).eval()
    batch, other_texts = make_batch(seed=1), make_batch(seed=2)
    texts_swapped = {k: (other_texts[k] if k.startswith("text_") or k == "llm_hidden" else v) for k, v in batch.items()}
    with torch.no_grad():  # the fused head starts at zero: the texts do not move the logits yet
        assert torch.equal(model(batch)["logits"], model(texts_swapped)["logits"])
        assert torch.allclose(model(batch)["logits"], model.image_head(model.image.pooled(batch)))
    # Only the texts separate the classes: the fused head must learn the whole decision.
    problem, labels = separable_problem()
    noise = torch.Generator().manual_seed(9)
    problem["image_tokens"] = torch.randn(problem["image_tokens"].shape, generator=noise)
    problem["image_pooled"] = problem["image_tokens"].mean(dim=1)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        optimizer.zero_grad()
        compute_loss(model(problem), labels, None)[0].backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        assert (model(problem)["logits"].argmax(-1) == labels).float().mean().item() > 0.9
        assert not torch.equal(model(batch)["logits"], model(texts_swapped)["logits"])
    save_model(model, tmp_path / "m", model.settings, model.dims, ["a", "b", "c"], {})
    loaded, _ = load_model(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(model(batch)["logits"], loaded(batch)["logits"])
    for single in ("image_only", "text_only"):  # one config serves every variant of an ablation
        assert model_for(single, pfa=False, image_logits=True).image_head is None


def test_the_image_loss_trains_the_image_head_alone_beside_the_sum():
    model = model_for("cmaf", pfa=False, image_logits=True, dropout=0.0).train()
    batch, labels = make_batch(seed=1), torch.arange(B) % 3
    outputs = model(batch)
    assert "image_logits" in outputs
    plain, parts = compute_loss(outputs, labels, None)
    both, both_parts = compute_loss(outputs, labels, None, image_weight=0.5)
    image_ce = torch.nn.functional.cross_entropy(model.image_head(model.image.pooled(batch)), labels)
    assert both_parts["image_ce"] == pytest.approx(float(image_ce), abs=1e-5)
    assert float(both) == pytest.approx(float(plain) + 0.5 * float(image_ce), abs=1e-5)
    assert "image_ce" not in parts
    # Its gradient reaches the image head and not the fused head.
    model.zero_grad()
    (both - plain).backward()
    assert model.image_head.layers[-1].weight.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.head.parameters())
    assert "image_logits" not in model.eval()(batch)  # scoring returns the decision only
