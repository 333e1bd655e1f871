"""`ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/tune.py
--space tune_spaces/stride_lr.yaml [--store DIR] [--resume] [--config FILE] [--set k=v ...]`."""

from _entry import run_cli

if __name__ == "__main__":
    run_cli("tune")
