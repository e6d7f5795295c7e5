#!/usr/bin/env bash
# Wheels for an offline Kaggle kernel (no internet there; torch/torchvision are preinstalled):
#   1) on a machine with internet:  bash tools/make_wheels.sh /tmp/wheels
#   2) upload the folder as a Kaggle dataset (e.g. "skl-wheels"); attach it to the kernel
#   3) the kernel notebook (kaggle/milk10k_kernel.ipynb) installs from it:
#      python tools/kaggle_install.py install --wheels /kaggle/input/skl-wheels
#      (= pip install --no-index --find-links <wheels> -r <wheels>/requirements-kaggle.txt, checked first)
#
# Target: PY_VERSION (default 3.11, Kaggle's Python) and glibc GLIBC (default 2.35, Kaggle's Ubuntu
# 22.04) on x86_64: every manylinux tag from manylinux_2_$GLIBC down to manylinux1 is accepted.
# torch, torchvision and what only they need (their CUDA stack: nvidia-*, triton) are left out: the
# kernel's own torch is used. onnxruntime (+ onnx) is in: tools/kaggle_install.py keeps the kernel's own
# ONNX Runtime instead when its version fits requirements.txt. The dependency set is resolved once for the target (pip --dry-run
# --report), then each wheel is downloaded without its dependencies.
set -euo pipefail
OUT=$(realpath -m "${1:-wheels}")
cd "$(dirname "$0")/.."
PY_VERSION=${PY_VERSION:-3.11}
GLIBC=${GLIBC:-2.35}
PY=${PYTHON:-python}
mkdir -p "$OUT"
plat=()
for minor in $(seq "${GLIBC#2.}" -1 5); do plat+=(--platform "manylinux_2_${minor}_x86_64"); done
plat+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
target=(--python-version "$PY_VERSION" --implementation cp --only-binary=:all: "${plat[@]}")

grep -vE '^(torch|torchvision)([<>=!~ ]|$)' requirements.txt > "$OUT/requirements-kaggle.txt"
# sklesion: only its model.keras is read (for the one-time conversion); never its TensorFlow pins.
echo "sklesion==0.2.2" > "$OUT/requirements-nodeps.txt"
cp requirements.txt "$OUT/requirements-full.txt"

report=$(mktemp)
scratch=$(mktemp -d)
trap 'rm -rf "$report" "$scratch"' EXIT
"$PY" -m pip install --dry-run --ignore-installed --quiet --report "$report" --target "$scratch" "${target[@]}" \
  -r "$OUT/requirements-kaggle.txt"
"$PY" - "$report" > "$OUT/pins.txt" <<'EOF'
# What the requested packages need without going through torch/torchvision: their CUDA stack
# (nvidia-*, triton) stays out, a CUDA library another package needs (xgboost: nccl) stays in.
import json, re, sys
items = json.load(open(sys.argv[1]))["install"]
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
meta = {norm(i["metadata"]["name"]): i["metadata"] for i in items}
todo = [norm(i["metadata"]["name"]) for i in items if i.get("requested")]
keep = set()
while todo:
    name = todo.pop()
    if name in keep or name in ("torch", "torchvision") or name not in meta:
        continue
    keep.add(name)
    todo += [norm(re.match(r"[A-Za-z0-9_.-]+", r).group(0)) for r in meta[name].get("requires_dist") or []]
for name in sorted(keep):
    print(f"{meta[name]['name']}=={meta[name]['version']}")
EOF
"$PY" -m pip download --quiet --no-deps -d "$OUT" "${target[@]}" -r "$OUT/pins.txt"
"$PY" -m pip download --quiet --no-deps -d "$OUT" "${target[@]}" -r "$OUT/requirements-nodeps.txt"
for pkg in onnxruntime onnx; do  # the frozen trunks' CPU runtime: a kernel without it must get it here
  ls "$OUT/$pkg"-[0-9]*.whl > /dev/null 2>&1 || { echo "error: no $pkg wheel for Python $PY_VERSION in $OUT" >&2; exit 2; }
done
echo "$(ls "$OUT"/*.whl | wc -l) wheels ($(du -sh "$OUT" | cut -f1)) in $OUT for Python $PY_VERSION," \
     "glibc <= $GLIBC x86_64; torch/torchvision: the kernel's own"
