"""Does an app config fit a Ray cluster? GPU counts and GPU memory, checked from the two configs.

Two workloads are checked, each against the whole cluster (``ase-ray pipeline`` runs them one after
the other; Serve left running during an extraction takes its GPUs from the pools):

- the feature-extraction actor pools: every model stage asks ``resources.num_gpus`` per actor for
  ``resources.actors`` actors;
- the Serve deployments: ``num_replicas`` x ``num_gpus`` each; inside a Features replica every
  model stage sits on the device that ``serve.features.devices`` (or its own ``device``) names.

Offered: every node type of the launcher config at ``max_workers`` (the head once), with the GPU
count and memory of its instance type from :data:`INSTANCE_TYPES` (a ``resources: {GPU: n}``
override wins for the count). Asked GPUs must not exceed the offer and must pack onto nodes (an
actor's GPUs are on one node; a fractional GPU is a share of one GPU). Every model on a GPU must fit
the memory it gets: its weights (:data:`MODEL_PARAMS_B` x bytes of its dtype) times
:data:`ACTIVATION_HEADROOM`, plus :data:`CUDA_CONTEXT_GB` per GPU, within the GPU's memory (times the
fraction for a fractional GPU). A model or an instance type missing from the tables is an error,
never a guess.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ase_ray.errors import AseRayError
from ase_ray.features.model_info import stage_model
from ase_ray.features.stages import stage_plan_of


class ClusterFitError(AseRayError):
    """The fit cannot be judged: an instance type or a model is missing from the tables."""


@dataclass(frozen=True)
class InstanceType:
    gpus: int
    gpu_memory_gb: float = 0.0
    gpu: str = ""


# GPU count and memory per GPU of the instance types the launcher configs use (AWS figures).
INSTANCE_TYPES: dict[str, InstanceType] = {
    "m5.2xlarge": InstanceType(0),
    "c6i.4xlarge": InstanceType(0),
    "g5.xlarge": InstanceType(1, 24, "A10G"),
    "g5.2xlarge": InstanceType(1, 24, "A10G"),
    "g5.4xlarge": InstanceType(1, 24, "A10G"),
    "g5.12xlarge": InstanceType(4, 24, "A10G"),
    "g5.48xlarge": InstanceType(8, 24, "A10G"),
    "g6.12xlarge": InstanceType(4, 24, "L4"),
    "p4d.24xlarge": InstanceType(8, 40, "A100"),
}

# Parameters in billions, by the model name a stage reports (ase_ray.features.model_info.stage_model).
MODEL_PARAMS_B: dict[str, float] = {
    "Salesforce/instructblip-vicuna-7b": 7.9,  # ViT-g + Q-Former + Vicuna-7B: ~15.8 GB in bf16
    "meta-llama/Llama-2-7b-chat-hf": 6.74,  # ~13.5 GB in bf16
    "microsoft/resnet-50": 0.0256,
    "bert-base-uncased": 0.110,
    "HuggingFaceTB/SmolLM2-135M-Instruct": 0.135,
    "efficientnet-lite0": 0.0047,
    "efficientnet-lite1": 0.0054,
    "efficientnet-lite2": 0.0061,
    "sentence-transformers/all-MiniLM-L6-v2": 0.0227,
    "tiny-random-instructblip": 0.0,
    "tiny-random-llama": 0.0,
    "tiny-random-resnet": 0.0,
    "tiny-random-bert": 0.0,
    "measure": 0.0,
    "none": 0.0,
    "tesseract": 0.0,
    "rapidocr PP-OCR (ONNX)": 0.0,
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ACTIVATION_HEADROOM = 1.2  # activations, KV cache of a generating batch, allocator slack
CUDA_CONTEXT_GB = 1.0  # per GPU a process uses


# ------------------------------------------------------------------------------------ offered
@dataclass(frozen=True)
class NodeType:
    name: str
    instance_type: str
    count: int
    gpus: int
    gpu_memory_gb: float
    gpu: str


def node_types(launcher: dict[str, Any]) -> list[NodeType]:
    """The launcher config's node types with their GPUs; a node type without an instance type (the
    local provider) offers the GPUs it declares in ``resources`` and must then say no more."""
    head = launcher.get("head_node_type")
    out = []
    for name, spec in (launcher.get("available_node_types") or {}).items():
        count = int(spec.get("max_workers", 0)) + (1 if name == head else 0)
        declared = (spec.get("resources") or {}).get("GPU")
        instance = (spec.get("node_config") or {}).get("InstanceType")
        if instance is None:
            if declared:
                raise ClusterFitError(f"node type {name} declares {declared} GPUs but no InstanceType: "
                                      "their memory is unknown")
            out.append(NodeType(name, "", count, 0, 0.0, ""))
            continue
        if instance not in INSTANCE_TYPES:
            raise ClusterFitError(f"instance type {instance!r} of node type {name} is not in "
                                  f"ase_ray.cluster_fit.INSTANCE_TYPES (known: {', '.join(INSTANCE_TYPES)}): "
                                  "add its GPU count and memory")
        known = INSTANCE_TYPES[instance]
        gpus = int(declared) if declared is not None else known.gpus
        out.append(NodeType(name, instance, count, gpus, known.gpu_memory_gb, known.gpu))
    return out


def offered_gpus(nodes: list[NodeType]) -> int:
    return sum(n.count * n.gpus for n in nodes)


# -------------------------------------------------------------------------------------- asked
@dataclass
class GpuAsk:
    """One actor or replica: its GPUs and, per GPU index it sees, the models (name, GB) it loads."""

    owner: str
    gpus: float
    loads: dict[int, list[tuple[str, float]]] = field(default_factory=dict)


def model_gb(model: str, dtype: str) -> float:
    """Approximate weights in GB of a model in ``dtype``."""
    if model not in MODEL_PARAMS_B:
        raise ClusterFitError(f"model {model!r} is not in ase_ray.cluster_fit.MODEL_PARAMS_B: add its "
                              "parameter count to check that it fits its GPU")
    return MODEL_PARAMS_B[model] * DTYPE_BYTES[dtype]


def _stage_load(stage: str, settings: Any) -> tuple[str, float]:
    model = stage_model(stage, settings)["model"]
    return model, model_gb(model, getattr(settings, "dtype", "float32"))


def pool_asks(config: Any) -> list[GpuAsk]:
    """One ask per actor of every stage pool that takes GPUs (its model on the first GPU it sees)."""
    asks = []
    for stage_cls, settings in stage_plan_of(config.features):
        res = settings.resources
        if res.num_gpus <= 0:
            continue
        load = _stage_load(stage_cls.name, settings)
        asks += [GpuAsk(f"features.{stage_cls.name} actor {i + 1}/{res.actors}", res.num_gpus, {0: [load]})
                 for i in range(res.actors)]
    return asks


def gpu_index(device: str) -> int | None:
    """The visible GPU a torch device string lands on (auto and cuda: the first), None for cpu."""
    if device == "cpu":
        return None
    return int(device.split(":", 1)[1]) if ":" in device else 0


def serve_asks(config: Any) -> tuple[list[GpuAsk], list[str]]:
    """One ask per replica of every deployment with GPUs; a Features replica's models by device.
    Also returns the problems found on the way (a device beyond the replica's GPUs)."""
    from ase_ray.serve.predictor import serving_features

    s = config.serve
    asks: list[GpuAsk] = []
    problems: list[str] = []
    if s.features.num_gpus > 0:
        loads: dict[int, list[tuple[str, float]]] = {}
        features = serving_features(config.features, None, s.features)
        for stage_cls, settings in stage_plan_of(features):
            if not hasattr(settings, "device"):
                continue  # OCR: no torch model
            index = gpu_index(settings.device)
            if index is None:
                continue
            if index >= math.ceil(s.features.num_gpus):
                problems.append(f"serve.features: {stage_cls.name} is placed on {settings.device} but a replica "
                                f"has {s.features.num_gpus:g} GPU(s) (serve.features.num_gpus)")
                continue
            loads.setdefault(index, []).append(_stage_load(stage_cls.name, settings))
        asks += [GpuAsk(f"serve.features replica {r + 1}/{s.features.num_replicas}", s.features.num_gpus, loads)
                 for r in range(s.features.num_replicas)]
    for name in ("ingress", "classifier"):
        deployment = getattr(s, name)
        if deployment.num_gpus > 0:
            asks += [GpuAsk(f"serve.{name} replica {r + 1}/{deployment.num_replicas}", deployment.num_gpus)
                     for r in range(deployment.num_replicas)]
    return asks, problems


# ------------------------------------------------------------------------------------- checks
def asked_gpus(asks: list[GpuAsk]) -> float:
    """Whole GPUs the asks need: whole-GPU asks as they are, fractional ones packed together."""
    whole = sum(a.gpus for a in asks if a.gpus >= 1)
    return whole + math.ceil(round(sum(a.gpus for a in asks if a.gpus < 1), 9))


def count_problems(workload: str, asks: list[GpuAsk], nodes: list[NodeType]) -> list[str]:
    asked, offered = asked_gpus(asks), offered_gpus(nodes)
    if asked <= offered:
        return []
    by_owner: dict[str, float] = {}
    for a in asks:
        key = a.owner.rsplit(" ", 2)[0]
        by_owner[key] = by_owner.get(key, 0) + a.gpus
    asked_text = ", ".join(f"{k} {v:g}" for k, v in by_owner.items())
    offered_text = ", ".join(f"{n.name} {n.count} x {n.gpus}" for n in nodes if n.gpus)
    return [f"{workload} ask for {asked:g} GPUs ({asked_text}) but the node types offer {offered} "
            f"({offered_text or 'no GPU node type'})"]


def packing_problems(asks: list[GpuAsk], nodes: list[NodeType]) -> list[str]:
    """Place the asks, largest first, on the first node with room (Ray's rules: an ask of n >= 1 GPUs
    takes n whole GPUs of one node, a fractional ask a share of one GPU)."""
    free = [[1.0] * n.gpus for n in nodes for _ in range(n.count)]
    problems = []
    for ask in sorted(asks, key=lambda a: -a.gpus):
        if ask.gpus >= 1 and ask.gpus != int(ask.gpus):
            problems.append(f"{ask.owner}: {ask.gpus:g} GPUs (Ray takes a fraction only below 1)")
        elif not any(_place(ask.gpus, node) for node in free):
            problems.append(f"{ask.owner}: no node has {ask.gpus:g} free GPU(s) on it for it "
                            f"(largest node type: {max((n.gpus for n in nodes), default=0)} GPUs)")
    return problems


def _place(gpus: float, node: list[float]) -> bool:
    if gpus >= 1:
        whole = [i for i, f in enumerate(node) if f >= 1.0]
        if len(whole) < gpus:
            return False
        for i in whole[: int(gpus)]:
            node[i] = 0.0
        return True
    for i, f in enumerate(node):
        if f + 1e-9 >= gpus:
            node[i] = f - gpus
            return True
    return False


def memory_problems(asks: list[GpuAsk], nodes: list[NodeType]) -> list[str]:
    """Every GPU of every ask holds its models, on the smallest GPU of a node type that can host it."""
    problems = []
    for ask in asks:
        hosts = [n for n in nodes if n.gpus >= math.ceil(ask.gpus)]
        if not hosts or not ask.loads:
            continue  # no host: packing_problems says so; no model: nothing to fit
        host = min(hosts, key=lambda n: n.gpu_memory_gb)
        given = host.gpu_memory_gb * min(ask.gpus, 1.0)
        for index, models in sorted(ask.loads.items()):
            need = sum(gb for _, gb in models) * ACTIVATION_HEADROOM + CUDA_CONTEXT_GB
            if need > given:
                names = " + ".join(f"{m} ({gb:.1f} GB)" for m, gb in models)
                problems.append(f"{ask.owner}: {names} need ~{need:.1f} GB on its GPU {index} but get "
                                f"{given:g} GB ({min(ask.gpus, 1.0):g} of a {host.gpu_memory_gb:g} GB "
                                f"{host.gpu} on {host.instance_type})")
    return problems


def fit_problems(config: Any, launcher: dict[str, Any]) -> list[str]:
    """Everything that does not fit (empty: it fits). Raises :class:`ClusterFitError` when a table
    misses an instance type or a model."""
    nodes = node_types(launcher)
    problems = cap_problems(launcher)
    pools = pool_asks(config)
    problems += count_problems("the feature pools", pools, nodes) or packing_problems(pools, nodes)
    problems += memory_problems(pools, nodes)
    serve, placement = serve_asks(config)
    problems += placement
    problems += count_problems("the Serve deployments", serve, nodes) or packing_problems(serve, nodes)
    problems += memory_problems(serve, nodes)
    return problems


def cap_problems(launcher: dict[str, Any]) -> list[str]:
    """The cluster-wide ``max_workers`` must let every node type reach its own ``max_workers``."""
    cap = launcher.get("max_workers")
    head = launcher.get("head_node_type")
    wanted = sum(int(s.get("max_workers", 0)) for n, s in (launcher.get("available_node_types") or {}).items()
                 if n != head)
    if cap is not None and wanted > int(cap):
        return [f"the node types' max_workers add up to {wanted} but the cluster's max_workers is {cap}: "
                "the GPUs counted here cannot all start"]
    return []
