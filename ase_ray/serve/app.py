"""The Ray Serve application: FastAPI ingress -> Features (batched) -> Classifier.

- ``Ingress`` (CPU): the HTTP API; validates uploads (``inputs.py``), fans images out to Features,
  sends their arrays to Classifier, answers with the schemas of ``schemas.py``.
- ``Features`` (GPUs on a cluster; ``serve.features.devices`` places each model stage on one of
  them): the extraction stages of the batch pipeline, in-process
  (``ase_ray.features.inmemory``), with ``@serve.batch`` dynamic batching across requests.
- ``Classifier``: the MLflow pyfunc of the model.

Features and Classifier take the same ``user_config`` (:class:`~ase_ray.serve.schemas.ModelSelection`:
model URI and review threshold); a changed user_config reaches ``reconfigure`` on the running
replicas: the model (and, when the new model was trained on other feature settings, the feature
backends) swap without a redeploy.

``app_builder(args)`` is the import path for ``serve deploy`` / ``serve run`` config files;
``build_app(config)`` builds the application from a typed config.
"""


import asyncio
import logging
import os
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from ase_ray.config import AppConfig
from ase_ray.errors import AseRayError, RequestError
from ase_ray.registry import served_model_uri
from ase_ray.serve import inputs
from ase_ray.serve.assets import asset_path, asset_url, media_type
from ase_ray.serve.schemas import (
    ERROR_RESPONSES,
    NOT_FOUND,
    BatchPrediction,
    Health,
    Metadata,
    ModelSelection,
    Prediction,
    Readiness,
    upload_body,
)

INGRESS, FEATURES, CLASSIFIER = "Ingress", "Features", "Classifier"
logger = logging.getLogger("ray.serve")

api = FastAPI(
    title="ase-ray defect classifier",
    description="Upload an AOI image, get the defect class, its probabilities, the OCR fields and the "
    "generated texts. Errors are JSON: {\"error\": code, \"detail\": message}.",
    version="1",
    docs_url=None,  # /docs and /redoc below load their bundles from this server, not a CDN
    redoc_url=None,
)


@api.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None else None
    return JSONResponse({"error": exc.code, "detail": exc.message}, status_code=exc.status, headers=headers)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Never a stack trace to the client; the replica log keeps it.
    return JSONResponse({"error": "internal_error", "detail": type(exc).__name__}, status_code=500)


RETRY_AFTER_S = 2  # Retry-After of a 503: about one health-check period, by when a lost replica is being replaced


def _replica_lost_errors() -> tuple[type[BaseException], ...]:
    """Errors of a call whose replica died or is not there yet: safe to send again (extraction and
    classification are idempotent)."""
    from ray.exceptions import ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    return (RayActorError, ActorUnavailableError, BackPressureError, DeploymentUnavailableError)


async def call_until(deadline: float, what: str, make_call):
    """``await make_call()`` (a DeploymentHandle call), sent again while its replica is lost, until
    ``deadline`` (time.monotonic()); past it, a JSON 503 with Retry-After instead of waiting on."""
    lost = _replica_lost_errors()
    delay, attempts = 0.05, 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RequestError(503, "service_unavailable", f"{what} did not answer within the request timeout "
                               f"({attempts} attempt(s)); retry", RETRY_AFTER_S)
        attempts += 1
        try:
            return await asyncio.wait_for(make_call(), timeout=remaining)
        except asyncio.TimeoutError:
            continue  # the loop's head answers the 503
        except lost as exc:
            logger.warning(f"{what}: {type(exc).__name__}; sending the call again (attempt {attempts + 1})")
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 1.0)


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica (tests of the class itself)
        return f"pid-{os.getpid()}"


# -------------------------------------------------------------------------------------- features
@serve.deployment(name=FEATURES)
class Features:
    """OCR / describer / reasoner / encoders, loaded once per replica; images batched across requests."""

    def __init__(self, config: dict[str, Any]) -> None:
        from ase_ray.tracking import tracking_uri

        self.config = AppConfig.model_validate(config)
        self.tracking_uri = tracking_uri(self.config)
        self.extractor = None
        self.features = None
        self.source = "config"
        self.selection: ModelSelection | None = None
        self.metadata_columns = None
        batching = self.config.serve.batching
        self.extract.set_max_batch_size(batching.max_batch_size)
        self.extract.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        from ase_ray.features.inmemory import FeatureExtractor, features_key
        from ase_ray.features.pipeline import cache_root
        from ase_ray.serve.predictor import (
            model_serving_record,
            resolve_model_ref,
            serving_features,
        )

        selection = ModelSelection.model_validate(user_config)
        try:
            ref = resolve_model_ref(selection.model_uri, self.tracking_uri)
            recorded, metadata_columns = model_serving_record(ref, self.tracking_uri)
        except AseRayError:
            if self.extractor is None:
                raise
            return  # keep serving the current features; Classifier reports the failed swap
        features = serving_features(self.config.features, recorded, self.config.serve.features)
        if self.extractor is None or features_key(features) != self.extractor.key:
            cache = str(cache_root(self.config)) if self.config.serve.feature_cache else None
            self.extractor = FeatureExtractor(features, cache).load()
            self.features = features
        self.source = "model" if recorded else "config"
        self.selection = selection
        self.metadata_columns = metadata_columns

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)  # set from serve.batching in __init__
    async def extract(self, items: list) -> list[dict[str, Any]]:
        """One call per (image, metadata record); Serve hands this method those of concurrent requests
        together."""
        extractor, columns = self.extractor, self.metadata_columns  # a swap during the batch mixes nothing
        return await asyncio.to_thread(self._extract, extractor, columns, items)

    @staticmethod
    def _extract(extractor, columns, items: list) -> list[dict[str, Any]]:
        from ase_ray.data.metadata import metadata_text, missing_keys
        from ase_ray.serve.predictor import feature_rows

        started = time.perf_counter()
        missing = [missing_keys(record, columns) for _, record in items]
        ok = [i for i, m in enumerate(missing) if not m]  # a record without a needed key is not extracted
        rows: list[dict[str, Any]] = [
            {"error": "", "missing_metadata": m, "metadata_columns": columns.to_json(), "texts": {}, "arrays": {}, "image_id": items[i][0].image_id}
            for i, m in enumerate(missing)]
        if ok:
            extracted = extractor([items[i][0] for i in ok], [metadata_text(items[i][1], columns.text) for i in ok])
            stages = " ".join(f"{k} {v * 1000:.0f}" for k, v in extracted.seconds.items())
            logger.info(f"batch of {len(ok)} image(s) in {(time.perf_counter() - started) * 1000:.0f} ms ({stages} ms)")
            for i, row in zip(ok, feature_rows(extracted)):
                rows[i] = row
        for row in rows:
            row["features_key"] = extractor.key
            row["batch_size"] = len(ok)
        return rows

    def ping(self) -> str:
        return "ok"

    def check_health(self) -> None:
        """Serve's replica health check: a replica whose extractor never loaded is replaced."""
        if self.extractor is None:
            raise RuntimeError("feature extractor not loaded")

    def describe(self) -> dict[str, Any]:
        batching = self.config.serve.batching
        return {
            "backends": self.extractor.ran_models(),
            "features_source": self.source,
            "features_key": self.extractor.key,
            "metadata_columns": self.metadata_columns.to_json(),
            "batching": {"max_batch_size": batching.max_batch_size,
                         "batch_wait_timeout_s": batching.batch_wait_timeout_s},
            "replica": _replica_id(),
        }


# ------------------------------------------------------------------------------------ classifier
@serve.deployment(name=CLASSIFIER)
class Classifier:
    """The MLflow pyfunc, loaded once per replica and again only when user_config names another model."""

    def __init__(self, config: dict[str, Any]) -> None:
        from ase_ray.tracking import tracking_uri

        self.config = AppConfig.model_validate(config)
        self.tracking_uri = tracking_uri(self.config)
        self.model = None
        self.expected_key = ""
        self.threshold = self.config.serve.review_threshold or 0.0  # set by reconfigure
        self.swap_error: str | None = None

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        from ase_ray.features.inmemory import features_key
        from ase_ray.models.inference import replica_device
        from ase_ray.serve.predictor import (
            load_model,
            resolve_model_ref,
            serving_features,
        )

        selection = ModelSelection.model_validate(user_config)
        try:
            ref = resolve_model_ref(selection.model_uri, self.tracking_uri)
            if self.model is None or ref != self.model.ref:
                # On the replica's GPU when serve.classifier.num_gpus gives it one, else the CPU.
                model = load_model(ref, self.tracking_uri, replica_device(self.config.serve.classifier.num_gpus))
                key = features_key(serving_features(self.config.features, model.feature_settings))
                self.model, self.expected_key = model, key
            self.swap_error = None
        except AseRayError as exc:
            if self.model is None:
                raise
            self.swap_error = str(exc)  # the previous model keeps serving
        self.threshold = self.model.review_threshold(selection.review_threshold)

    def classify(self, rows: list[dict[str, Any]], keys: list[str], ocr_fields: list[Any] | None = None,
                 metadata: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        from ase_ray.serve.predictor import classify

        model, threshold = self.model, self.threshold
        if any(key != self.expected_key for key in keys):
            return {"swap_in_progress": True}  # features from another model's settings: the caller retries
        return {"predictions": classify(model, rows, threshold, ocr_fields, metadata), "model": model.ref.describe(),
                "review_threshold": threshold}

    def ping(self) -> str:
        return "ok"

    def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError("model not loaded")

    def describe(self) -> dict[str, Any]:
        return {**self.model.describe(), "review_threshold": self.threshold, "decision": self.model.decision,
                "swap_error": self.swap_error,
                "features_key": self.expected_key, "replica": _replica_id()}


# --------------------------------------------------------------------------------------- ingress
# Helpers come before the class: @serve.ingress serializes the class where it is defined, so a
# module-level name defined below it would be missing in the replica.
def _model_info(model: dict[str, Any]) -> dict[str, Any]:
    return {k: model.get(k) for k in ("uri", "name", "version", "alias", "run_id")}


def _limits(limits: inputs.Limits) -> dict[str, Any]:
    return {"max_upload_bytes": limits.max_upload_bytes, "max_pixels": limits.max_pixels,
            "max_batch_images": limits.max_batch_images, "allowed_formats": list(limits.allowed_formats)}


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


def _dots(image: inputs.ValidImage, tda) -> list[list[float]]:
    from ase_ray.data.tda import find_dot_components

    found = find_dot_components(image.decoded.image, tda)
    return [[round(float(x), 1), round(float(y), 1), round(float(r), 1)] for (x, y), r in zip(found.centres, found.radii)]


def _prediction(result: dict[str, Any], i: int, row: dict[str, Any], image: inputs.ValidImage,
                metadata: dict[str, Any], started: float, tda=None) -> Prediction:
    p = result["predictions"][i]
    texts = row["texts"]
    return Prediction(
        dots=_dots(image, tda) if tda is not None else [],
        label=p["label"], probabilities=p["probabilities"], confidence=p["confidence"],
        needs_review=p["needs_review"], review_threshold=result["review_threshold"],
        p_defect=p["p_defect"], decision=p["decision"], defect_threshold=p["defect_threshold"],
        ocr={"text": texts["ocr_text"], "fields": texts["ocr_fields"]},
        texts={"description": texts["description"], "reasoning": texts["reasoning"]},
        image={"filename": image.filename, "image_id": image.decoded.image_id, "width": image.width,
               "height": image.height, "format": image.format},
        model=_model_info(result["model"]), metadata=metadata, latency_ms=_ms(started),
    )


@serve.deployment(name=INGRESS)
@serve.ingress(api)
class Ingress:
    def __init__(self, features: DeploymentHandle, classifier: DeploymentHandle, config: dict[str, Any],
                 api_key_sha256: str | None = None) -> None:
        self.features = features
        self.classifier = classifier
        self.config = AppConfig.model_validate(config)
        self.limits = inputs.Limits.from_config(self.config.serve)
        self.api_key_sha256 = api_key_sha256 or inputs.env_key_digest(self.config.serve.api_key_env)

    @api.get("/healthz", response_model=Health)
    async def healthz(self) -> Health:
        """Liveness of the HTTP front: answers while this replica runs, whatever the others do."""
        return Health()

    @api.get("/readyz", response_model=Readiness, responses={503: ERROR_RESPONSES[503]})
    async def readyz(self) -> Readiness:
        """Readiness: the feature and classifier replicas answer a ping within a few seconds; else a
        JSON 503 with Retry-After (a replica lost and not yet replaced, a model still loading)."""
        deadline = time.monotonic() + min(3.0, self.config.serve.request_timeout_s)
        await asyncio.gather(call_until(deadline, FEATURES, self.features.ping.remote),
                             call_until(deadline, CLASSIFIER, self.classifier.ping.remote))
        return Readiness(deployments={FEATURES: "ok", CLASSIFIER: "ok"})

    @api.get("/metadata", response_model=Metadata, responses={401: ERROR_RESPONSES[401]})
    async def metadata(self, request: Request) -> Metadata:
        inputs.check_api_key(self.api_key_sha256, request.headers)
        deadline = time.monotonic() + self.config.serve.request_timeout_s
        model, features = await asyncio.gather(call_until(deadline, CLASSIFIER, self.classifier.describe.remote),
                                               call_until(deadline, FEATURES, self.features.describe.remote))
        return Metadata(
            model=_model_info(model), task=model["task"], classes=model["classes"],
            review_threshold=model["review_threshold"], decision=model.get("decision") or {}, loaded_at=model["loaded_at"],
            backends=features["backends"], features_source=features["features_source"],
            features_key=features["features_key"], batching=features["batching"],
            limits=_limits(self.limits), api_key_required=bool(self.api_key_sha256),
            replicas={"classifier": model["replica"], "features": features["replica"], "ingress": _replica_id()},
            swap_error=model["swap_error"], metadata_columns=model.get("metadata_columns") or {"text": [], "numeric": []},
        )

    @api.post("/predict", response_model=Prediction, responses=ERROR_RESPONSES, openapi_extra=upload_body(False))
    async def predict(self, request: Request) -> Prediction:
        started = time.perf_counter()
        images, metadata = await self._read(request, batch=False)
        result, rows = await self._run(images, metadata)
        return _prediction(result, 0, rows[0], images[0], metadata[0], started, self.config.data.tda)

    @api.post("/predict/batch", response_model=BatchPrediction, responses=ERROR_RESPONSES,
              openapi_extra=upload_body(True))
    async def predict_batch(self, request: Request) -> BatchPrediction:
        started = time.perf_counter()
        images, metadata = await self._read(request, batch=True)
        result, rows = await self._run(images, metadata)
        predictions = [_prediction(result, i, rows[i], images[i], metadata[i], started, self.config.data.tda)
                       for i in range(len(images))]
        return BatchPrediction(predictions=predictions, count=len(predictions), model=_model_info(result["model"]),
                               latency_ms=_ms(started))

    # ------------------------------------------------------------------ pages: offline, no key needed
    @api.get("/ui", include_in_schema=False)
    async def ui(self) -> FileResponse:
        """The review page (plain HTML + a little JavaScript, every asset from this server)."""
        return FileResponse(asset_path("review.html"), media_type=media_type("review.html"))

    @api.get("/assets/{name}", include_in_schema=False)
    async def asset(self, name: str) -> FileResponse:
        return FileResponse(asset_path(name), media_type=media_type(name))

    @api.get("/docs", include_in_schema=False)
    async def docs(self) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=api.openapi_url, title=f"{api.title} - API docs",
                                   swagger_js_url=asset_url("swagger-ui-bundle.js"),
                                   swagger_css_url=asset_url("swagger-ui.css"),
                                   swagger_favicon_url=asset_url("favicon.png"))

    @api.get("/redoc", include_in_schema=False)
    async def redoc(self) -> HTMLResponse:
        return get_redoc_html(openapi_url=api.openapi_url, title=f"{api.title} - ReDoc",
                              redoc_js_url=asset_url("redoc.standalone.js"), redoc_favicon_url=asset_url("favicon.png"),
                              with_google_fonts=False)

    # ----------------------------------------------------------------------------- review queue
    @api.get("/review/queue", responses={401: ERROR_RESPONSES[401], 404: NOT_FOUND})
    async def review_queue(self, request: Request) -> dict[str, Any]:
        """The rows of the configured `ase-ray predict` output (serve.review_queue), needs_review first,
        each with its latest correction."""
        from ase_ray.serve.review import queue_rows, read_predictions
        from ase_ray.train.corrections import corrections_path, read_corrections

        inputs.check_api_key(self.api_key_sha256, request.headers)
        s = self.config.serve
        predictions = read_predictions(s.review_queue)
        model = await self.classifier.describe.remote()
        table = corrections_path(self.config)
        rows = queue_rows(predictions, read_corrections(table), s.max_review_rows)
        return {"rows": rows, "total": int(len(predictions)), "needs_review": int(predictions["needs_review"].sum()),
                "classes": model["classes"], "corrections_path": str(table)}

    @api.get("/review/image/{row_id}", responses={401: ERROR_RESPONSES[401], 404: NOT_FOUND})
    async def review_image(self, row_id: int, request: Request) -> Response:
        from ase_ray.serve.review import image_bytes, queue_row, read_predictions

        inputs.check_api_key(self.api_key_sha256, request.headers)
        row = queue_row(read_predictions(self.config.serve.review_queue), row_id)
        data, media = image_bytes(row, self.limits.max_upload_bytes)
        return Response(data, media_type=media)

    @api.post("/review/corrections", responses={400: ERROR_RESPONSES[400], 401: ERROR_RESPONSES[401], 404: NOT_FOUND})
    async def review_correction(self, request: Request) -> dict[str, Any]:
        """Body ``{"row_id": int, "label": str}``: append a person's label of a queue row to the
        corrections table; returns the row written."""
        from ase_ray.serve.review import correction_record, parse_correction, queue_row, read_predictions
        from ase_ray.train.corrections import append_correction, corrections_path

        inputs.check_api_key(self.api_key_sha256, request.headers)
        body = await inputs.read_body(request.headers, request.stream(), 64 * 1024)
        row_id, label = parse_correction(body)
        s = self.config.serve
        row = queue_row(read_predictions(s.review_queue), row_id)
        model = await self.classifier.describe.remote()
        record = correction_record(row, label, model["classes"], s.review_queue)
        return await asyncio.to_thread(append_correction, corrections_path(self.config), record)

    async def _read(self, request: Request, batch: bool) -> tuple[list[inputs.ValidImage], list[dict[str, Any]]]:
        return await inputs.read_request(request.headers, request.stream(), self.limits, self.api_key_sha256, batch)

    async def _run(self, images: list[inputs.ValidImage],
                   metadata: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        from ase_ray.data.metadata import MetadataColumns
        from ase_ray.serve.predictor import missing_metadata_message

        deadline = time.monotonic() + self.config.serve.request_timeout_s
        rows = await asyncio.gather(*(
            call_until(deadline, FEATURES, lambda item=(image.decoded, record): self.features.extract.remote(item))
            for image, record in zip(images, metadata)))
        for i, row in enumerate(rows):
            if row.get("missing_metadata"):
                columns = MetadataColumns.from_json(row["metadata_columns"])
                raise RequestError(400, "missing_metadata",
                                   missing_metadata_message(row["missing_metadata"], columns, i, len(rows)))
        for i, row in enumerate(rows):
            if row["error"]:
                raise RequestError(422, "unprocessable_image", f"image {i}: feature extraction failed at {row['error'][:300]}")
        args = ([row["arrays"] for row in rows], [row["features_key"] for row in rows],
                [row["texts"].get("ocr_fields", {}) for row in rows], metadata)
        result = await call_until(deadline, CLASSIFIER, lambda: self.classifier.classify.remote(*args))
        if result.get("swap_in_progress"):
            raise RequestError(503, "model_swap_in_progress",
                               "the feature and classifier replicas serve different models for a moment; retry",
                               RETRY_AFTER_S)
        return result, rows


# ------------------------------------------------------------------------------------- building
def build_app(config: AppConfig, api_key_sha256: str | None = None):
    """The application for ``config`` (paths should be absolute: see ``deploy.serving_config``)."""
    s = config.serve
    selection = ModelSelection(model_uri=served_model_uri(config),
                               review_threshold=s.review_threshold).model_dump()
    body = config.model_dump(mode="json")
    features = Features.options(
        num_replicas=s.features.num_replicas, max_ongoing_requests=s.features.max_ongoing_requests,
        ray_actor_options=_actor_options(s.features), **_health_options(s.features), user_config=selection,
    ).bind(body)
    classifier = Classifier.options(
        num_replicas=s.classifier.num_replicas, max_ongoing_requests=s.classifier.max_ongoing_requests,
        ray_actor_options=_actor_options(s.classifier), **_health_options(s.classifier), user_config=selection,
    ).bind(body)
    return Ingress.options(
        num_replicas=s.ingress.num_replicas, max_ongoing_requests=s.ingress.max_ongoing_requests,
        ray_actor_options=_actor_options(s.ingress), **_health_options(s.ingress),
    ).bind(features, classifier, body, api_key_sha256)


def _actor_options(settings) -> dict[str, Any]:
    return {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus}


def _health_options(settings) -> dict[str, Any]:
    return {"health_check_period_s": settings.health_check_period_s,
            "health_check_timeout_s": settings.health_check_timeout_s}


def app_builder(args: dict[str, Any]):
    """Import path for Serve config files (``import_path: ase_ray.serve.app:app_builder``).

    ``args``: ``config`` (a full config mapping, as ``ase-ray serve`` deploys it) or ``config_file``
    + ``overrides`` (``a.b.c=value`` strings), and optionally ``api_key_sha256``."""
    from ase_ray.serve.deploy import ServeAppArgs, serving_config

    parsed = ServeAppArgs.model_validate(args or {})
    config = serving_config(parsed.app_config())
    return build_app(config, parsed.api_key_sha256 or inputs.env_key_digest(config.serve.api_key_env))
