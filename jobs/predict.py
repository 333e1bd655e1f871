"""`ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/predict.py
--manifest M --out DIR [--model-uri URI] [--config FILE] [--set k=v ...]`: batch prediction over a
manifest on Ray Data, with the same predictor as Serve (default model: the registry's champion)."""

from _entry import run_cli

if __name__ == "__main__":
    run_cli("predict")
