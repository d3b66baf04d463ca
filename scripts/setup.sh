#!/usr/bin/env bash
# Create .venv in the project and install fedfreeze with everything it needs. Idempotent: a
# second run only reinstalls when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.fedfreeze-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing fedfreeze and its dependencies (torch 2.14.1 comes from the local cache where there is one)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[test]"
  echo "$want" > "$stamp"
fi
.venv/bin/python -c "import torch, torchvision, fedfreeze; print(f'setup: ready (torch {torch.__version__}, torchvision {torchvision.__version__}, fedfreeze {fedfreeze.__version__})')"
