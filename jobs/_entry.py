"""What every jobs/<workload>.py does: run one `ase-ray` command with the job's arguments.

`ray job submit --working-dir . -- python jobs/<x>.py ...` runs the script from the uploaded copy of
the repository; its root goes first on sys.path so that the driver imports that copy of ase_ray (the
code the job was submitted with), whatever is installed on the node.
"""

from __future__ import annotations

import sys
from pathlib import Path


def run_cli(*command: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ase_ray.cli import app

    app([*command, *sys.argv[1:]])
