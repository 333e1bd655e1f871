"""`ray job submit --working-dir . -- python jobs/pipeline.py [--config FILE] [--set k=v ...]`."""

import sys

from ase_ray.cli import app

if __name__ == "__main__":
    app(["pipeline", *sys.argv[1:]])
