"""Start, hot-swap and stop the Serve application (``ase-ray serve``, tests, the load benchmark).

Deployment goes through Serve's declarative config (what ``serve deploy`` sends), not
``serve.run``: with a config, Serve compares the new application with the running one and applies a
changed ``user_config`` to the running replicas (``reconfigure``), while ``serve.run`` from Python
always redeploys every replica. :func:`swap_model` patches only the user_config of the deployed
config. The model URI and threshold live in user_config only, so the application's ``args`` (and
its code version) stay the same across swaps.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from ase_ray.config import AppConfig, load_config, validate_config
from ase_ray.config_base import StrictModel
from ase_ray.errors import ConfigError, DataError
from ase_ray.registry import served_model_uri

IMPORT_PATH = "ase_ray.serve.app:app_builder"
MODEL_DEPLOYMENTS = ("Features", "Classifier")  # the deployments whose user_config names the model


class ServeAppArgs(StrictModel):
    """``args`` of ``app_builder``: a full config mapping, or a YAML file plus overrides."""

    config: dict[str, Any] | None = None
    config_file: str | None = None
    overrides: list[str] = Field(default_factory=list)
    api_key_sha256: str | None = Field(None, description="sha256 of the API key (never the key itself).")

    @model_validator(mode="after")
    def _one_source(self) -> "ServeAppArgs":
        if self.config is not None and (self.config_file or self.overrides):
            raise ValueError("give either config, or config_file/overrides, not both")
        return self

    def app_config(self) -> AppConfig:
        if self.config is not None:
            return validate_config(self.config)
        return load_config(_find_config_file(self.config_file), self.overrides)


def _find_config_file(name: str | None) -> Path | None:
    """A relative config file is looked up in the working directory, then in the ase-ray checkout
    (``pip install -e``), so a Serve config can say ``configs/cluster.yaml`` on every node."""
    if name is None:
        return None
    path = Path(name).expanduser()
    if path.is_absolute() or path.exists():
        return path
    checkout = Path(__file__).resolve().parents[2] / path
    return checkout if checkout.exists() else path


def serving_config(config: AppConfig) -> AppConfig:
    """Absolute paths and an explicit tracking URI: replicas may run in another directory."""
    from ase_ray.features.hub import resolved_models_dir
    from ase_ray.features.pipeline import cache_root
    from ase_ray.tracking import tracking_uri

    work = Path(config.project.work_dir).resolve()
    config = config.model_copy(update={"project": config.project.model_copy(update={"work_dir": work})})
    mlflow = config.mlflow.model_copy(update={"tracking_uri": tracking_uri(config)})
    models_dir = resolved_models_dir(config.features)
    features = config.features.model_copy(update={"cache_dir": cache_root(config),
                                                  "models_dir": Path(models_dir) if models_dir else None})
    from ase_ray.train.corrections import corrections_path

    queue = config.serve.review_queue
    serve = config.serve.model_copy(update={"corrections_path": corrections_path(config).resolve(),
                                            "review_queue": Path(queue).resolve() if queue else None})
    return config.model_copy(update={"mlflow": mlflow, "features": features, "serve": serve})


def model_selection(config: AppConfig, model_uri: str | None = None, review_threshold: float | None = None) -> dict:
    from ase_ray.serve.schemas import ModelSelection

    s = config.serve
    return ModelSelection(
        model_uri=model_uri or served_model_uri(config),
        review_threshold=s.review_threshold if review_threshold is None else review_threshold,
    ).model_dump()


def deploy_schema(config: AppConfig, api_key_sha256: str | None = None) -> dict[str, Any]:
    """The Serve deploy config (``serve deploy`` format) of ``config``; args exclude the model choice."""
    config = serving_config(config)
    s = config.serve
    stable = config.model_copy(update={"serve": s.model_copy(update={"model_uri": None})})
    selection = model_selection(config)
    return {
        "proxy_location": "HeadOnly",
        # The proxy's own limit is a backstop: the ingress answers a JSON 503 at request_timeout_s first.
        "http_options": {"host": s.host, "port": s.port, "request_timeout_s": s.request_timeout_s + 5},
        "applications": [{
            "name": s.app_name,
            "route_prefix": "/",
            "import_path": IMPORT_PATH,
            "args": {"config": stable.model_dump(mode="json"), "api_key_sha256": api_key_sha256},
            "deployments": [{"name": name, "user_config": selection} for name in MODEL_DEPLOYMENTS],
        }],
    }


def base_url(config: AppConfig) -> str:
    host = config.serve.host
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return f"http://{shown}:{config.serve.port}"


def check_model(config: AppConfig, model_uri: str | None = None):
    """Resolve the model in this process first: a wrong URI is a one-line error, not a failed deploy."""
    from ase_ray.serve.predictor import check_model_uri_form, resolve_model_ref
    from ase_ray.tracking import lookup_tracking_uri, tracking_uri

    uri = model_uri or served_model_uri(config)
    check_model_uri_form(uri)
    # A registry or run URI is looked up: its store must exist and answer. A local folder is not.
    if not uri.startswith(("models:/", "runs:/")):
        return resolve_model_ref(uri, tracking_uri(config, create_dir=False))
    try:
        tracking = lookup_tracking_uri(config)
    except DataError as exc:
        raise DataError(f"cannot resolve model {uri}: {exc}") from None
    return resolve_model_ref(uri, tracking)


def deploy(config: AppConfig, timeout_s: float = 600, api_key_sha256: str | None = None) -> str:
    """Start Serve on the connected Ray (loopback unless configured) and deploy; returns the base URL."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from ase_ray.serve.inputs import env_key_digest

    check_model(config)
    digest = api_key_sha256 or env_key_digest(config.serve.api_key_env)
    schema = deploy_schema(config, digest)
    serve.start(http_options=schema["http_options"], proxy_location=schema["proxy_location"])
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(schema))
    wait_running(config.serve.app_name, timeout_s)
    return base_url(config)


def swap_model(app_name: str, model_uri: str | None = None, review_threshold: float | None = None,
               timeout_s: float = 300) -> dict[str, Any]:
    """Change the model and/or threshold of a running application in place (a lightweight update:
    the replicas' ``reconfigure`` runs, nothing restarts). Returns the new user_config."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    client = _get_global_client()
    details = client.get_serve_details()
    apps = details.get("applications", {})
    if app_name not in apps or not apps[app_name].get("deployed_app_config"):
        raise DataError(f"no Serve application {app_name!r} deployed from a config is running")
    configs = []
    selection = None
    for name, app in apps.items():
        deployed = dict(app["deployed_app_config"])
        if name == app_name:
            deployments = [dict(d) for d in deployed.get("deployments", [])]
            for d in deployments:
                if d["name"] in MODEL_DEPLOYMENTS:
                    current = dict(d.get("user_config") or {})
                    if model_uri is not None:
                        current["model_uri"] = model_uri
                    if review_threshold is not None:
                        current["review_threshold"] = review_threshold
                    d["user_config"] = selection = current
            deployed["deployments"] = deployments
        configs.append(deployed)
    schema = {"applications": configs, "http_options": details.get("http_options", {}),
              "proxy_location": details.get("proxy_location", "HeadOnly")}
    client.deploy_apps(ServeDeploySchema.model_validate(schema))
    time.sleep(1.0)  # let the controller pick up the new target before reading the status
    wait_running(app_name, timeout_s)
    return selection or {}


def wait_running(app_name: str, timeout_s: float) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(app_name)
        status = str(getattr(app, "status", "")) if app else ""
        if app is not None and status.endswith("RUNNING") and all(
            str(d.status).endswith("HEALTHY") for d in app.deployments.values()
        ):
            return
        if status.endswith("DEPLOY_FAILED") or status.endswith("UNHEALTHY"):
            raise DataError(f"Serve application {app_name} failed to deploy: {_short(app.message)}")
        if time.monotonic() > deadline:
            notes = "; ".join(f"{name}: {_short(d.message)}" for name, d in (app.deployments.items() if app else [])
                              if d.message)
            raise DataError(f"Serve application {app_name} not running after {timeout_s:.0f} s "
                            f"(status {status or 'none'}){': ' + notes if notes else ''}")
        time.sleep(0.5)


def run_until_stopped(config: AppConfig, echo=print, detach: bool = False) -> None:
    """``ase-ray serve``: deploy on a local Ray (or RAY_ADDRESS / ray.address) and block until Ctrl-C
    or SIGTERM; then remove what was started. ``detach``: deploy on an existing cluster and return."""
    from ray import serve

    from ase_ray.ray_env import ensure_ray

    if not config.serve.host:
        raise ConfigError("serve.host must not be empty")
    external = bool(config.ray.address or os.environ.get("RAY_ADDRESS"))
    if detach and not external:
        raise ConfigError("--detach needs a running cluster (ray.address or RAY_ADDRESS); a local Ray "
                          "stops with this process")
    if not external:
        check_port_free(config.serve.host, config.serve.port)
    ref = check_model(config)
    ray = ensure_ray(config.ray)
    if detach:
        url = deploy(config)
        echo(f"deployed {ref.uri} on the cluster at {url}; it keeps running (serve shutdown stops it)")
        return
    # SIGTERM, and SIGINT even where a shell started us in the background with SIGINT ignored.
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        url = deploy(config)
        version = f" version {ref.version}" if ref.version else ""
        echo(f"serving {ref.uri}{version} on {url} (API docs: {url}/docs); Ctrl-C stops")
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        echo("stopping")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if external:
            serve.delete(config.serve.app_name)
        else:
            serve.shutdown()
            ray.shutdown()


def check_port_free(host: str, port: int) -> None:
    """Serve binds ``host:port`` on this machine after Ray has started: try it first, so a port in use
    or an address this machine does not have is a one-line error, not a proxy that never comes up."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"serve.host {host!r} does not resolve: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigError(f"cannot serve on {host}:{port}: {exc.strerror} (serve.port / --port, serve.host / "
                              "--host)") from None


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _short(message: str | None) -> str:
    lines = [line for line in (message or "").strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else "no message"
