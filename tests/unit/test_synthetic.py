"""The synthetic ASE-like generator: layout, determinism, groups, ground truth and readable text."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from ase_ray.config import SynthConfig
from ase_ray.data.manifest import read_dataset_info, read_manifest
from ase_ray.data.synthetic import (
    FIELD_DECIMALS,
    DEFAULT_DECIMALS,
    draw_field_values,
    generate_synthetic,
    inspection_area,
    read_truth,
    render_image,
    text_layout,
    text_region,
)
from ase_ray.errors import DataError

SCALE = 0.05  # 22 images with the default classes


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> tuple[SynthConfig, Path, pd.DataFrame]:
    config = SynthConfig(scale=SCALE, seed=3)
    out = tmp_path_factory.mktemp("synth")
    manifest = generate_synthetic(config, out, progress=True)
    return config, out, manifest


def image_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "images").rglob("*.png"))}


def disc_pixel_count(radius: int) -> int:
    image = Image.new("L", (4 * radius, 4 * radius), 0)
    ImageDraw.Draw(image).ellipse((radius, radius, 3 * radius, 3 * radius), fill=255)
    return int((np.asarray(image) == 255).sum())


# ------------------------------------------------------------------------------------ layout
def test_counts_per_class_match_config(small_set):
    config, _, manifest = small_set
    expected = {name: n for name, n in config.counts().items() if n}
    assert manifest["label"].value_counts().to_dict() == expected


def test_files_exist_with_expected_names_size_and_mode(small_set):
    config, out, manifest = small_set
    for label, rows in manifest.groupby("label"):
        names = sorted(Path(p).name for p in rows["image_path"])
        assert names == [f"{label}_{i:04d}.png" for i in range(len(rows))]
    for path in manifest["image_path"]:
        path = Path(path)
        assert path.is_absolute() and path.is_file()
        assert path.parent == out.resolve() / "images" / path.parent.name
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.mode == "RGB"
            assert image.size == (config.width, config.height)


def test_binary_labels_follow_normal_class(small_set):
    config, _, manifest = small_set
    expected = np.where(manifest["label"] == config.normal_class, "normal", "defect")
    assert list(manifest["binary_label"]) == list(expected)


def test_groups_are_boards_of_one_class_and_unique(small_set):
    _, _, manifest = small_set
    per_group = manifest.groupby("group")
    assert (per_group["label"].nunique() == 1).all()
    assert (per_group["lot"].nunique() == 1).all()
    assert per_group.size().between(1, 3).all()
    assert all(g.startswith("b") and g[1:].isdigit() for g in manifest["group"])


def test_manifest_and_dataset_info_round_trip(small_set):
    config, out, manifest = small_set
    read = read_manifest(out / "manifest.csv")
    pd.testing.assert_frame_equal(read, manifest, check_dtype=False)
    assert list(read.columns) == ["image_path", "label", "binary_label", "group", "lot", "operator_note",
                                  "probe_reading"]
    info = read_dataset_info(out / "manifest.csv")
    assert info.classes == [c.name for c in config.classes]
    assert info.normal_class == config.normal_class
    assert info.source == "synthetic"
    assert info.extra == {"seed": config.seed, "scale": config.scale, "text_region": text_region(config),
                          "domain": "automated optical inspection image",
                          "metadata_columns": ["operator_note", "probe_reading"]}
    x0, y0, x1, y1 = info.extra["text_region"]
    assert (x0, y0, x1) == (0.0, 0.0, 1.0) and 0.1 < y1 < 0.4  # the printed band, a layout hint for OCR


# ------------------------------------------------------------------------------- determinism
def test_same_seed_gives_identical_files(small_set, tmp_path):
    config, out, manifest = small_set
    again = generate_synthetic(config, tmp_path)
    assert image_bytes(tmp_path) == image_bytes(out)
    assert (tmp_path / "manifest.csv").read_bytes() == (out / "manifest.csv").read_bytes()
    assert (tmp_path / "truth.csv").read_bytes() == (out / "truth.csv").read_bytes()
    assert list(again["group"]) == list(manifest["group"])


def test_different_seed_gives_different_images(small_set, tmp_path):
    config, out, _ = small_set
    generate_synthetic(config.model_copy(update={"seed": config.seed + 1}), tmp_path)
    ours, theirs = image_bytes(out), image_bytes(tmp_path)
    assert ours.keys() == theirs.keys()
    assert all(ours[name] != theirs[name] for name in ours)


# ------------------------------------------------------------------------------ ground truth
def test_truth_lines_hold_the_printed_values(small_set):
    config, out, manifest = small_set
    truth = read_truth(out)
    assert list(truth["image_path"]) == [str(Path(p).relative_to(out.resolve())) for p in manifest["image_path"]]
    assert list(truth["group"]) == list(manifest["group"])
    fields = list(config.classes[0].fields)
    for _, row in truth.iterrows():
        assert row["line1"] == f"LOT {row['lot']} ID {row['serial']}"
        assert row["line2"] == " ".join(f"{name} {row[name]}" for name in fields)
        for name in fields:
            decimals = FIELD_DECIMALS.get(name, DEFAULT_DECIMALS)
            whole, _, frac = row[name].partition(".")
            assert whole.isdigit() and len(frac) == decimals
    assert truth["serial"].is_unique


def test_truth_dots_are_exact_pink_discs_inside_the_inspection_area(small_set):
    config, out, _ = small_set
    x0, y0, x1, y1 = inspection_area(config)
    r = config.dot_radius
    pink = np.array(config.dot_color)
    disc = disc_pixel_count(r)
    dot_range = {c.name: c.dots for c in config.classes}
    for _, row in read_truth(out).iterrows():
        pixels = np.asarray(Image.open(out / row["image_path"]).convert("RGB")).astype(int)
        low, high = dot_range[row["label"]]
        assert low <= len(row["dots"]) <= high
        for x, y in row["dots"]:
            assert x0 + r < x < x1 - 1 - r and y0 + r < y < y1 - 1 - r
            assert tuple(pixels[y, x]) == tuple(config.dot_color)
        exact = (pixels == pink).all(axis=2)
        near = (np.abs(pixels - pink) <= 60).all(axis=2)  # the TDA default colour tolerance
        assert (near == exact).all(), "something other than a dot is close to the dot colour"
        assert exact.sum() == disc * len(row["dots"])  # whole discs, none cut, none overlapping
        assert not exact[:y0].any()


def test_defect_marks_lie_under_the_dots_and_vanish_for_normal():
    config = SynthConfig(pixel_signal=0.5)
    for cls in config.classes:
        strong, info = render_image(np.random.default_rng(7), cls, config)
        faint, _ = render_image(np.random.default_rng(7), cls, config.model_copy(update={"pixel_signal": 0.0}))
        changed = np.argwhere((np.asarray(strong) != np.asarray(faint)).any(axis=2))
        if cls.defect_shape == "none":
            assert len(changed) == 0
            continue
        assert len(changed) > 0
        dots = np.array(info["dots"])[:, ::-1]  # (y, x) like argwhere
        distance = np.linalg.norm(changed[:, None, :] - dots[None, :, :], axis=2).min(axis=1)
        assert distance.max() <= 8 * config.dot_radius


def test_render_image_returns_what_it_drew():
    config = SynthConfig()
    image, info = render_image(np.random.default_rng(0), config.classes[1], config, lot="A7", serial=123)
    assert image.size == (config.width, config.height)
    assert info["label"] == config.classes[1].name
    assert info["lines"][0] == "LOT A7 ID 0123"
    assert list(info["fields"]) == list(config.classes[1].fields)
    assert info["lines"][1] == " ".join(f"{k} {v}" for k, v in info["fields"].items())
    assert all(isinstance(v, int) for dot in info["dots"] for v in dot)


def test_field_means_differ_between_classes_as_configured():
    config = SynthConfig()
    rng = np.random.default_rng(11)
    n = 600
    sample_means: dict[str, dict[str, float]] = {}
    for cls in config.classes:
        values = pd.DataFrame([draw_field_values(rng, cls) for _ in range(n)]).astype(float)
        sample_means[cls.name] = values.mean().to_dict()
        for name, (mean, std) in cls.fields.items():
            assert abs(sample_means[cls.name][name] - mean) < 0.25 * std, (cls.name, name)
    for name in config.classes[0].fields:
        configured = {c.name: c.fields[name][0] for c in config.classes}
        sampled = {c: m[name] for c, m in sample_means.items()}
        assert max(sampled, key=sampled.get) == max(configured, key=configured.get)
        assert min(sampled, key=sampled.get) == min(configured, key=configured.get)


def test_text_too_wide_for_the_image_is_a_data_error(tmp_path):
    config = SynthConfig(width=160, scale=0.01)
    with pytest.raises(DataError, match="wider than"):
        generate_synthetic(config, tmp_path)


# ------------------------------------------------------------------------------------- OCR
@pytest.mark.skipif(shutil.which("tesseract") is None, reason="tesseract is not installed")
def test_tesseract_reads_the_printed_lines_back(small_set):
    pytesseract = pytest.importorskip("pytesseract")
    config, out, _ = small_set
    boxes = text_layout(config).line_boxes
    truth = read_truth(out).head(5)
    exact = 0
    for _, row in truth.iterrows():
        image = Image.open(out / row["image_path"]).convert("RGB")
        crop = image.crop(boxes[1])
        crop = crop.resize((crop.width * 2, crop.height * 2), Image.LANCZOS)
        exact += pytesseract.image_to_string(crop, config="--psm 7").strip() == row["line2"]
    assert exact >= 4, f"tesseract read only {exact} of {len(truth)} lines exactly"
