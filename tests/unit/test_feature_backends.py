"""The backend registry: every backend registered in one place, buildable by name, and no import
circles in ase_ray/features."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from ase_ray.features import backends
from ase_ray.features.backends import BACKENDS, Backend, build_backend
from ase_ray.features.model_info import HUB_BACKENDS, stage_model
from ase_ray.features.settings import OcrSettings

FEATURES = Path(__file__).resolve().parents[2] / "ase_ray" / "features"


def _import_graph() -> dict[str, set[str]]:
    """Module -> the features modules it imports anywhere (top level, functions, TYPE_CHECKING)."""
    modules = {p.stem for p in FEATURES.glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name in modules:
        deps = set()
        for node in ast.walk(ast.parse((FEATURES / f"{name}.py").read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            deps |= {n.split(".")[2] for n in names if n.startswith("ase_ray.features.")}
        graph[name] = deps & modules
    return graph


def test_features_has_no_import_circle():
    graph, state = _import_graph(), {}

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph[node]):
            assert state.get(dep) != "open", f"import circle: {' -> '.join([*path, dep])}"
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert "backends" in graph and not graph["backends"]  # the registry imports no stage module


def test_every_registered_backend_resolves_and_records_its_model():
    for entry in BACKENDS:
        module, _, attr = entry.target.partition(":")
        assert hasattr(importlib.import_module(module), attr), entry
        settings_cls = {"ocr": "OcrSettings", "describe": "DescribeSettings", "reason": "ReasonSettings",
                        "image_encoder": "ImageEncoderSettings", "text_encoder": "TextEncoderSettings"}[entry.stage]
        settings = getattr(importlib.import_module("ase_ray.features.settings"), settings_cls)(backend=entry.name)
        record = stage_model(entry.stage, settings)
        assert record["backend"] == entry.name and record["model"]
    assert HUB_BACKENDS == {"describe": "instructblip", "reason": "hf", "image_encoder": "resnet", "text_encoder": "bert"}


class EchoOcr:
    def __init__(self, settings):
        self.settings = settings


def test_a_new_backend_is_one_registry_line(monkeypatch):
    with pytest.raises(ValueError, match="unknown ocr backend 'echo'"):
        OcrSettings(backend="echo")
    monkeypatch.setattr(backends, "BACKENDS", (*BACKENDS, Backend("ocr", "echo", f"{__name__}:EchoOcr", model="echo")))
    settings = OcrSettings(backend="echo")
    built = build_backend("ocr", settings, models_dir="/ignored")  # a class without models_dir gets none
    assert isinstance(built, EchoOcr) and built.settings is settings
    assert stage_model("ocr", settings)["model"] == "echo"
