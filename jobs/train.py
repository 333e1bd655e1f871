"""`ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/train.py
[--resume [RUN]] [--store DIR] [--config FILE] [--set k=v ...]`: one training run on Ray Train (a new run
unless --resume names one)."""

from _entry import run_cli

if __name__ == "__main__":
    run_cli("train")
