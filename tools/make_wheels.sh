#!/usr/bin/env bash
# Offline install for Kaggle (no internet in the kernel):
#   1) on a machine with internet:  bash tools/make_wheels.sh wheels/
#      (downloads wheels for requirements.txt, minus torch/torchvision which Kaggle ships,
#       plus sklesion without its pins; set PY_VERSION / PLATFORM to match the kernel)
#   2) upload wheels/ as a Kaggle dataset, e.g. "skl-wheels"
#   3) in the kernel: pip install --no-index --find-links /kaggle/input/skl-wheels -r requirements-kaggle.txt
set -euo pipefail
OUT=${1:-wheels}
PY_VERSION=${PY_VERSION:-3.11}
PLATFORM=${PLATFORM:-manylinux2014_x86_64}
mkdir -p "$OUT"
grep -vE '^(torch|torchvision)([<>=! ]|$)' requirements.txt > "$OUT/requirements-kaggle.txt"
python -m pip download -d "$OUT" -r "$OUT/requirements-kaggle.txt" \
  --python-version "$PY_VERSION" --platform "$PLATFORM" --only-binary=:all:
# sklesion's own pins (tensorflow 2.17, numpy 1.26, pandas 2.2.3) are not wanted: only its model.keras is read.
python -m pip download -d "$OUT" --no-deps sklesion==0.2.2
cp requirements.txt "$OUT/requirements-full.txt"
echo "wheels in $OUT; install with: pip install --no-index --find-links $OUT -r $OUT/requirements-kaggle.txt"
