"""Checks on where a command will write, made before it starts: a wrong output path is a one-line
error, never a traceback halfway through writing."""

from __future__ import annotations

from pathlib import Path

from ase_ray.errors import DataError


def check_output_dir(path: str | Path, what: str = "output folder") -> Path:
    """``path`` can be a folder to write into: it is one, or can be made (no file on the way)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DataError(f"{what} {path} is a file, not a folder: pass a folder (it is created when missing)")
    _check_parents(path, what)
    return path


def check_output_location(location: str | Path, what: str = "output folder") -> str:
    """Like :func:`check_output_dir` for a path; a URI (s3://...) is checked when it is written."""
    from ase_ray.storage import is_uri

    return str(location) if is_uri(location) else str(check_output_dir(location, what))


def check_output_file(path: str | Path, what: str = "output file") -> Path:
    """``path`` can be a file to write: it is not a folder, and its folder can be made."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{what} {path} is a folder, not a file")
    _check_parents(path, what)
    return path


def _check_parents(path: Path, what: str) -> None:
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise DataError(f"{what} {path} cannot be made: {parent} is a file, not a folder")
            return
