"""Task-specific data augmentation: dot detection, Gaussian fit, erase/draw and manifest augmentation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from ase_ray.config import TdaConfig
from ase_ray.data.manifest import DATASET_INFO, DatasetInfo, read_manifest
from ase_ray.data.tda import (
    DotDistribution,
    augment_manifest,
    detect_dots,
    disk_mask,
    dot_radii,
    draw_dots,
    erase_dots,
    fit_dot_distributions,
    fit_dots,
    radius_for_area,
    read_fit,
)
from ase_ray.errors import DataError

PINK = (255, 60, 200)
RADIUS = 4
WIDTH, HEIGHT = 200, 160
TEXT_BAND = 24  # rows of the bright text band at the top


# ------------------------------------------------------------------------------------ helpers
def pcb_background(rng: np.random.Generator, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    return rng.integers([20, 80, 20], [80, 160, 80], size=(height, width, 3)).astype(np.uint8)


def add_text_band(image: np.ndarray, rows: int = TEXT_BAND) -> np.ndarray:
    out = image.copy()
    out[:rows] = 245
    for x0 in range(6, out.shape[1] - 10, 14):  # dark glyph-like bars
        out[6 : rows - 6, x0 : x0 + 8] = 30
    return out


def paint_disks(image: np.ndarray, centres, radius: float = RADIUS, color=PINK) -> np.ndarray:
    """Independent of tda.draw_dots, so detection is not tested against its own drawing."""
    out = image.copy()
    yy, xx = np.mgrid[: out.shape[0], : out.shape[1]]
    for cx, cy in centres:
        out[(xx - cx) ** 2 + (yy - cy) ** 2 <= radius * radius] = color
    return out


def sample_separated(rng, mean, std, k, width=WIDTH, height=HEIGHT, min_gap=2 * RADIUS + 4):
    """k integer px centres from a Gaussian in normalised coords, apart and below the text band."""
    points: list[np.ndarray] = []
    while len(points) < k:
        p = np.rint(rng.normal(mean, std) * [width, height])
        inside = RADIUS + 2 <= p[0] <= width - RADIUS - 3 and TEXT_BAND + RADIUS + 2 <= p[1] <= height - RADIUS - 3
        if inside and all(np.hypot(*(p - q)) >= min_gap for q in points):
            points.append(p)
    return np.asarray(points)


def save_png(array: np.ndarray, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return str(path)


@pytest.fixture
def config() -> TdaConfig:
    return TdaConfig(seed=7)


# ----------------------------------------------------------------------------------- detection
def test_detect_finds_known_dots_and_ignores_noise_and_other_bright_regions(config):
    rng = np.random.default_rng(0)
    image = add_text_band(pcb_background(rng))
    truth = np.array([[40.0, 50.0], [150.0, 60.0], [90.0, 120.0], [23.3, 140.6]])
    image = paint_disks(image, truth)
    image[100:102, 150:152] = PINK  # 4 px of pink noise (< min_dot_area)
    image[70:80, 60:70] = (255, 140, 200)  # pinkish but outside the tolerance
    image[30:40, 100:110] = (255, 0, 0)  # bright red
    found = detect_dots(image, config)
    expected = truth[np.lexsort((truth[:, 0], truth[:, 1]))]
    assert found.shape == (4, 2)
    assert np.all(np.abs(found - expected) < 0.5)
    assert np.allclose(dot_radii(image, config), RADIUS, atol=0.25)


def test_detect_accepts_pil_and_rgba(config):
    image = paint_disks(pcb_background(np.random.default_rng(1)), [(60, 70)])
    rgba = np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])
    for variant in (Image.fromarray(image), Image.fromarray(rgba), rgba):
        assert np.allclose(detect_dots(variant, config), [[60, 70]])


def test_detect_on_band_without_dots_is_empty(config):
    image = add_text_band(pcb_background(np.random.default_rng(2)))
    assert detect_dots(image, config).shape == (0, 2)


def test_grayscale_images_have_no_dots(config):
    gray = np.full((64, 64), 200, np.uint8)
    for image in (gray, gray[..., None], Image.fromarray(gray)):
        found = detect_dots(image, config)
        assert found.shape == (0, 2) and found.dtype.kind == "f"


def test_drawn_dots_are_detected_at_their_positions(config):
    image = pcb_background(np.random.default_rng(3))
    centres = np.array([[30.0, 40.0], [100.0, 45.0], [170.0, 130.0], [64.4, 101.7]])
    drawn = draw_dots(image, centres, RADIUS, PINK)
    assert drawn.dtype == np.uint8 and drawn.shape == image.shape
    found = detect_dots(drawn, config)
    assert np.all(np.abs(found - centres[np.lexsort((centres[:, 0], centres[:, 1]))]) < 0.5)
    assert np.array_equal(image[:20, :20], drawn[:20, :20])  # far from any dot: untouched


def test_draw_dots_exact_colour_no_antialiasing(config):
    image = np.zeros((40, 40, 3), np.uint8)
    drawn = draw_dots(image, np.array([[20.0, 20.0]]), RADIUS, PINK)
    changed = np.any(drawn != 0, axis=-1)
    assert np.all(drawn[changed] == PINK)
    assert changed.sum() == 49  # lattice points with x^2 + y^2 <= 16


@pytest.mark.parametrize("radius", [2, 3, 4, 5, 7])
def test_radius_for_area_redraws_the_same_footprint(radius):
    lattice = disk_mask((40, 40), np.array([[20.0, 20.0]]), radius)
    assert disk_mask((40, 40), np.array([[20.0, 20.0]]), radius_for_area(lattice.sum())).sum() == lattice.sum()
    ellipse = Image.new("RGB", (40, 40))
    ImageDraw.Draw(ellipse).ellipse((20 - radius, 20 - radius, 20 + radius, 20 + radius), fill=PINK)
    area = np.all(np.asarray(ellipse) == PINK, axis=-1).sum()  # PIL's footprint is larger (61 px for r=4)
    assert disk_mask((40, 40), np.array([[20.0, 20.0]]), radius_for_area(area)).sum() == area


def test_erase_dots_leaves_no_detectable_dot(config):
    rng = np.random.default_rng(4)
    clean = add_text_band(pcb_background(rng))
    dotted = paint_disks(clean, [(40, 60), (46, 64), (150, 100), (2, 150)])  # two touch, one at the edge
    erased = erase_dots(dotted, config)
    assert detect_dots(dotted, config).shape[0] == 3
    assert detect_dots(erased, config).shape == (0, 2)
    assert not np.any(np.all(np.abs(erased.astype(int) - PINK) <= config.color_tolerance, axis=-1))
    assert np.array_equal(erased[:TEXT_BAND], clean[:TEXT_BAND])  # the text band is left alone
    assert np.array_equal(erase_dots(dotted, config), erased)  # deterministic
    assert np.array_equal(erase_dots(clean, config), clean)


# ---------------------------------------------------------------------------------------- fit
def exact_moment_points(rng, mean, cov, n):
    """n points whose sample mean and (ddof=1) covariance are exactly ``mean`` and ``cov``."""
    z = rng.standard_normal((n, 2))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    return mean + z @ np.linalg.cholesky(cov).T


def test_fit_recovers_known_gaussian_from_train_rows_only(tmp_path, config):
    rng = np.random.default_rng(5)
    mean = np.array([0.45, 0.6])
    cov = np.array([[0.010, 0.004], [0.004, 0.006]])
    size = 256
    points = exact_moment_points(rng, mean, cov, 150)
    assert points.min() > 0.05 and points.max() < 0.95
    background = np.full((size, size, 3), (40, 120, 40), np.uint8)
    rows = []
    for i, p in enumerate(points):  # one dot per image: no overlaps to worry about
        image = paint_disks(background, [np.rint(p * size)])
        rows.append({"image_path": save_png(image, tmp_path / f"t{i}.png"), "label": "x", "split": "train"})
    far = paint_disks(background, [(230, 20), (20, 230)])
    for i in range(20):  # test rows with far-away dots must not move the fit
        rows.append({"image_path": save_png(far, tmp_path / f"f{i}.png"), "label": "x", "split": "test"})
    fit = fit_dot_distributions(pd.DataFrame(rows), config)
    dist = fit["x"]
    assert dist.n_dots == 150 and dist.n_images == 150
    assert np.allclose(dist.mean, mean, atol=2e-3)
    assert np.allclose(dist.cov, cov, rtol=0.02, atol=1e-5)
    assert list(dist.count_values) == [1] and list(dist.count_probs) == [1.0]
    assert dist.radius_px == pytest.approx(RADIUS, abs=0.1)

    with_test = fit_dot_distributions(pd.DataFrame(rows), config, split=None)["x"]
    assert with_test.n_images == 170 and not np.allclose(with_test.cov, cov, rtol=0.1)


def test_sample_matches_mean_and_covariance():
    mean = np.array([0.3, 0.7])
    cov = np.array([[0.004, -0.0015], [-0.0015, 0.002]])
    dist = DotDistribution("x", mean, cov, np.array([1, 2]), np.array([0.25, 0.75]), 4.0, 10, 5)
    rng = np.random.default_rng(6)
    points = dist.sample(rng, 50_000)
    assert points.shape == (50_000, 2)
    assert np.allclose(points.mean(axis=0), mean, atol=1e-3)
    assert np.allclose(np.cov(points, rowvar=False), cov, rtol=0.04)
    counts = np.array([dist.sample_count(rng) for _ in range(4000)])
    assert set(counts) == {1, 2} and abs((counts == 2).mean() - 0.75) < 0.03


def test_distribution_round_trips_through_json():
    dist = DotDistribution(
        "x", np.array([0.3, 0.7]), np.array([[0.01, 0.0], [0.0, 0.02]]), np.array([1, 3]), np.array([0.5, 0.5]), 3.9, 8, 4
    )
    back = DotDistribution.from_dict(json.loads(json.dumps(dist.to_dict())))
    assert back.to_dict() == dist.to_dict()


def test_fit_needs_a_split_column_unless_split_is_none(tmp_path, config):
    image = paint_disks(pcb_background(np.random.default_rng(7)), [(40, 50), (100, 60), (150, 120)])
    manifest = pd.DataFrame([{"image_path": save_png(image, tmp_path / "a.png"), "label": "a"}])
    with pytest.raises(DataError, match="no 'split' column"):
        fit_dot_distributions(manifest, config)
    assert fit_dot_distributions(manifest, config, split=None)["a"].n_dots == 3


def test_fit_skips_classes_with_too_few_dots_with_a_reason(tmp_path, config):
    rng = np.random.default_rng(8)
    rows = [
        {"image_path": save_png(paint_disks(pcb_background(rng), [(40, 50)]), tmp_path / "c.png"), "label": "c"},
        {"image_path": save_png(np.full((32, 32), 90, np.uint8), tmp_path / "g.png"), "label": "gray"},
    ]
    fit = fit_dots(pd.DataFrame(rows), config, split=None)
    assert fit.distributions == {}
    assert "only 1 pink dot(s)" in fit.skipped["c"] and "only 0 pink dot(s)" in fit.skipped["gray"]


# ------------------------------------------------------------------------------------ augment
CLASS_DOTS = {"a": ((0.3, 0.55), (0.06, 0.08)), "b": ((0.7, 0.7), (0.05, 0.06))}
FAR_DOTS = ((0.88, 0.22), (0.03, 0.03))


def make_dataset(root: Path) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Train: a x6, b x3 (two dots each), c x1 (one dot). Test: b x3 with far-away dots, d x1. Val: a x1."""
    rng = np.random.default_rng(9)
    plan = [("a", "train", CLASS_DOTS["a"], 2)] * 6 + [("b", "train", CLASS_DOTS["b"], 2)] * 3
    plan += [("c", "train", CLASS_DOTS["a"], 1), ("a", "val", CLASS_DOTS["a"], 2)]
    plan += [("b", "test", FAR_DOTS, 2)] * 3 + [("d", "test", CLASS_DOTS["b"], 2)]
    rows, train_dots = [], {"a": [], "b": []}
    for i, (label, split, (mean, std), k) in enumerate(plan):
        centres = sample_separated(rng, mean, std, k)
        image = paint_disks(add_text_band(pcb_background(rng)), centres)
        path = save_png(image, root / "src" / label / f"{i:03d}.png")
        rows.append({"image_path": path, "label": label, "binary_label": "defect", "group": f"g{i // 2}",
                     "split": split, "LEN": float(i)})
        if split == "train" and label in train_dots:
            train_dots[label].append(centres / [WIDTH, HEIGHT])
    return pd.DataFrame(rows), {k: np.concatenate(v) for k, v in train_dots.items()}


def new_rows(result) -> pd.DataFrame:
    return result.manifest[result.manifest["augmented"]]


def test_augment_count_mode_makes_images_with_the_expected_dots(tmp_path, config):
    manifest, train_dots = make_dataset(tmp_path / "data")
    config.mode, config.per_class = "count", 3
    result = augment_manifest(manifest, tmp_path / "out", config)

    assert result.added == {"a": 3, "b": 3}
    assert set(result.skipped) == {"c", "d"}
    assert "only 1 pink dot(s)" in result.skipped["c"] and "no train" in result.skipped["d"]
    assert result.skip_messages()[0].startswith("TDA skipped for class ")
    out = result.manifest
    assert len(out) == len(manifest) + 6
    assert out["augmented"].sum() == 6 and not out["augmented"].iloc[: len(manifest)].any()
    originals = out.iloc[: len(manifest)].set_index("image_path")
    for _, row in new_rows(result).iterrows():
        path = Path(row["image_path"])
        assert path.is_file() and path.parent == tmp_path / "out" / "images" / row["label"]
        assert path.name.startswith(f"tda_{row['label']}_")
        source = originals.loc[row["source_image"]]
        assert source["split"] == "train" and row["split"] == "train"
        assert (row["label"], row["group"], row["binary_label"], row["LEN"]) == (
            source["label"], source["group"], source["binary_label"], source["LEN"]
        )
        dots = detect_dots(Image.open(path), config)
        assert len(dots) == 2  # every train image of a and b has two dots
        assert np.all(dots[:, 1] > TEXT_BAND + RADIUS)  # never over the text band
        assert np.allclose(dot_radii(Image.open(path), config), dot_radii(Image.open(row["source_image"]), config))
    assert sorted(p.name for p in (tmp_path / "out" / "images" / "a").iterdir()) == [
        "tda_a_0000.png", "tda_a_0001.png", "tda_a_0002.png"
    ]


def test_augment_fits_on_train_rows_only(tmp_path, config):
    manifest, train_dots = make_dataset(tmp_path / "data")
    result = augment_manifest(manifest, tmp_path / "out", config)
    b = result.distributions["b"]
    assert b.n_images == 3 and b.n_dots == 6
    assert np.allclose(b.mean, train_dots["b"].mean(axis=0), atol=1e-3)
    assert np.allclose(b.cov, np.cov(train_dots["b"], rowvar=False), atol=1e-4)
    assert np.linalg.norm(b.mean - FAR_DOTS[0]) > 0.3
    x0, y0, x1, y1 = result.fit.dot_area
    assert not (x0 <= FAR_DOTS[0][0] <= x1 and y0 <= FAR_DOTS[0][1] <= y1)  # nor the dot area
    assert result.distributions["a"].n_images == 6  # the val image is not used either


@pytest.mark.parametrize("max_factor, expected", [(2.0, {"a": 0, "b": 3}), (1.5, {"a": 0, "b": 1}), (0.5, {"a": 0, "b": 0})])
def test_augment_balance_mode_counts(tmp_path, config, max_factor, expected):
    manifest, _ = make_dataset(tmp_path / "data")
    config.mode, config.max_factor = "balance", max_factor
    result = augment_manifest(manifest, tmp_path / "out", config)
    assert result.added == expected
    assert new_rows(result)["label"].value_counts().to_dict() == {k: v for k, v in expected.items() if v}


def test_augment_only_requested_classes(tmp_path, config):
    manifest, _ = make_dataset(tmp_path / "data")
    config.mode, config.per_class = "count", 2
    result = augment_manifest(manifest, tmp_path / "out", config, classes=["b", "c"])
    assert result.added == {"b": 2} and set(result.skipped) == {"c"}
    with pytest.raises(DataError, match="not in the manifest"):
        augment_manifest(manifest, tmp_path / "out2", config, classes=["zzz"])


def test_augment_writes_manifest_fit_and_dataset_info(tmp_path, config):
    manifest, _ = make_dataset(tmp_path / "data")
    config.mode, config.per_class = "count", 1
    info = DatasetInfo(classes=["a", "b", "c", "d"], normal_class="a", source="test")
    result = augment_manifest(manifest, tmp_path / "out", config, dataset_info=info)
    written = pd.read_csv(result.manifest_path)
    assert written["image_path"].str.startswith("images/").sum() == 2  # new images stored relative
    back = read_manifest(result.manifest_path)
    assert list(back["image_path"]) == list(result.manifest["image_path"])
    assert back["augmented"].dtype == bool and list(back["group"]) == list(result.manifest["group"])
    fit = read_fit(result.fit_path)
    assert fit.to_dict() == result.fit.to_dict()
    assert json.loads(result.fit_path.read_text())["added"] == {"a": 1, "b": 1}
    assert (tmp_path / "out" / DATASET_INFO).is_file()


def test_augment_is_deterministic_for_a_seed(tmp_path, config):
    manifest, _ = make_dataset(tmp_path / "data")
    config.mode, config.per_class = "count", 2

    def run(name: str, seed: int):
        result = augment_manifest(manifest, tmp_path / name, config.model_copy(update={"seed": seed}))
        images = [np.asarray(Image.open(p)) for p in new_rows(result)["image_path"]]
        return pd.read_csv(result.manifest_path), images

    table_1, images_1 = run("one", 3)
    table_2, images_2 = run("two", 3)
    _, images_3 = run("three", 4)
    pd.testing.assert_frame_equal(table_1, table_2)
    assert all(np.array_equal(x, y) for x, y in zip(images_1, images_2))
    assert not all(np.array_equal(x, y) for x, y in zip(images_1, images_3))


def test_augment_gives_groupless_rows_their_own_group(tmp_path, config):
    manifest, _ = make_dataset(tmp_path / "data")
    manifest = manifest.drop(columns="group")
    config.mode, config.per_class = "count", 2
    result = augment_manifest(manifest, tmp_path / "out", config)
    rows = new_rows(result)
    assert list(rows["group"]) == list(rows["source_image"])
    originals = result.manifest[~result.manifest["augmented"]]
    assert list(originals["group"]) == list(originals["image_path"])


def test_augment_validates_its_input(tmp_path, config):
    manifest, _ = make_dataset(tmp_path / "data")
    out = tmp_path / "out"
    with pytest.raises(DataError, match="no 'split' column"):
        augment_manifest(manifest.drop(columns="split"), out, config)
    with pytest.raises(DataError, match="no 'train' rows"):
        augment_manifest(manifest.assign(split="test"), out, config)
    missing = manifest.copy()
    missing.loc[0, "image_path"] = str(tmp_path / "nowhere.png")
    with pytest.raises(DataError, match="image not found"):
        augment_manifest(missing, out, config)
    with pytest.raises(DataError, match="augmented before"):
        augment_manifest(manifest.assign(augmented=False), out, config)
    with pytest.raises(DataError, match="have no label"):
        augment_manifest(manifest.assign(label=None), out, config)
    with pytest.raises(DataError, match="folder name"):
        augment_manifest(manifest.assign(label="a/b"), out, config)
    broken = manifest.copy()
    Path(broken.loc[0, "image_path"]).write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image"):
        augment_manifest(broken, out, config)
