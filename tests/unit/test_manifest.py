import pandas as pd
import pytest
from PIL import Image

from ase_ray.data.importers import import_csv, import_folder
from ase_ray.data.manifest import (
    DatasetInfo,
    read_dataset_info,
    read_manifest,
    write_dataset_info,
    write_manifest,
)
from ase_ray.data.validate import validate_manifest
from ase_ray.errors import DataError, ManifestError
from tests.conftest import write_png


def test_round_trip_csv_and_parquet_with_relative_paths(tmp_path):
    img = write_png(tmp_path / "d" / "images" / "a.png")
    df = pd.DataFrame({"image_path": [str(img)], "label": ["normal"], "lot": ["A1"], "size_mm": [1.5]})
    for name in ("manifest.csv", "manifest.parquet"):
        path = write_manifest(df, tmp_path / "d" / name)
        raw = read_manifest(path, resolve_paths=False)
        assert raw["image_path"][0] == "images/a.png"  # stored relative to the manifest
        back = read_manifest(path)
        assert back["image_path"][0] == str(img.resolve())
        assert back["lot"][0] == "A1" and back["size_mm"][0] == 1.5


def test_missing_required_column(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("path,label\na.png,x\n")
    with pytest.raises(ManifestError, match="image_path"):
        read_manifest(path)


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "none.csv")


def test_dataset_info_round_trip(tmp_path):
    write_dataset_info(tmp_path, DatasetInfo(["a", "b"], "a", "test", {"seed": 3}))
    info = read_dataset_info(tmp_path / "manifest.csv")
    assert info.classes == ["a", "b"] and info.normal_class == "a" and info.extra == {"seed": 3}
    assert info.binary_of("a") == "normal" and info.binary_of("b") == "defect"


def test_validation_reports_every_bad_row_at_once(tmp_path):
    good = write_png(tmp_path / "good.png")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    truncated = tmp_path / "trunc.png"
    full = write_png(tmp_path / "full.png", size=(64, 64)).read_bytes()
    truncated.write_bytes(full[: len(full) // 2])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    df = pd.DataFrame(
        {
            "image_path": [str(good), str(tmp_path / "missing.png"), str(corrupt), str(good),
                           str(truncated), str(empty), str(good)],
            "label": ["a", "a", "b", "a", "a", "a", "zzz"],
        }
    )
    problems = validate_manifest(df, classes=["a", "b"])
    kinds = {(p.row, p.kind) for p in problems}
    assert (1, "missing-file") in kinds
    assert (2, "unreadable-image") in kinds
    assert (3, "duplicate-path") in kinds
    assert (4, "unreadable-image") in kinds
    assert (5, "unreadable-image") in kinds
    assert (6, "unknown-label") in kinds
    assert (6, "duplicate-path") in kinds
    assert not any(p.row == 0 for p in problems)
    assert "line 3" in str(next(p for p in problems if p.row == 1))


def test_validation_flags_bad_split_and_group_leak(tmp_path):
    a, b = write_png(tmp_path / "a.png"), write_png(tmp_path / "b.png", seed=1)
    df = pd.DataFrame(
        {"image_path": [str(a), str(b)], "label": ["x", "x"], "group": ["g", "g"], "split": ["train", "test"]}
    )
    assert [p.kind for p in validate_manifest(df)] == ["group-leak"]
    df.loc[1, "split"] = "holdout"
    assert "bad-value" in {p.kind for p in validate_manifest(df)}


def test_import_folder(image_folder, tmp_path):
    (image_folder / "normal" / "notes.txt").write_text("not an image")
    result = import_folder(image_folder, tmp_path / "out")
    assert result.info.classes == ["normal", "scratch", "stain"]
    assert result.info.normal_class == "normal"
    assert len(result.manifest) == 9
    assert result.ignored_files and result.ignored_files[0].endswith("notes.txt")
    back = read_manifest(tmp_path / "out" / "manifest.csv")
    assert set(back["binary_label"]) == {"normal", "defect"}
    assert validate_manifest(back, result.info.classes) == []


def test_import_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        import_folder(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        import_folder(tmp_path / "empty", tmp_path / "out")


def test_import_csv_resolves_relative_paths(tmp_path, image_folder):
    csv = image_folder / "list.csv"
    csv.write_text("file,cls,lot\nnormal/normal_0.png,normal,L1\nscratch/scratch_0.png,scratch,L2\n")
    result = import_csv(csv, tmp_path / "out", path_column="file", label_column="cls", normal_class="normal")
    back = read_manifest(result.manifest_path)
    assert list(back["label"]) == ["normal", "scratch"]
    assert list(back["binary_label"]) == ["normal", "defect"]
    assert list(back["lot"]) == ["L1", "L2"]
    assert all(Image.open(p).size == (32, 24) for p in back["image_path"])


def test_import_csv_missing_column(tmp_path):
    csv = tmp_path / "x.csv"
    csv.write_text("file,label\na.png,x\n")
    with pytest.raises(ManifestError, match="image_path"):
        import_csv(csv, tmp_path / "out")


def test_masks_round_trip_relative_and_a_bad_mask_is_a_listed_problem(tmp_path):
    a, b, c = (write_png(tmp_path / "d" / f"{n}.png") for n in "abc")
    mask = write_png(tmp_path / "d" / "masks" / "a.png")
    (tmp_path / "d" / "broken.png").write_text("not a png")
    df = pd.DataFrame({"image_path": [str(a), str(b), str(c)], "label": ["x", "y", "y"],
                       "mask_path": [str(mask), str(tmp_path / "d" / "gone.png"), str(tmp_path / "d" / "broken.png")]})
    path = write_manifest(df, tmp_path / "d" / "manifest.csv")
    assert read_manifest(path, resolve_paths=False)["mask_path"][0] == "masks/a.png"
    back = read_manifest(path)
    assert back["mask_path"][0] == str(mask)
    problems = {(p.row, p.kind) for p in validate_manifest(back)}
    assert problems == {(1, "missing-file"), (2, "unreadable-image")}
    assert "mask_path" in str(next(p for p in validate_manifest(back) if p.row == 1))
    no_mask = back.assign(mask_path=[str(mask), None, ""])
    assert validate_manifest(no_mask) == []  # an empty cell: that row has no mask
