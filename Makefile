# The two commands of the README: `make demo` (set up, run the main job) and `make test`.
VENV ?= .venv
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export OMP_THREAD_LIMIT := 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
# Token auth on every Ray process of this project (Ray's default, made explicit: no warning, and
# `ray job submit` / `serve` CLIs then agree with the cluster). Override with RAY_AUTH_MODE=disabled.
export RAY_AUTH_MODE ?= token

.PHONY: setup demo test test-fast bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/ase-ray pipeline

test: setup
	$(VENV)/bin/python -m pytest tests -q

test-fast: setup
	$(VENV)/bin/python -m pytest tests -q -m "not slow"

clean:
	rm -rf work .pytest_cache
