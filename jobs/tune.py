"""`ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/tune.py
--space tune_spaces/stride_lr.yaml [--store DIR] [--resume] [--config FILE] [--set k=v ...]`."""

import sys

from ase_ray.cli import app

if __name__ == "__main__":
    app(["tune", *sys.argv[1:]])
