#!/usr/bin/env bash
# Set up (idempotent) and run one site's cross-validated fine-tuning on the shipped data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
data=fedfreeze/sample_data/kermany_mini
out=${1:-runs/site-demo}
.venv/bin/fedfreeze site-train --config fedfreeze/configs/site-demo.toml --data "$data/train.csv" --out "$out" --force
echo
echo "held-out test set ($data/test.csv, patients never seen in training):"
.venv/bin/fedfreeze evaluate --model "$out" --data "$data/test.csv"
