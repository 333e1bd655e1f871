"""Config section of the Ray Serve endpoint and batch prediction (light: pydantic only)."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from ase_ray.config_base import StrictModel

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True

# Stages with a torch model (and so a ``device`` setting) that a Features replica can place.
DeviceStage = Literal["describe", "reason", "image_encoder", "text_encoder"]


class DeploymentSettings(StrictModel):
    """Replicas and resources of one Serve deployment."""

    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    health_check_period_s: float = Field(
        2.0, gt=0, description="How often Serve checks each replica (Ray's default is 10 s): a dead replica is "
        "found and replaced about this soon.")
    health_check_timeout_s: float = Field(10.0, gt=0, description="A replica that does not answer a check in time is replaced.")
    max_ongoing_requests: int = Field(
        32, ge=1, description="Requests one replica holds at once (>= max_batch_size for batching to fill)."
    )


# One class per deployment, so that a partial override (--set serve.ingress.max_ongoing_requests=128)
# keeps that deployment's other defaults (a default_factory only applies when the section is absent).
class IngressSettings(DeploymentSettings):
    num_cpus: float = Field(0.1, ge=0)
    max_ongoing_requests: int = Field(64, ge=1)


class FeaturesSettings(DeploymentSettings):
    """The OCR/VLM/LLM/encoder replica (num_gpus: 2 on the GPU cluster: the VLM and the LLM on one GPU each)."""

    num_cpus: float = Field(1.0, ge=0)
    max_ongoing_requests: int = Field(32, ge=1, description="Keep >= max_batch_size so batches can fill.")
    ocr_parallel: int = Field(2, ge=1, description="tesseract processes at once on a batch in this replica.")
    devices: dict[DeviceStage, str] = Field(
        default_factory=dict,
        description="Device per model stage inside the replica (cuda:0, cuda:1, cpu), e.g. the VLM on one of "
        "its GPUs and the LLM on the other when num_gpus is 2; a stage not named keeps its own device (auto: cuda:0).",
    )

    @field_validator("devices")
    @classmethod
    def _torch_devices(cls, v: dict[str, str]) -> dict[str, str]:
        for stage, device in v.items():
            if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
                raise ValueError(f"devices.{stage}: {device!r} is not auto, cpu, cuda or cuda:<index>")
        return v


class ClassifierSettings(DeploymentSettings):
    num_cpus: float = Field(0.2, ge=0)
    max_ongoing_requests: int = Field(64, ge=1)


class BatchingSettings(StrictModel):
    """``@serve.batch`` of the feature deployment: images from concurrent requests run as one batch."""

    max_batch_size: int = Field(8, ge=1, description="1 turns dynamic batching off.")
    batch_wait_timeout_s: float = Field(
        0.05, ge=0, description="Longest wait for a batch to fill (a lone request waits this long; "
        "closed-loop clients need roughly their round trip for batches to fill)."
    )


class BatchPredictSettings(StrictModel):
    """``ase-ray predict``: the predictor actors of the Ray Data batch job."""

    batch_size: int = Field(8, ge=1, description="Images per Ray Data batch.")
    actors: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)


class ServeConfig(StrictModel):
    """``ase-ray serve`` (Ray Serve HTTP endpoint) and ``ase-ray predict`` (Ray Data batch job)."""

    host: str = Field("127.0.0.1", description="Bind address; loopback unless you mean to expose it.")
    port: int = Field(8000, ge=1, le=65535)
    app_name: str = "ase-ray"
    request_timeout_s: float = Field(
        30.0, gt=0, description="No request waits longer: past it (a replica lost and not yet replaced, say) the "
        "answer is a JSON 503 with Retry-After. Calls to a dead replica are retried on its replacement meanwhile.")
    model_uri: str | None = Field(
        None, description="models:/<name>@<alias>, models:/<name>/<version> or runs:/<id>/model; "
        "None: models:/ase-ray-<train.task>@champion."
    )
    review_threshold: float | None = Field(
        None, ge=0, le=1, description="needs_review is true when the top probability is below this. None: the "
        "model's own, chosen on its validation split for review_fraction (0.6 for a model without one).",
    )
    review_fraction: float = Field(
        0.1, ge=0, le=1, description="Review budget: the share of parts a person looks at. Training chooses the "
        "model's review threshold on the validation split so that this share falls under it.",
    )
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="Largest image file accepted.")
    max_pixels: int = Field(
        40_000_000, ge=1, description="Largest width x height accepted, read from the header before decoding."
    )
    max_batch_images: int = Field(16, ge=1, description="Most images in one /predict/batch request.")
    allowed_formats: list[str] = Field(
        default_factory=lambda: ["PNG", "JPEG", "BMP", "TIFF", "WEBP"], description="PIL format names."
    )
    api_key_env: str | None = Field(
        "ASE_RAY_API_KEY", description="Environment variable holding the API key; when it is set (not "
        "empty) every request except /healthz and /docs must send it (X-API-Key or Bearer)."
    )
    review_queue: Path | None = Field(
        None, description="An `ase-ray predict` output folder whose predictions the review page's queue shows "
        "(needs_review first); None: no queue.",
    )
    corrections_path: Path | None = Field(
        None, description="The corrections table the review page appends to; None: <work_dir>/corrections/corrections.csv.",
    )
    max_review_rows: int = Field(500, ge=1, description="Most queue rows one GET /review/queue returns.")
    feature_cache: bool = Field(
        False, description="Serve: reuse/write the stage cache (features.cache_dir). Batch prediction always uses it."
    )
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    ingress: IngressSettings = Field(default_factory=IngressSettings)
    features: FeaturesSettings = Field(default_factory=FeaturesSettings)
    classifier: ClassifierSettings = Field(default_factory=ClassifierSettings)
    predict: BatchPredictSettings = Field(default_factory=BatchPredictSettings)

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        if v and not (_is_ip_address(v) or _HOSTNAME.match(v)):
            raise ValueError(f"{v!r} is neither an IP address nor a host name")
        return v

    @field_validator("allowed_formats")
    @classmethod
    def _upper(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("allowed_formats must name at least one format")
        return [f.upper() for f in v]
