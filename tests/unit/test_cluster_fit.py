"""configs/cluster.yaml must fit cluster.yaml: GPUs asked vs offered, and every model in its GPU's memory."""

from __future__ import annotations

import pytest
import yaml

from ase_ray.cluster_fit import ClusterFitError, fit_problems, model_gb, node_types, offered_gpus
from ase_ray.config import apply_overrides, load_config
from tests.conftest import REPO


@pytest.fixture(scope="module")
def cluster_config():
    return load_config(REPO / "configs" / "cluster.yaml")


@pytest.fixture(scope="module")
def launcher():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_the_cluster_config_fits_the_cloud_cluster(cluster_config, launcher):
    assert offered_gpus(node_types(launcher)) == 8
    assert fit_problems(cluster_config, launcher) == []


def test_the_on_prem_launcher_declares_no_gpus_to_check_against():
    """cluster-onprem.yaml lists machines, not node types: Ray detects their GPUs at `ray start`. If
    it ever declares node types with GPUs, the cluster config must fit them too."""
    onprem = yaml.safe_load((REPO / "cluster-onprem.yaml").read_text())
    nodes = node_types(onprem)
    if offered_gpus(nodes):
        assert fit_problems(load_config(REPO / "configs" / "cluster.yaml"), onprem) == []
    else:
        assert onprem["provider"]["type"] == "local" and not nodes


def test_the_old_pools_ask_for_nine_gpus_against_eight(cluster_config, launcher):
    old = apply_overrides(cluster_config, {"features.describe.resources.actors": 4})
    problems = fit_problems(old, launcher)
    assert len(problems) == 1
    assert "feature pools ask for 9 GPUs" in problems[0] and "offer 8" in problems[0]


def test_the_old_serve_replica_puts_two_7b_models_on_one_24_gb_gpu(cluster_config, launcher):
    old = apply_overrides(cluster_config, {"serve.features.num_gpus": 1, "serve.features.devices": {}})
    problems = fit_problems(old, launcher)
    assert len(problems) == 2  # one per replica
    assert "instructblip-vicuna-7b" in problems[0] and "Llama-2-7b" in problems[0]
    assert "24 GB" in problems[0] and "GPU 0" in problems[0]


def test_a_device_beyond_the_replicas_gpus_is_named(cluster_config, launcher):
    # The LLM on a second GPU the replica does not have.
    problems = fit_problems(apply_overrides(cluster_config, {"serve.features.num_gpus": 1}), launcher)
    assert problems == ["serve.features: reason is placed on cuda:1 but a replica has 1 GPU(s) "
                        "(serve.features.num_gpus)"]


def test_replicas_that_need_more_gpus_than_any_node_or_all_nodes_have(cluster_config, launcher):
    big = fit_problems(apply_overrides(cluster_config, {"serve.features.num_gpus": 8,
                                                        "serve.features.num_replicas": 1}), launcher)
    assert big == ["serve.features replica 1/1: no node has 8 free GPU(s) on it for it (largest node type: 4 GPUs)"]
    # Three 2-GPU replicas: 6 <= 8 GPUs, but only the 4-GPU node holds 2 at once.
    three = fit_problems(apply_overrides(cluster_config, {"serve.features.num_replicas": 3}), launcher)
    assert three == ["serve.features replica 3/3: no node has 2 free GPU(s) on it for it (largest node type: 4 GPUs)"]


def test_a_7b_model_on_a_quarter_gpu_does_not_fit(cluster_config, launcher):
    squeezed = apply_overrides(cluster_config, {"features.reason.resources.num_gpus": 0.25})
    problems = fit_problems(squeezed, launcher)
    assert len(problems) == 4 and all("Llama-2-7b" in p and "get 6 GB" in p for p in problems)


def test_model_sizes_follow_their_dtype():
    assert model_gb("Salesforce/instructblip-vicuna-7b", "bfloat16") == pytest.approx(15.8)
    assert model_gb("meta-llama/Llama-2-7b-chat-hf", "bfloat16") == pytest.approx(13.48)
    assert model_gb("meta-llama/Llama-2-7b-chat-hf", "float32") == pytest.approx(26.96)
    assert model_gb("microsoft/resnet-50", "float32") < 1 and model_gb("bert-base-uncased", "float32") < 1


def test_unknown_instance_types_and_models_are_errors_not_guesses(cluster_config, launcher):
    changed = yaml.safe_load(yaml.safe_dump(launcher))
    changed["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"] = "x9.mega"
    with pytest.raises(ClusterFitError, match="'x9.mega' of node type gpu_worker"):
        fit_problems(cluster_config, changed)
    unknown = apply_overrides(cluster_config, {"features.reason.model_id": "acme/llm-13b"})
    with pytest.raises(ClusterFitError, match="'acme/llm-13b' is not in"):
        fit_problems(unknown, launcher)


def test_the_laptop_defaults_ask_for_no_gpu(launcher):
    assert fit_problems(load_config(), launcher) == []


def test_a_features_replica_places_each_stage_on_its_named_device(cluster_config):
    from ase_ray.features.inmemory import features_key
    from ase_ray.serve.predictor import serving_features

    placed = serving_features(cluster_config.features, None, cluster_config.serve.features)
    assert placed.reason.device == "cuda:1" and placed.describe.device == "cuda:0"
    assert placed.reason.resources.num_gpus == 2
    assert features_key(placed) == features_key(cluster_config.features)  # devices change no feature


def test_a_device_that_is_not_a_torch_device_is_a_config_error(cluster_config):
    from ase_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="devices"):
        apply_overrides(cluster_config, {"serve.features.devices": {"reason": "gpu1"}})
    with pytest.raises(ConfigError, match="ocr"):
        apply_overrides(cluster_config, {"serve.features.devices": {"ocr": "cuda:0"}})
