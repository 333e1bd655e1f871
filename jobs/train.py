"""`ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/train.py
[--store DIR] [--config FILE] [--set k=v ...]`."""

import sys

from ase_ray.cli import app

if __name__ == "__main__":
    app(["train", *sys.argv[1:]])
