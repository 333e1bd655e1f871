"""`ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/pipeline.py
[--config FILE] [--set k=v ...]`: the whole workflow (data, features, train, tune, register, serve)."""

from _entry import run_cli

if __name__ == "__main__":
    run_cli("pipeline")
