#!/usr/bin/env bash
# GPU checks: run tests/gpu (pytest -m gpu) on a CUDA machine with no internet, in under 5 minutes,
# and exit with pytest's status (124: it ran past the time limit; 2: pydantic missing and no wheels;
# 3: torch sees no CUDA device, so the tests would only have been skipped).
#
# The machine needs python3 with torch (a CUDA build), transformers, numpy, pandas, pillow, pyyaml
# and pytest. Ray, DeepSpeed and MLflow are not needed (the GPU tests import none of them). pydantic
# may be missing there: when `import pydantic` fails, the wheels in .whl/ (ignored by git; carry the
# folder along with the working tree) are installed into /tmp/site and put on PYTHONPATH. Download
# them on a machine with PyPI access, from the repository root (the versions of the dev venv):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
#
# (typing_extensions, which pydantic also needs, comes with torch.)
#
# Usage: bash scripts/gpu_check.sh [extra pytest arguments]      PYTHON=python3.12 to pick the interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LIMIT_S=290        # the whole pytest run (the machine's 5 minutes, less start-up)
PER_TEST_S=240     # per test, when pytest-timeout is installed
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export OMP_THREAD_LIMIT=${OMP_THREAD_LIMIT:-1}
unset ASE_RAY_GPU_TESTS_DEVICE  # never the CPU dry run here

echo "== nvidia-smi"
nvidia-smi || echo "(nvidia-smi missing or failed)"

if ! "$PYTHON" -c "import pydantic" 2>/dev/null; then
  echo "== pydantic is missing: installing the wheels in .whl/ into /tmp/site"
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "error: no .whl/*.whl here; download them first (see the comment at the top of $0)" >&2
    exit 2
  fi
  PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
    "$PYTHON" -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

echo "== versions"
if ! "$PYTHON" - <<'EOF'
import platform, sys

import numpy, pydantic, torch, transformers

print(f"python {platform.python_version()}  torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()})  transformers {transformers.__version__}  "
      f"numpy {numpy.__version__}  pydantic {pydantic.VERSION}")
if not torch.cuda.is_available():
    sys.exit(3)
for i in range(torch.cuda.device_count()):
    props = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {props.name}, {props.total_memory / 2**30:.0f} GiB, capability {props.major}.{props.minor}, "
          f"bf16 {torch.cuda.is_bf16_supported()}")
EOF
then
  echo "error: torch sees no CUDA device (or a package above is missing): the GPU tests would only be skipped" >&2
  exit 3
fi

args=(-m pytest tests/gpu -m gpu -q -p no:cacheprovider -rs)
if "$PYTHON" -c "import pytest_timeout" 2>/dev/null; then
  args+=(--timeout="$PER_TEST_S")
fi
echo "== $PYTHON ${args[*]} $*"
timeout "$LIMIT_S" "$PYTHON" "${args[@]}" "$@"
status=$?
if [ "$status" = 124 ]; then
  echo "error: the GPU tests ran past ${LIMIT_S} s" >&2
fi
exit "$status"
