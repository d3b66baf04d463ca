#!/usr/bin/env bash
# Build the wheelhouse once, on a machine that reaches PyPI (or your mirror): every wheel the
# images install, and nothing else. Copy the folder to an air-gapped machine and build the images
# there with no network (see docker/README.md, "Air-gapped build").
#
#   bash docker/make-wheelhouse.sh [OUT]            # default OUT: docker/wheels (ignored by git and by the build context)
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash docker/make-wheelhouse.sh
#
# TORCH_INDEX_URL takes torch and torchvision from that index (the CPU-only wheels make an image
# of ~1.5 GB instead of ~6 GB). Without it they come from PyPI, whose Linux torch is the CUDA
# build with its nvidia-* wheels (~3.5 GB of wheels, a ~6 GB image) that also runs on a CPU.
# Run it with Python 3.11 on Linux x86-64 (the images' Python; PYTHON=... picks another one).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-docker/wheels}
PY=${PYTHON:-python3}
"$PY" - <<'CHECK'
import platform, sys
if sys.version_info[:2] != (3, 11) or platform.machine() != "x86_64" or platform.system() != "Linux":
    sys.exit(f"make-wheelhouse: needs CPython 3.11 on Linux x86-64 (the images' Python), got "
             f"{platform.python_version()} on {platform.system()} {platform.machine()}; set PYTHON=...")
CHECK
mkdir -p "$OUT"
# The requirements: the project's dependencies, without Flower's simulation extra (Ray, ~230 MB,
# is not used in a deployment), plus the build backend that installs fedfreeze from its source.
"$PY" - "$OUT/requirements.txt" <<'REQS'
import re, sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
def no_simulation(dep):  # flwr[simulation,dp]==X -> flwr[dp]==X
    m = re.match(r"^flwr\[([^\]]*)\](.*)$", dep)
    if not m:
        return dep
    extras = [e.strip() for e in m.group(1).split(",") if e.strip() != "simulation"]
    return "flwr" + (f"[{','.join(extras)}]" if extras else "") + m.group(2)
deps = [no_simulation(d) for d in deps]
backend = tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]
open(sys.argv[1], "w").write("\n".join(deps + backend) + "\n")
REQS
echo "make-wheelhouse: requirements in $OUT/requirements.txt:"; sed 's/^/  /' "$OUT/requirements.txt"
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  torch_pins=$(grep -E '^(torch|torchvision)[=<>~ ]' "$OUT/requirements.txt" | tr '\n' ' ')
  echo "make-wheelhouse: torch and torchvision from $TORCH_INDEX_URL"
  # shellcheck disable=SC2086
  "$PY" -m pip download --only-binary=:all: --index-url "$TORCH_INDEX_URL" -d "$OUT" $torch_pins
fi
"$PY" -m pip download --only-binary=:all: --find-links "$OUT" -d "$OUT" -r "$OUT/requirements.txt"
echo "make-wheelhouse: $(ls "$OUT"/*.whl | wc -l) wheels, $(du -sh "$OUT" | cut -f1) in $OUT"
