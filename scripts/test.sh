#!/usr/bin/env bash
# Set up (idempotent) and run the test suite. Extra arguments go to pytest; none runs everything (CI).
# The quick loop while developing: bash scripts/test.sh -m "not process and not slow" (docs/contributing.md)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q --durations=15 "$@"
