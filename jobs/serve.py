"""`ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/serve.py
[--model-uri URI] [--port N] [--config FILE] [--set k=v ...]`: deploy the Serve application on the
cluster and return (it keeps serving; `serve shutdown` or `serve deploy` with another config change
it). The declarative alternative is `serve deploy configs/serve.yaml`."""

from _entry import run_cli

if __name__ == "__main__":
    run_cli("serve", "--detach")
