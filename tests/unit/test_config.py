import pytest
import yaml

from ase_ray.config import AppConfig, dump_config, flatten_config, load_config
from ase_ray.errors import ConfigError


def test_defaults_follow_the_paper_counts():
    counts = load_config().data.synth.counts()
    assert counts == {"normal": 225, "scratch": 92, "particle": 44, "void": 50, "bridge": 44}


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"project": {"seed": 7}, "data": {"synth": {"scale": 0.5}}}))
    cfg = load_config(path, ["data.synth.scale=0.1", "data.split.folds=3", "data.tda.mode=count"])
    assert cfg.project.seed == 7
    assert cfg.data.synth.scale == 0.1
    assert cfg.data.split.folds == 3
    assert cfg.data.tda.mode == "count"


def test_unknown_key_names_key_and_choices():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["data.synth.scal=1"])
    msg = str(err.value)
    assert "data.synth.scal" in msg and "scale" in msg and "\n" not in msg


def test_unknown_key_in_yaml_names_choices(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  split:\n    fold: 3\n")
    with pytest.raises(ConfigError, match=r"data\.split\.fold.*folds"):
        load_config(path)


def test_wrong_type_and_bad_enum():
    with pytest.raises(ConfigError, match="data.synth.scale"):
        load_config(overrides=["data.synth.scale=abc"])
    with pytest.raises(ConfigError, match="data.tda.mode"):
        load_config(overrides=["data.tda.mode=sometimes"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_override_without_equals():
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(overrides=["data.synth.scale"])


def test_dump_round_trip(tmp_path):
    cfg = load_config(overrides=["project.seed=5", "data.synth.width=400"])
    path = tmp_path / "dump.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_flatten_has_dotted_keys():
    flat = flatten_config(AppConfig())
    assert flat["data.synth.scale"] == 1.0
    assert flat["data.synth.classes.0.name"] == "normal"
    assert flat["data.split.folds"] == 5
    assert all(not isinstance(v, dict) for v in flat.values())


def test_shipped_configs_load():
    from pathlib import Path

    import yaml

    for path in sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")):
        if "applications" in (yaml.safe_load(path.read_text()) or {}):
            _check_serve_deploy_config(path)  # Ray Serve's own format (serve deploy)
        else:
            load_config(path)


def _check_serve_deploy_config(path):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from ase_ray.serve.deploy import IMPORT_PATH, MODEL_DEPLOYMENTS, ServeAppArgs

    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    app = schema.applications[0]
    assert app.import_path == IMPORT_PATH
    ServeAppArgs.model_validate(app.args).app_config()  # the ase-ray config it names loads
    configs = {d.name: d.user_config for d in app.deployments}
    assert configs[MODEL_DEPLOYMENTS[0]] == configs[MODEL_DEPLOYMENTS[1]]


def test_overriding_one_resource_field_keeps_the_stage_defaults():
    config = load_config(overrides=["features.reason.resources.actors=3", "features.decode.num_cpus=0.2"])
    reason = config.features.reason.resources
    assert (reason.actors, reason.num_cpus, reason.batch_size) == (3, 0.4, 8)
    assert (config.features.decode.num_cpus, config.features.decode.batch_size) == (0.2, 16)
    assert config.features.ocr.resources.num_cpus == 0.4


def test_actor_pools_start_whole_unless_a_minimum_is_set():
    from ase_ray.features.pipeline import _actor_args

    fixed = _actor_args(load_config().features.reason.resources, 8)["compute"]
    assert (fixed.min_size, fixed.max_size) == (2, 2)
    scaling = load_config(overrides=["features.reason.resources.actors=8", "features.reason.resources.min_actors=2"])
    pool = _actor_args(scaling.features.reason.resources, 8)["compute"]
    assert (pool.min_size, pool.max_size) == (2, 8)
