"""Hub models on a cluster: pinned revisions, one shared models directory, no download in workers.

``ase-ray models pull`` downloads every configured hub model (the stages whose backend is the hub
one: see ``model_info.HUB_BACKENDS``) once, at its ``revision``, into ``features.models_dir`` with
``huggingface_hub.snapshot_download`` (the Hugging Face cache layout:
``models--<org>--<name>/snapshots/<commit>/...`` and ``refs/<revision>``). With ``models_dir`` set,
the hub loaders read from it only (:func:`load_kwargs`: ``cache_dir``, ``revision``,
``local_files_only``), so workers never reach the hub. The token is huggingface_hub's own lookup
(``HF_TOKEN`` or a stored login); it is never passed, printed, logged or recorded here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ase_ray.errors import AseRayError, ConfigError
from ase_ray.features.model_info import HUB_BACKENDS, uses_hub

logger = logging.getLogger(__name__)


class HubUnreachable(AseRayError):
    """The model hub could not be reached, or refused a model (gated, missing, wrong revision)."""


@dataclass(frozen=True)
class HubModel:
    stage: str
    repo_id: str
    revision: str


def resolved_models_dir(features: Any) -> str | None:
    """``features.models_dir`` as an absolute path (workers may run in another directory), or None."""
    if features.models_dir is None:
        return None
    return str(Path(features.models_dir).expanduser().resolve())


def load_kwargs(revision: str, models_dir: str | Path | None) -> dict[str, Any]:
    """``from_pretrained`` keywords of a hub loader: the revision, and with a models directory that
    directory only (no hub access at all)."""
    if models_dir is None:
        return {"revision": revision}
    return {"revision": revision, "cache_dir": str(models_dir), "local_files_only": True}


def where(model_id: str, revision: str, models_dir: str | Path | None) -> str:
    """How a failed load names what it looked for, and what to do about it."""
    if models_dir is None:
        return f"{model_id!r} at revision {revision!r} (no model hub or local copy here?)"
    return (f"{model_id!r} at revision {revision!r} in models_dir {models_dir} (pull it first: "
            f"ase-ray models pull --models-dir {models_dir})")


def hub_models(features: Any) -> list[HubModel]:
    """Every (stage, repo, revision) the config loads from the hub, without duplicates; a model_id
    that is a local folder is not a hub model."""
    found: dict[tuple[str, str], HubModel] = {}
    for stage in HUB_BACKENDS:
        settings = getattr(features, stage)
        if uses_hub(stage, settings) and not Path(settings.model_id).expanduser().is_dir():
            model = HubModel(stage, settings.model_id, settings.revision)
            found.setdefault((model.repo_id, model.revision), model)
    return list(found.values())


def missing_models(features: Any) -> list[HubModel]:
    """The hub models not in ``features.models_dir`` at their revision (none when it is not set)."""
    from huggingface_hub import try_to_load_from_cache

    models_dir = resolved_models_dir(features)
    if models_dir is None:
        return []
    return [m for m in hub_models(features)
            if not isinstance(try_to_load_from_cache(m.repo_id, "config.json", cache_dir=models_dir,
                                                     revision=m.revision), str)]


def pull_models(features: Any, echo: Callable[[str], None] = print) -> list[tuple[HubModel, str]]:
    """Download every hub model of ``features`` into ``features.models_dir``; returns (model, snapshot folder)."""
    models_dir = resolved_models_dir(features)
    if models_dir is None:
        raise ConfigError("no models directory: give --models-dir DIR or set features.models_dir")
    models = hub_models(features)
    if not models:
        backends = ", ".join(f"{stage}={getattr(features, stage).backend}" for stage in HUB_BACKENDS)
        raise ConfigError(f"no hub model is configured ({backends}: offline backends); the hub backends are "
                          + ", ".join(f"{s}.backend={b}" for s, b in HUB_BACKENDS.items())
                          + " (configs/cluster.yaml sets them)")
    try:
        Path(models_dir).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot create the models directory {models_dir}: {error.strerror or error}") from None
    pulled = []
    for model in models:
        echo(f"pulling {model.repo_id} at {model.revision} ({model.stage}) into {models_dir}")
        folder = download(model, models_dir)
        commit = Path(folder).name  # snapshots/<commit>
        pin = "" if commit == model.revision else f"; pin it: features.{model.stage}.revision={commit}"
        echo(f"  -> {folder} (commit {commit}{pin})")
        pulled.append((model, folder))
    return pulled


def download(model: HubModel, models_dir: str) -> str:
    """One ``snapshot_download``; hub failures become :class:`HubUnreachable` with one line."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError

    logger.info("snapshot_download %s at %s into %s", model.repo_id, model.revision, models_dir)
    try:
        return snapshot_download(model.repo_id, revision=model.revision, cache_dir=models_dir)
    except GatedRepoError as error:
        raise HubUnreachable(f"{model.repo_id} is gated: accept its licence on the hub and set HF_TOKEN "
                             f"(or `hf auth login`) to a token with access ({_first_line(error)})") from None
    except LocalEntryNotFoundError as error:
        hint = " (HF_HUB_OFFLINE is set: unset it to pull)" if constants.HF_HUB_OFFLINE else ""
        raise HubUnreachable(f"the model hub {constants.ENDPOINT} is unreachable{hint}: cannot download "
                             f"{model.repo_id} at {model.revision} ({_first_line(error)})") from None
    except (HfHubHTTPError, OSError) as error:
        raise HubUnreachable(f"cannot download {model.repo_id} at {model.revision} from {constants.ENDPOINT}: "
                             f"{_first_line(error)}") from None


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:300]
