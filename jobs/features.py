"""`ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/features.py
--manifest M [--out DIR] [--config FILE] [--set k=v ...]`: feature extraction on Ray Data."""

from _entry import run_cli

if __name__ == "__main__":
    run_cli("features")
