"""Typed configuration: pydantic models are the one source of truth for every setting and its default.

YAML files (``configs/*.yaml``) and ``--set a.b.c=value`` overrides only change values. Unknown keys,
wrong types and missing files raise :class:`ConfigError` with one line naming the key and the valid
choices, which the CLI prints without a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from ase_ray.config_base import StrictModel
from ase_ray.errors import ConfigError
from ase_ray.features.settings import (
    DecodeResources,
    DescribeSettings,
    ImageEncoderSettings,
    OcrSettings,
    ReasonSettings,
    TextEncoderSettings,
)
from ase_ray.serve.settings import ServeConfig
from ase_ray.train.settings import AblateConfig, TrainConfig
from ase_ray.tune.settings import TuneConfig


# --------------------------------------------------------------------------------------- project
class ProjectConfig(StrictModel):
    work_dir: Path = Field(
        Path("work"),
        description="Where runs write data, feature stores, caches and results. On a multi-node "
        "cluster: a shared filesystem mounted at the same path on every node (EFS, NFS).",
    )
    storage_uri: str | None = Field(
        None,
        description="Shared storage for Ray Train/Tune results and MLflow artifacts: a path or a URI "
        "that Ray and MLflow understand (s3://, gs://, file://). None: under work_dir.",
    )
    seed: int = Field(0, description="Global seed for splits and training.")


class MlflowConfig(StrictModel):
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; None means sqlite:///<work_dir>/mlflow.db."
    )
    experiment: str = "ase-ray"


class RegistryConfig(StrictModel):
    """MLflow Model Registry: one registered model per task, named ``<prefix>-<task>``."""

    prefix: str = Field("ase-ray", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    champion_alias: str = Field("champion", description="The version Serve hosts.")
    challenger_alias: str = Field("challenger", description="The latest registered version that did not win.")

    @model_validator(mode="after")
    def _distinct_aliases(self) -> "RegistryConfig":
        if self.champion_alias == self.challenger_alias:
            raise ValueError("champion_alias and challenger_alias must differ")
        return self


# ------------------------------------------------------------------------------------ synthetic
class SynthClass(StrictModel):
    """How one class of the synthetic ASE-like set is drawn.

    ``fields`` are the printed measurement values (mean, std) that carry most of the class signal;
    ``dot_mean``/``dot_std``/``dot_corr`` describe where the AOI machine put its pink dot markers,
    in coordinates normalised to the inspection area (0..1 across, 0..1 down).
    """

    name: str
    count: int = Field(ge=0)
    fields: dict[str, tuple[float, float]]
    dot_mean: tuple[float, float]
    dot_std: tuple[float, float]
    dot_corr: float = Field(0.0, ge=-0.95, le=0.95)
    dots: tuple[int, int] = Field((1, 3), description="Min and max number of dots per image.")
    defect_shape: Literal["none", "line", "disk", "ring", "bar"] = "none"

    @field_validator("dot_std")
    @classmethod
    def _positive_std(cls, v: tuple[float, float]) -> tuple[float, float]:
        if min(v) <= 0:
            raise ValueError("dot_std values must be > 0")
        return v


def _default_synth_classes() -> list[SynthClass]:
    def c(name, count, len_, area, diff, mean, std, corr, shape):
        return SynthClass(
            name=name, count=count, fields={"LEN": len_, "AREA": area, "DIFF": diff},
            dot_mean=mean, dot_std=std, dot_corr=corr, defect_shape=shape,
        )

    return [  # counts follow the paper: 225 normal, 92/44/50/44 defects
        c("normal", 225, (4.0, 2.5), (0.15, 0.10), (14.0, 7.0), (0.50, 0.55), (0.22, 0.20), 0.0, "none"),
        c("scratch", 92, (16.0, 5.0), (0.30, 0.12), (26.0, 9.0), (0.30, 0.40), (0.08, 0.10), 0.5, "line"),
        c("particle", 44, (6.0, 2.5), (0.60, 0.20), (44.0, 10.0), (0.70, 0.45), (0.09, 0.08), -0.3, "disk"),
        c("void", 50, (8.0, 3.0), (1.10, 0.30), (22.0, 8.0), (0.40, 0.78), (0.10, 0.07), 0.2, "ring"),
        c("bridge", 44, (12.0, 4.0), (0.50, 0.20), (58.0, 12.0), (0.75, 0.80), (0.07, 0.07), 0.0, "bar"),
    ]


class SynthConfig(StrictModel):
    """The synthetic ASE-like generator: one place for all of its parameters."""

    seed: int = 0
    scale: float = Field(1.0, gt=0, description="Multiplies every class count (0.1 = a tenth).")
    width: int = Field(320, ge=160)
    height: int = Field(256, ge=128)
    font_size: int = Field(16, ge=10, description="Printed text height in px (>= 14 reads back).")
    pixel_signal: float = Field(
        0.06, ge=0, le=1, description="Contrast of the faint defect mark under the dots (0 = none)."
    )
    dot_radius: int = Field(4, ge=2)
    dot_color: tuple[int, int, int] = (255, 60, 200)
    normal_class: str = "normal"
    classes: list[SynthClass] = Field(default_factory=_default_synth_classes)
    metadata_signal: float = Field(
        0.35, ge=0.0, le=1.0, description="How often the operator note names the image's own class, and how far "
        "the probe reading moves with the class (0: the records carry no label information).")

    @model_validator(mode="after")
    def _check_classes(self) -> "SynthConfig":
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise ValueError(f"synth class names must be unique, got {names}")
        if self.normal_class not in names:
            raise ValueError(f"normal_class {self.normal_class!r} is not one of {names}")
        return self

    def counts(self) -> dict[str, int]:
        return {c.name: max(1, round(c.count * self.scale)) if c.count else 0 for c in self.classes}


# ----------------------------------------------------------------------------------------- data
class SplitConfig(StrictModel):
    val_fraction: float = Field(0.15, ge=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    folds: int = Field(5, ge=2, description="k for k-fold cross-validation.")
    label_column: str = "label"


class TdaConfig(StrictModel):
    """Task-specific data augmentation: per-class bivariate Gaussians of pink-dot positions."""

    enabled: bool = True
    mode: Literal["balance", "count"] = Field(
        "balance", description="balance: grow each class to the largest; count: add per_class each."
    )
    per_class: int = Field(20, ge=0, description="Images added per class in mode 'count'.")
    max_factor: float = Field(
        2.0, ge=0, description="In 'balance' mode, never more than this times a class's own size."
    )
    dot_color: tuple[int, int, int] = (255, 60, 200)
    color_tolerance: int = Field(60, ge=1, le=255, description="Max per-channel distance to dot_color.")
    min_dot_area: int = Field(6, ge=1, description="Smaller pink components are noise.")
    dot_radius: int | None = Field(None, description="None: use the median detected dot radius.")
    seed: int = 0


class DataConfig(StrictModel):
    source: Literal["synthetic", "manifest", "magnetic-tile"] = "synthetic"
    manifest: Path | None = Field(None, description="Manifest path when source is 'manifest'.")
    magnetic_tile_root: Path = Path("../shared/data/magnetic_tile")
    magnetic_tile_max_gap: int = Field(
        500, ge=1, description="Frame-number gap that separates two Magnetic-tile tiles (groups)."
    )
    synth: SynthConfig = Field(default_factory=SynthConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    tda: TdaConfig = Field(default_factory=TdaConfig)
    metadata_columns: list[str] | None = Field(
        None, description="Manifest columns that travel beside each image (inspection records, operator notes, "
        "machine readings) and reach the model: text columns as the `metadata` text source, numeric ones in the "
        "numeric block (ase_ray.data.metadata). None: the columns the data set's dataset.yaml names under "
        "metadata_columns (the synthetic set names its own); []: none.")


# ------------------------------------------------------------------------------------- features
class FeaturesConfig(StrictModel):
    """Feature extraction (Ray Data): the five stages, the cache and the store."""

    ocr: OcrSettings = Field(default_factory=OcrSettings)
    describe: DescribeSettings = Field(default_factory=DescribeSettings)
    reason: ReasonSettings = Field(default_factory=ReasonSettings)
    image_encoder: ImageEncoderSettings = Field(default_factory=ImageEncoderSettings)
    text_encoder: TextEncoderSettings = Field(default_factory=TextEncoderSettings)
    decode: DecodeResources = Field(
        default_factory=DecodeResources,
        description="Resources of the decode/hash step (Ray tasks; actors is unused).",
    )
    cache_dir: str | None = Field(
        None, description="Stage cache, a path or a URI (s3://...): Parquet shards any node can read. None: "
        "<storage_uri>/cache when project.storage_uri is a URI, else <work_dir>/cache.",
    )
    out_dir: str | None = Field(
        None, description="Feature store folder, a path or a URI (s3://...). None: <storage_uri>/features when "
        "project.storage_uri is a URI, else <work_dir>/features.",
    )
    models_dir: Path | None = Field(
        None, description="Hub models pulled by `ase-ray models pull` (the Hugging Face cache layout). Set: the hub "
        "backends load from it only (local_files_only, at their revision). None: the hub (or a local model_id "
        "folder). Shared on a cluster.",
    )
    sample_texts: int = Field(20, ge=0, description="Generated texts logged to MLflow as a sample.")
    fuse_cpu_stages: bool = Field(
        True, description="With fuse_all_stages off: two actor pools instead of six, decode with the image stages "
        "(OCR, describer, image encoder; the pixels never leave the actor), and the LLM with the text encoder. "
        "False: each stage its own pool (a cluster: OCR scales on CPUs, the VLM and LLM take GPUs).",
    )
    fuse_all_stages: bool = Field(
        True, description="One actor pool runs every stage, decode to text encoder, with the LLM's pool size and "
        "batch size (features.reason.resources): each actor takes its batch from the image file to the vectors, so "
        "nothing waits for another pool and every core works from the first batch. Overrides fuse_cpu_stages. "
        "False: the pools of fuse_cpu_stages (a cluster: the VLM and LLM on GPU pools of their own).",
    )
    store_writers: int = Field(
        1, ge=1, description="Actors that write the store's shards, started with the pipeline (the last shard, "
        "written after the last batch, does not wait for a worker to start).",
    )
    shard_rows: int = Field(
        64, ge=1, description="Most rows a worker writes into one store shard (features.parquet/part-*.parquet); "
        "bounds a writer's memory: about 0.8 MB a row at the cluster's widths.",
    )


# ------------------------------------------------------------------------------------------ ray
class RayConfig(StrictModel):
    address: str | None = Field(
        None, description="Existing cluster ('auto', 'ray://...'); None: RAY_ADDRESS or a local Ray."
    )
    num_cpus: int | None = Field(None, description="CPUs of a local Ray (None: all).")
    temp_dir: Path | None = None
    log_to_driver: bool | None = Field(
        None, description="Forward the workers' output to the driver's console. None: follow the console, "
        "i.e. on with `ase-ray --verbose` or as a library, off on the quiet CLI (it is in Ray's session logs).",
    )
    env_vars: dict[str, str] = Field(default_factory=dict, description="Extra worker environment.")


# ------------------------------------------------------------------------------------- evaluate
class EvaluateConfig(StrictModel):
    """The line's figures (``ase_ray.models.decision``): escape and overkill rates."""

    max_escape_rate: float = Field(
        0.05, ge=0, le=1, description="Escape target: the reject threshold on P(defect) is the largest one "
        "that passes at most this share of the validation split's defective parts; training records it with "
        "the model, Serve and `ase-ray evaluate` use it.",
    )


# ------------------------------------------------------------------------------------- pipeline
PipelineStage = Literal["data", "features", "train", "tune", "serve"]


class PipelineConfig(StrictModel):
    stages: list[PipelineStage] = Field(
        default_factory=lambda: ["data", "features", "train", "tune", "serve"],
        description="Stages `ase-ray pipeline` runs, in this order.",
    )
    register_train: bool = Field(True, description="Register the train stage's model (champion if it is the best).")
    tune_space: Path | None = Field(
        None, description="Search space of the tune stage; None: the built-in PIPELINE_SPACE (ase_ray.tune.space)."
    )


# ----------------------------------------------------------------------------------------- root
class AppConfig(StrictModel):
    project: ProjectConfig = Field(default_factory=ProjectConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    ablate: AblateConfig = Field(default_factory=AblateConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)


# ------------------------------------------------------------------------------ load / overrides
def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> AppConfig:
    """Read YAML (or nothing: all defaults), apply ``a.b.c=value`` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value)
    return validate_config(raw)


def apply_overrides(config: AppConfig, values: Mapping[str, Any]) -> AppConfig:
    """A copy of ``config`` with ``{"a.b.c": value}`` applied and validated (unknown keys named)."""
    raw = config.model_dump(mode="json")
    for key, value in values.items():
        _set_dotted(raw, key, value)
    return validate_config(raw)


def check_key(key: str) -> None:
    """Raise :class:`ConfigError` naming the valid choices when ``key`` is not a config path."""
    _check_path(key)


def validate_config(raw: dict[str, Any]) -> AppConfig:
    try:
        return AppConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(exc)) from None


def dump_config(config: AppConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def flatten_config(config: AppConfig | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config to ``{"a.b.c": value}``; lists of models are indexed (``classes.0.name``)."""
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{name}.") if value else {name: "{}"})
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                flat.update(flatten_config(item, f"{name}.{i}."))
        else:
            flat[name] = value
    return flat


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at position "
                          f"{exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top, not {type(data).__name__}")
    return data


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key part")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key, value


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    _check_path(key)
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _check_path(key: str) -> None:
    """Reject unknown keys early, naming the valid choices at the level that went wrong."""
    model: type[BaseModel] | None = AppConfig
    walked: list[str] = []
    for part in key.split("."):
        if model is None:
            return  # below a dict/list/tuple field: leave it to validation
        fields = model.model_fields
        if part not in fields:
            where = ".".join(walked) or "top level"
            raise ConfigError(f"unknown config key {key!r}: {part!r} is not in {where} (valid: {', '.join(fields)})")
        walked.append(part)
        annotation = fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _describe_validation_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "top level"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    if err["type"] == "extra_forbidden":
        parent = _model_at(err["loc"][:-1])
        valid = f" (valid: {', '.join(parent.model_fields)})" if parent else ""
        return f"unknown config key {loc!r}{valid}{more}"
    return f"invalid config value for {loc!r}: {err['msg']} (got {err.get('input')!r}){more}"


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: Any = AppConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            model = args[0]  # list[Model]
        else:
            return None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None
