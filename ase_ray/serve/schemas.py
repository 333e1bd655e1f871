"""Pydantic models of the HTTP API (they make the OpenAPI page at /docs) and of Serve's user_config."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from ase_ray.config_base import StrictModel


class ModelSelection(StrictModel):
    """The ``user_config`` of the Features and Classifier deployments: changing it swaps the model or
    the threshold on the running replicas (Serve calls ``reconfigure``), with no redeploy."""

    model_uri: str
    review_threshold: float | None = Field(None, ge=0, le=1, description="None: the model's own.")


class ErrorResponse(BaseModel):
    error: str = Field(description="Machine-readable code, e.g. not_an_image, too_many_pixels.")
    detail: str = Field(description="What was wrong, for a person.")


class ModelInfo(BaseModel):
    uri: str = Field(description="The model URI the server was configured with.")
    name: str | None = Field(None, description="Registered model name (None for a plain run URI).")
    version: str | None = Field(None, description="Registered version the URI resolved to at load time.")
    alias: str | None = Field(None, description="Registry alias of the URI, e.g. champion.")
    run_id: str | None = Field(None, description="MLflow run that logged the model.")


class OcrResult(BaseModel):
    text: str = Field(description="Raw OCR text.")
    fields: dict[str, Any] = Field(description="KEY value pairs read from the text (numbers as numbers).")


class GeneratedTexts(BaseModel):
    description: str = Field(description="The VLM's (or the offline describer's) description.")
    reasoning: str = Field(description="The LLM's reasoning (generate mode); empty in forward mode, which writes no text.")


class ImageInfo(BaseModel):
    filename: str
    image_id: str = Field(description="sha256 of the uploaded bytes.")
    width: int
    height: int
    format: str


class Prediction(BaseModel):
    label: str = Field(description="Predicted class.")
    probabilities: dict[str, float] = Field(description="Probability per class.")
    confidence: float = Field(description="The top probability.")
    needs_review: bool = Field(description="True when the top probability is under review_threshold.")
    review_threshold: float = Field(description="Chosen on the model's validation split for serve.review_fraction "
                                    "unless serve.review_threshold sets it.")
    p_defect: float | None = Field(None, description="1 - P(normal): the probability of any defect.")
    decision: str | None = Field(None, description="The line decision: reject when p_defect >= defect_threshold, "
                                 "else pass (None: the model has no reject threshold).")
    defect_threshold: float | None = Field(None, description="Reject threshold on p_defect, chosen on the model's "
                                           "validation split for evaluate.max_escape_rate.")
    dots: list[list[float]] = Field(default_factory=list, description="Detected pink dots: [x, y, radius] in "
                                    "pixels of the uploaded image (data.tda's colour and size).")
    ocr: OcrResult
    texts: GeneratedTexts
    image: ImageInfo
    model: ModelInfo
    metadata: dict[str, Any] = Field(default_factory=dict, description="This image's metadata record, echoed.")
    latency_ms: float = Field(description="Server time for this request, upload parsing to answer.")


class BatchPrediction(BaseModel):
    predictions: list[Prediction]
    count: int
    model: ModelInfo
    latency_ms: float


class Health(BaseModel):
    status: str = "ok"


class Readiness(BaseModel):
    status: str = "ready"
    deployments: dict[str, str]


class Limits(BaseModel):
    max_upload_bytes: int
    max_pixels: int
    max_batch_images: int
    allowed_formats: list[str]


class Batching(BaseModel):
    max_batch_size: int
    batch_wait_timeout_s: float


class Metadata(BaseModel):
    model: ModelInfo
    task: str | None
    classes: list[str]
    review_threshold: float
    decision: dict[str, Any] = Field(default_factory=dict, description="The model's decision record: reject "
                                     "threshold, escape target, review threshold and budget, and their validation figures.")
    loaded_at: float = Field(description="Unix time the classifier replica loaded this model.")
    backends: dict[str, dict[str, Any]] = Field(
        description="Per feature stage, what the replica runs: backend, model (hub id, or the packaged model "
        "of an offline backend), source, revision (hub models) and device."
    )
    features_source: str = Field(description="'model': settings recorded with the model; 'config': served config.")
    features_key: str = Field(description="Identifies the feature settings; equal for features and classifier.")
    batching: Batching
    limits: Limits
    api_key_required: bool
    replicas: dict[str, str] = Field(description="Replica ids that answered (unchanged by a hot swap).")
    swap_error: str | None = Field(None, description="Last failed model swap (the previous model kept serving).")
    metadata_columns: dict[str, list[str]] = Field(
        default_factory=lambda: {"text": [], "numeric": []},
        description="The records a request's metadata must carry for this model: text ones (read as the "
        "metadata text source) and numeric ones (in the numeric block).")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (400, "Bad request: empty body, not an image, corrupt image, malformed JSON or multipart, or a "
              "metadata key the model reads is missing (missing_metadata)."),
        (401, "Missing or invalid API key (when one is configured)."),
        (413, "Too large: upload bytes, pixel count (decompression bomb) or images per batch."),
        (415, "Not multipart/form-data, or an image format that is not accepted."),
        (422, "The image could not be turned into features (a stage failed on it)."),
        (503, "Retry after the Retry-After header's seconds: a model swap is in progress "
              "(model_swap_in_progress), or a replica was lost and its replacement did not answer within "
              "serve.request_timeout_s (service_unavailable)."),
    )
}
NOT_FOUND = {"model": ErrorResponse, "description": "No review queue is configured, or the row is not in it "
             "(or its image is gone)."}


def upload_body(multiple: bool) -> dict[str, Any]:
    """OpenAPI request body of the upload endpoints (parsed by hand, so FastAPI cannot infer it)."""
    file_field = ({"type": "array", "items": {"type": "string", "format": "binary"}} if multiple
                  else {"type": "string", "format": "binary"})
    name = "files" if multiple else "file"
    return {
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": {
                "type": "object",
                "required": [name],
                "properties": {
                    name: file_field,
                    "metadata": {"type": "string", "description": (
                        "JSON object with the records beside the image (GET /metadata `metadata_columns`: every "
                        "key the model reads must be there, null for an unknown value), echoed back"
                        + ("; or a JSON list of one object per image." if multiple else "."))},
                },
            }}},
        }
    }
