"""Search spaces: parsing, validation against the config (errors name the key), trial configs, concurrency."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ase_ray.config import load_config
from ase_ray.errors import ConfigError
from ase_ray.registry import champion_uri, model_name
from ase_ray.tune.search import (
    TrialRow,
    best_row,
    derive_concurrency,
    results_table,
    scheduler,
    trial_cpus,
    trial_name,
)
from ase_ray.tune.space import PIPELINE_SPACE, load_space, parse_space, trial_config

SPACES = Path(__file__).resolve().parents[2] / "tune_spaces"


def _parse(data):
    return parse_space(data, "test.yaml", load_config())


@pytest.mark.parametrize("path", sorted(SPACES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_spaces_load(path):
    space = load_space(path, load_config())
    assert space.params and all(p.path.startswith("train.") for p in space.params)


def test_stride_lr_and_wide_spaces():
    base = load_config()
    stride_lr = load_space(SPACES / "stride_lr.yaml", base)
    assert {p.path: p.kind for p in stride_lr.params} == {"train.pfa.stride": "grid", "train.lr": "loguniform"}
    assert stride_lr.trial_count(stride_lr.num_samples) == 3 * stride_lr.num_samples
    wide = {p.path for p in load_space(SPACES / "wide.yaml", base).params}
    assert {"train.pfa.temperature", "train.pfa.align_weight", "train.model.d_model", "train.model.dropout"} <= wide


def test_param_space_uses_tune_samplers():
    space = _parse({"params": {"train.lr": {"loguniform": [1e-4, 1e-2]}, "train.pfa.stride": {"grid": [0.1, 0.2]},
                               "train.model.heads": {"choice": [2, 4]},
                               "train.pfa.epochs_per_stage": {"randint": [1, 4]},
                               "train.model.dropout": {"uniform": [0.0, 0.3]}}})
    tune_space = space.param_space()
    assert tune_space["train.pfa.stride"] == {"grid_search": [0.1, 0.2]}
    assert 1e-4 <= tune_space["train.lr"].sample() <= 1e-2
    assert tune_space["train.model.heads"].sample() in (2, 4)
    assert tune_space["train.pfa.epochs_per_stage"].sample() in (1, 2, 3)
    assert space.trial_count(3) == 6


def test_unknown_path_names_the_key_and_the_choices():
    with pytest.raises(ConfigError) as err:
        _parse({"params": {"train.pfa.strid": {"grid": [0.1]}}})
    msg = str(err.value)
    assert "test.yaml" in msg and "train.pfa.strid" in msg and "stride" in msg and "\n" not in msg


def test_unknown_spec_kind_is_named():
    with pytest.raises(ConfigError, match=r"'train\.lr' has unknown spec 'logunifrom' \(valid: grid, choice"):
        _parse({"params": {"train.lr": {"logunifrom": [1e-4, 1e-2]}}})


@pytest.mark.parametrize("spec", [{"loguniform": [0, 1e-2]}, {"uniform": [0.5, 0.1]}, {"randint": [1, 2.5]},
                                  {"grid": []}, {"grid": 0.1}, {"grid": [0.1], "choice": [0.2]}, 0.1])
def test_malformed_specs_name_the_key(spec):
    with pytest.raises(ConfigError, match=r"'train\.lr'"):
        _parse({"params": {"train.lr": spec}})


def test_invalid_value_names_key_and_value():
    with pytest.raises(ConfigError) as err:
        _parse({"params": {"train.pfa.stride": {"grid": [0.2, 1.5]}}})
    assert "train.pfa.stride" in str(err.value) and "1.5" in str(err.value)
    with pytest.raises(ConfigError, match=r"'train\.model\.d_model' = 100: .*heads \(3\) must divide"):
        _parse({"fixed": {"train.model.heads": 3}, "params": {"train.model.d_model": {"choice": [96, 100]}}})


def test_only_train_settings_can_be_searched():
    with pytest.raises(ConfigError, match=r"'features\.ocr\.psm' cannot be set by a search"):
        _parse({"params": {"features.ocr.psm": {"grid": [6, 7]}}})
    with pytest.raises(ConfigError, match=r"'train\.store_dir' cannot be set"):
        _parse({"fixed": {"train.store_dir": "/x"}, "params": {"train.lr": {"grid": [1e-3]}}})
    with pytest.raises(ConfigError, match=r"'train\.task' can be fixed but not searched"):
        _parse({"params": {"train.task": {"choice": ["binary", "multiclass"]}}})


def test_top_level_errors():
    with pytest.raises(ConfigError, match=r"unknown key 'parms' \(valid: description, num_samples"):
        _parse({"parms": {"train.lr": {"grid": [1e-3]}}})
    with pytest.raises(ConfigError, match="'params' must map"):
        _parse({"metric": "val_macro_f1"})
    with pytest.raises(ConfigError, match="tune.metric"):
        _parse({"metric": "val_loss", "params": {"train.lr": {"grid": [1e-3]}}})
    with pytest.raises(ConfigError, match="num_samples"):
        _parse({"num_samples": 0, "params": {"train.lr": {"grid": [1e-3]}}})
    with pytest.raises(ConfigError, match="both fixed and searched"):
        _parse({"fixed": {"train.lr": 1e-3}, "params": {"train.lr": {"grid": [1e-3]}}})


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="search space not found"):
        load_space(tmp_path / "nope.yaml", load_config())
    bad = tmp_path / "bad.yaml"
    bad.write_text("params: {train.lr: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_space(bad, load_config())


def test_trial_config_applies_fixed_sampled_and_extra():
    base = load_config(overrides=["train.epochs=9"])
    cfg = trial_config(base, {"train.epochs": 3}, {"train.lr": np.float64(0.004), "train.pfa.stride": 0.3},
                       {"train.run_name": "trial_001"})
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.pfa.stride, cfg.train.run_name) == (3, 0.004, 0.3, "trial_001")
    assert type(cfg.train.lr) is float and base.train.epochs == 9


def test_pipeline_space_is_valid_and_small():
    space = _parse(PIPELINE_SPACE)
    assert space.trial_count(space.num_samples) == 2
    assert space.fixed["train.num_workers"] == 1


def test_concurrency_from_cluster_cpus():
    base = load_config()  # 2 workers x 0.5 CPU + 0.1 for the driver
    one_worker = _parse({"fixed": {"train.num_workers": 1, "train.cpus_per_worker": 0.9},
                         "params": {"train.lr": {"grid": [1e-3, 2e-3, 3e-3]}}})
    assert trial_cpus(base, one_worker) == pytest.approx(1.0)
    assert derive_concurrency(base, one_worker, {"CPU": 2.0}, 1) == 2
    assert derive_concurrency(base, one_worker, {"CPU": 64.0}, 1) == 3  # never more than the trials
    wide = _parse({"params": {"train.num_workers": {"choice": [1, 4]}}})
    assert trial_cpus(base, wide) == pytest.approx(4 * 0.5 + 0.1)
    assert derive_concurrency(base, wide, {"CPU": 2.0}, 4) == 1  # at least one


def test_trial_names_are_the_tune_counter():
    assert trial_name(SimpleNamespace(trial_id="a1b2c_00007")) == "trial_007"


def test_results_table_and_best_row():
    rows = [TrialRow("trial_000", {"train.lr": 0.001}, "completed", 0.7, 0.7, 3, "r0"),
            TrialRow("trial_001", {"train.lr": 0.01}, "stopped early", 0.9, 0.9, 1, "r1"),
            TrialRow("trial_002", {"train.lr": 0.003}, "completed", 0.8, 0.8, 3, "r2"),
            TrialRow("trial_003", {"train.lr": 0.1}, "error", None, None, 0, None, "boom")]
    best = best_row(rows, "max")
    assert best.trial == "trial_002"  # the stopped trial has no model to register
    assert best_row(rows, "min").trial == "trial_000"
    table = results_table("s", rows, best, "val_macro_f1", ["train.lr"])
    assert "| trial_002 (best) | 0.0030 | 0.8000 | 3 | completed | r2 |" in table
    assert "| trial_003 | 0.1000 | - | 0 | error: boom | - |" in table
    assert best_row(rows[3:], "max") is None


def test_registry_names():
    assert model_name("multiclass") == "ase-ray-multiclass"
    cfg = load_config(overrides=["train.task=binary", "registry.prefix=acme"])
    assert champion_uri(cfg) == "models:/acme-binary@champion"
    with pytest.raises(ConfigError, match="registry"):
        load_config(overrides=["registry.challenger_alias=champion"])


def test_asha_rungs_stay_below_the_last_epoch():
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    space = _parse({"params": {"train.epochs": {"choice": [6, 9]}}})
    asha = scheduler(load_config(overrides=["tune.grace_period=2", "tune.reduction_factor=2"]), space)
    assert isinstance(asha, ASHAScheduler)
    assert [[rung for rung, _ in bracket._rungs] for bracket in asha._brackets] == [[8, 4, 2]]  # never 9
    short = _parse({"fixed": {"train.epochs": 2}, "params": {"train.lr": {"grid": [1e-3]}}})
    assert isinstance(scheduler(load_config(overrides=["tune.grace_period=2"]), short), FIFOScheduler)
