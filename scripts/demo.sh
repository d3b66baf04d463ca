#!/usr/bin/env bash
# Set up (idempotent) and run the main job on the real data that ships with the project: a federation
# of three hospital sites in Flower's simulation runtime, then the federated model on held-out patients.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
data=fedfreeze/sample_data/kermany_mini
out=${1:-runs/fed-demo}
# --force: a second run replaces the first run's folder (once the new one is complete)
.venv/bin/fedfreeze simulate --config fed-demo.toml --out "$out" --force --evaluation-site "held-out=$data/test.csv"
echo
echo "the federated model on the held-out test set ($data/test.csv, 88 patients no site has seen):"
.venv/bin/fedfreeze evaluate --model "$out/model" --data "$data/test.csv"
