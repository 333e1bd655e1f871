import pandas as pd
import pytest

from ase_ray.data.magnetic_tile import CLASSES, build_magnetic_tile_manifest, group_by_tile, import_magnetic_tile
from ase_ray.data.manifest import read_dataset_info, read_manifest
from ase_ray.data.splits import assign_splits, groups_of, kfold_indices
from ase_ray.errors import DataError
from tests.conftest import MAGNETIC_TILE

needs_data = pytest.mark.skipif(not MAGNETIC_TILE.is_dir(), reason="../shared/data/magnetic_tile missing")


def test_group_by_tile_on_frame_numbers():
    frames = pd.Series([10, 30, 55, 5000, 5020, 90, 20000])
    groups = group_by_tile(frames, max_gap=100)
    assert groups[0] == groups[1] == groups[2] == groups[5]
    assert groups[3] == groups[4] != groups[0]
    assert groups[6] not in set(groups[:6])


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="not found"):
        build_magnetic_tile_manifest(tmp_path / "nope", 500)


@needs_data
def test_real_dataset_manifest_and_groups(tmp_path):
    df = import_magnetic_tile(MAGNETIC_TILE, tmp_path, max_gap=500)
    counts = df["label"].value_counts().to_dict()
    assert counts == {"Free": 952, "Blowhole": 115, "Break": 85, "Uneven": 103, "Crack": 57, "Fray": 32}
    assert set(df.columns) >= {"image_path", "label", "binary_label", "group", "exposure", "mask_path"}
    assert "frame" not in df.columns and not df["image_path"].str.endswith(".png").any()
    assert (df["mask_path"] == df["image_path"].str.replace(".jpg", ".png")).all()  # a training target
    metadata = read_manifest(tmp_path / "manifest.csv")
    from ase_ray.data.manifest import metadata_columns

    assert metadata_columns(metadata) == ["exposure"]  # the mask is never metadata (it reveals the label)
    assert (df["binary_label"] == "normal").sum() == 952
    tiles = df.groupby("label")["group"].nunique()
    assert 15 <= tiles["Blowhole"] <= 25 and 4 <= tiles["Fray"] <= 9
    info = read_dataset_info(tmp_path / "manifest.csv")
    assert info.classes == list(CLASSES) and info.normal_class == "Free"
    assert len(read_manifest(tmp_path / "manifest.csv")) == 1344


@needs_data
def test_no_tile_straddles_a_split():
    df = build_magnetic_tile_manifest(MAGNETIC_TILE, 500)
    frames = df["image_path"].str.extract(r"num_(\d+)")[0].astype(int)
    split = assign_splits(df, 0.15, 0.2, seed=0)["split"]
    order = frames.sort_values().index
    # neighbouring frames closer than a tile's spread (a few hundred) never sit on different sides
    for a, b in zip(order[:-1], order[1:]):
        if frames[b] - frames[a] <= 300:
            assert split[a] == split[b], (df.loc[a, "image_path"], df.loc[b, "image_path"])
    groups = groups_of(df)
    for train, test in kfold_indices(df, 5, seed=0):
        assert not set(groups[train]) & set(groups[test])
