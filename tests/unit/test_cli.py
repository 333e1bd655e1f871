"""The CLI as users and outside checks run it: real subprocesses of the installed `ase-ray`."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import MAGNETIC_TILE, REPO, write_png

ASE_RAY = shutil.which("ase-ray", path=str(Path(sys.executable).parent)) or "ase-ray"


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([ASE_RAY, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    result = run("data", "synth", "--out", str(out), "--seed", "3", "--scale", "0.06")
    assert result.returncode == 0, result.stderr
    return out


def test_help_on_every_command():
    for args in ([], ["data"], ["data", "import"], ["data", "synth"], ["data", "validate"], ["data", "split"],
                 ["data", "augment"], ["data", "import", "magnetic-tile"], ["pipeline"], ["config", "show"],
                 ["features"], ["train"], ["evaluate"], ["ablate"], ["tune"], ["register"], ["serve"], ["predict"],
                 ["models"], ["models", "pull"]):
        result = run(*args, "--help")
        assert result.returncode == 0, (args, result.stderr)
        assert "Usage" in result.stdout


def test_synth_writes_manifest_and_validates(synth_dir):
    df = pd.read_csv(synth_dir / "manifest.csv")
    assert {"image_path", "label", "binary_label", "group"} <= set(df.columns)
    assert set(df["label"]) == {"normal", "scratch", "particle", "void", "bridge"}
    result = run("data", "validate", str(synth_dir / "manifest.csv"))
    assert result.returncode == 0, result.stderr
    assert "no problems" in result.stdout


def test_validate_names_missing_corrupt_and_unknown_rows(synth_dir, tmp_path):
    bad_dir = tmp_path / "bad"
    shutil.copytree(synth_dir, bad_dir)
    manifest = bad_dir / "manifest.csv"
    df = pd.read_csv(manifest)
    df.loc[1, "image_path"] = "images/does_not_exist.png"
    (bad_dir / df.loc[2, "image_path"]).write_bytes(b"garbage, not a png")
    df.loc[3, "label"] = "alien"
    df.to_csv(manifest, index=False)
    result = run("data", "validate", str(manifest))
    assert result.returncode == 1
    err = result.stderr
    assert "Traceback" not in err
    assert "row 1 " in err and "missing-file" in err
    assert "row 2 " in err and "unreadable-image" in err
    assert "row 3 " in err and "unknown-label" in err and "alien" in err
    assert "3 problem(s) in 3 row(s)" in err


def test_user_errors_are_one_line_without_traceback(tmp_path):
    cases = [
        ("data", "validate", str(tmp_path / "none.csv")),
        ("data", "synth", "--out", str(tmp_path / "x"), "--set", "data.synth.scal=1"),
        ("data", "synth", "--out", str(tmp_path / "x"), "--config", str(tmp_path / "missing.yaml")),
        ("data", "import", "magnetic-tile", "--out", str(tmp_path / "m"), "--root", str(tmp_path / "nope")),
    ]
    for args in cases:
        result = run(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        assert result.stderr.strip().startswith("error:"), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_key_message_names_choices(tmp_path):
    result = run("config", "show", "--set", "data.split.fold=3")
    assert result.returncode == 2
    assert "data.split.fold" in result.stderr and "folds" in result.stderr


def test_config_show_flat():
    result = run("config", "show", "--flat", "--set", "project.seed=9")
    assert result.returncode == 0
    assert "project.seed=9" in result.stdout.splitlines()


def test_split_then_augment(synth_dir, tmp_path):
    split = tmp_path / "split" / "manifest.csv"
    result = run("data", "split", str(synth_dir / "manifest.csv"), "--out", str(split), "--folds", "3")
    assert result.returncode == 0, result.stderr
    df = pd.read_csv(split)
    assert set(df["split"]) <= {"train", "val", "test"} and set(df["fold"]) == {0, 1, 2}
    assert (split.parent / "dataset.yaml").is_file()
    result = run("data", "augment", str(split), "--out", str(tmp_path / "aug"),
                 "--set", "data.tda.mode=count", "--set", "data.tda.per_class=2")
    assert result.returncode == 0, result.stderr
    aug = pd.read_csv(tmp_path / "aug" / "manifest.csv")
    assert len(aug) == len(df) + 2 * 5
    assert run("data", "validate", str(tmp_path / "aug" / "manifest.csv")).returncode == 0


def test_import_folder_cli(tmp_path):
    for cls in ("normal", "bad"):
        for i in range(2):
            write_png(tmp_path / "in" / cls / f"{i}.png", seed=i)
    result = run("data", "import", "folder", str(tmp_path / "in"), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert len(pd.read_csv(tmp_path / "out" / "manifest.csv")) == 4


@pytest.mark.skipif(not MAGNETIC_TILE.is_dir(), reason="../shared/data/magnetic_tile missing")
def test_import_magnetic_tile_cli(tmp_path):
    result = run("data", "import", "magnetic-tile", "--out", str(tmp_path), "--root", str(MAGNETIC_TILE))
    assert result.returncode == 0, result.stderr
    df = pd.read_csv(tmp_path / "manifest.csv")
    assert len(df) == 1344 and {"label", "binary_label", "group"} <= set(df.columns)


def test_serve_and_predict_with_an_unknown_model_are_one_line_errors(tmp_path):
    work = f"project.work_dir={tmp_path / 'work'}"
    result = run("serve", "--model-uri", "models:/ase-ray-multiclass@champion", "--port", "18123", "--set", work)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]  # MLflow logs its database set-up first
    assert last.startswith("error: cannot resolve model models:/ase-ray-multiclass@champion"), result.stderr
    assert "Traceback" not in result.stderr
    manifest = tmp_path / "m.csv"
    write_png(tmp_path / "a.png")  # a good manifest: the model is what is wrong
    manifest.write_text("image_path\na.png\n")
    result = run("predict", "--manifest", str(manifest), "--out", str(tmp_path / "out"), "--set", work)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot resolve model"), result.stderr
    result = run("serve", "--detach", "--set", work)
    assert result.returncode == 2 and "--detach needs a running cluster" in result.stderr


def test_models_pull_says_when_nothing_is_configured_or_the_hub_is_unreachable(tmp_path):
    nothing = run("models", "pull", "--models-dir", str(tmp_path / "models"))
    assert nothing.returncode == 2 and "Traceback" not in nothing.stderr
    assert nothing.stderr.strip().startswith("error: no hub model is configured"), nothing.stderr

    with socket.socket() as s:  # a local port nobody listens on: the hub "unreachable", no network used
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = "hf_test_token_must_not_show"
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_TOKEN": token}
    unreachable = subprocess.run([ASE_RAY, "models", "pull", "-c", str(REPO / "configs" / "cluster.yaml"),
                                  "--models-dir", str(tmp_path / "models")],
                                 capture_output=True, text=True, timeout=120, env=env)
    assert unreachable.returncode == 2 and "Traceback" not in unreachable.stderr
    last = unreachable.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: the model hub http://127.0.0.1:{port} is unreachable"), unreachable.stderr
    assert "Salesforce/instructblip-vicuna-7b" in last
    assert token not in unreachable.stdout + unreachable.stderr
