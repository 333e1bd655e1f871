"""MLflow helpers: one tracking URI per config (SQLite under work_dir by default), safe params."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ase_ray.config import AppConfig, flatten_config
from ase_ray.errors import DataError

_SECRET = re.compile(r"(password|secret|token|api_key|apikey|credential)", re.IGNORECASE)
MAX_PARAM_CHARS = 6000  # MLflow's limit for a param value
VAL_FINGERPRINT_TAG = "ase_ray.val_fingerprint"  # run tag: which validation rows its val metrics are on


TRACKING_URI_ENV = "ASE_RAY_TRACKING_URI"


def tracking_uri(config: AppConfig, create_dir: bool = True) -> str:
    """``mlflow.tracking_uri``, else $ASE_RAY_TRACKING_URI (a cluster's server, set on its nodes by
    cluster.yaml), else a SQLite file in the work dir. Not $MLFLOW_TRACKING_URI: mlflow.set_tracking_uri
    writes that one, so it would pin every later config of a process to the first one's store."""
    configured = config.mlflow.tracking_uri or os.environ.get(TRACKING_URI_ENV)
    if configured:
        return configured
    db = (Path(config.project.work_dir) / "mlflow.db").resolve()
    if create_dir:
        db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def lookup_tracking_uri(config: AppConfig) -> str:
    """The tracking URI for reading a run or a model (evaluate, register, serve, predict): nothing is
    created, and a store that cannot hold it is a one-line error at once (:func:`check_tracking_store`)."""
    uri = tracking_uri(config, create_dir=False)
    check_tracking_store(uri)
    return uri


def check_tracking_store(uri: str, timeout_s: float = 3.0) -> None:
    """A SQLite store must exist (MLflow would create an empty one, with its migrations, only to find
    nothing in it); a server must accept a connection (MLflow retries a dead one for minutes)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.is_file():
            raise DataError(f"no MLflow tracking database at {db}: nothing was trained or registered with this "
                            "project.work_dir (or set mlflow.tracking_uri)")
    elif uri.startswith(("http://", "https://")):
        parsed = urlparse(uri)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname or "", port), timeout=timeout_s).close()
        except OSError as exc:
            raise DataError(f"the MLflow tracking server {uri} is unreachable ({exc.strerror or exc})") from None


def artifact_root(config: AppConfig) -> str:
    """Where experiments this project creates keep artifacts (a tracking server may impose its own)."""
    from ase_ray.storage import as_uri, storage_location

    return as_uri(storage_location(config, "mlartifacts"))


def setup_mlflow(config: AppConfig, experiment: str | None = None):
    """Point MLflow at the configured store and experiment (created with an explicit artifact root)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(config))
    # The registry too: mlflow.register_model uses the global registry URI, which an earlier
    # set_registry_uri (a served model's store) would otherwise keep pointing elsewhere.
    mlflow.set_registry_uri(tracking_uri(config))
    name = experiment or config.mlflow.experiment
    if mlflow.get_experiment_by_name(name) is None:
        location = f"{artifact_root(config)}/{name}" if _is_local_store(tracking_uri(config)) else None
        mlflow.create_experiment(name, artifact_location=location)
    mlflow.set_experiment(name)
    return mlflow


def _is_local_store(uri: str) -> bool:
    """A file or database store has no server to choose artifact locations: we choose them."""
    return not uri.startswith(("http://", "https://", "databricks"))


def safe_params(params: dict[str, Any]) -> dict[str, str]:
    """Flat params fit for MLflow: secrets masked, long values cut."""
    out = {}
    for key, value in params.items():
        text = "***" if _SECRET.search(key) else str(value)
        out[key] = text[:MAX_PARAM_CHARS]
    return out


def config_params(config: AppConfig, sections: tuple[str, ...] | None = None) -> dict[str, str]:
    """The settings as flat params, less the ``model_id``/``revision`` of stages whose backend does
    not read them (a param ``features.reason.model_id=meta-llama/...`` would say Llama ran)."""
    from ase_ray.features.model_info import unused_hub_keys

    unused = unused_hub_keys(config.features)
    flat = {k: v for k, v in flatten_config(config).items() if k not in unused}
    if sections:
        flat = {k: v for k, v in flat.items() if k.split(".")[0] in sections}
    return safe_params(flat)


def ran_model_params(models: dict[str, dict[str, Any]]) -> dict[str, str]:
    """``ran.<stage>.<field>`` params of the models that ran (``ase_ray.features.model_info.ran_models``)."""
    return safe_params({f"ran.{stage}.{key}": value for stage, info in models.items() for key, value in info.items()})
