"""Figures of the fault drills for ``bench/reliability.py``: with ``ASE_RAY_RELIABILITY_OUT`` set,
each drill writes ``drill_<name>.json`` there (rows in / out, retried, requests failed...); without
it, nothing is written. A test helper only: production code knows nothing of it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ENV = "ASE_RAY_RELIABILITY_OUT"


def record_drill(name: str, **figures: Any) -> None:
    out = os.environ.get(ENV)
    if not out:
        return
    path = Path(out) / f"drill_{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"drill": name, **figures}, indent=2, default=str))
