"""Where runs keep what other nodes must see: a local path, a shared mount or a URI (s3://, gs://).

Every read and write of a store, a cache shard or a results file goes through pyarrow's file systems
(:func:`filesystem`), so the same code works on a laptop's disk and on object storage. For an S3-compatible
server that is not AWS (MinIO, moto, Ceph), set ``AWS_ENDPOINT_URL`` (pyarrow, boto3 and MLflow all read
it); credentials come from the usual AWS variables or the node's role, never from ase-ray's config.
"""

from __future__ import annotations

import os
import uuid
from functools import lru_cache
from pathlib import Path

from ase_ray.config import AppConfig


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def storage_location(config: AppConfig, *parts: str) -> str:
    """``project.storage_uri`` (or ``work_dir`` when unset) joined with ``parts``: a URI stays a
    URI (Ray and MLflow open it through their filesystem layers), a path becomes absolute."""
    base = config.project.storage_uri
    if base is None:
        return join(str(Path(config.project.work_dir).resolve()), *parts)
    return join(base if is_uri(base) else str(Path(base).resolve()), *parts)


def join(location: str | Path, *parts: str) -> str:
    """``location`` (a path or a URI) with ``parts`` appended."""
    location = str(location)
    if is_uri(location):
        return "/".join([location.rstrip("/"), *parts])
    return str(Path(location).joinpath(*parts))


def parent(location: str | Path) -> str:
    """The folder above ``location`` (a path or a URI)."""
    location = str(location)
    if is_uri(location):
        return location.rstrip("/").rsplit("/", 1)[0]
    return str(Path(location).parent)


def name(location: str | Path) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def as_uri(location: str | Path) -> str:
    """A URI for MLflow's artifact locations (a plain path becomes file://...)."""
    location = str(location)
    return location if is_uri(location) else Path(location).resolve().as_uri()


def resolved(location: str | Path) -> str:
    """A URI as it is; a path made absolute (workers may run in another folder)."""
    return str(location) if is_uri(location) else str(Path(location).resolve())


# --------------------------------------------------------------------------------- file systems
def filesystem(location: str | Path):
    """(pyarrow file system, path inside it) of a path or a URI."""
    import pyarrow.fs as pafs

    location = str(location)
    if not is_uri(location) or location.startswith("file://"):
        path = location[len("file://"):] if location.startswith("file://") else location
        return pafs.LocalFileSystem(), str(Path(path).resolve())
    scheme, _, rest = location.partition("://")
    return _remote_filesystem(scheme, _endpoint()), rest.rstrip("/")


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


@lru_cache(maxsize=8)
def _remote_filesystem(scheme: str, endpoint: str | None):
    import pyarrow.fs as pafs

    if scheme in ("s3", "s3a") and endpoint:
        return pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True,
                                 region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    return pafs.FileSystem.from_uri(f"{scheme}://bucket")[0]


def _file_type(location: str | Path):
    fs, path = filesystem(location)
    return fs.get_file_info(path).type


def exists(location: str | Path) -> bool:
    import pyarrow.fs as pafs

    return _file_type(location) != pafs.FileType.NotFound


def is_file(location: str | Path) -> bool:
    import pyarrow.fs as pafs

    return _file_type(location) == pafs.FileType.File


def is_dir(location: str | Path) -> bool:
    import pyarrow.fs as pafs

    return _file_type(location) == pafs.FileType.Directory


def modified(location: str | Path) -> float:
    """The file's modification time (seconds since the epoch; 0 when the file system keeps none)."""
    fs, path = filesystem(location)
    mtime = fs.get_file_info(path).mtime
    return mtime.timestamp() if mtime is not None else 0.0


def list_dirs(location: str | Path) -> list[str]:
    """The folders right under ``location`` (locations of the same kind), sorted; [] when absent."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path))
    return sorted(join(location, name(i.path)) for i in infos if i.type == pafs.FileType.Directory)


def read_bytes(location: str | Path) -> bytes:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as fh:
        return fh.read()


def read_text(location: str | Path) -> str:
    return read_bytes(location).decode("utf-8")


def write_bytes(location: str | Path, data: bytes) -> None:
    """Write a whole file so that a reader sees the old file, or none, or the new one: a local file
    is written beside and renamed; an object store's PUT is atomic already."""
    fs, path = filesystem(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    if not is_uri(location):
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        try:
            with fs.open_output_stream(tmp) as fh:
                fh.write(data)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    with fs.open_output_stream(path) as fh:
        fh.write(data)


def write_text(location: str | Path, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def make_dirs(location: str | Path) -> None:
    fs, path = filesystem(location)
    fs.create_dir(path, recursive=True)


def remove(location: str | Path) -> None:
    """Remove a file or a folder with everything under it (nothing when absent)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)


def list_files(location: str | Path, suffix: str = "") -> list[str]:
    """Every file under ``location`` (recursively) whose name ends with ``suffix``, as locations of
    the same kind (paths or URIs), sorted; [] when the folder is absent."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    found = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))
    base = str(location).rstrip("/")
    return [base + p[len(path):] if is_uri(location) else p for p in found]


def upload_dir(local: str | Path, location: str | Path) -> str:
    """Copy a local folder's files to ``location`` (a path or a URI); returns ``location``."""
    local = Path(local)
    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        write_bytes(join(location, *file.relative_to(local).parts), file.read_bytes())
    return str(location)
