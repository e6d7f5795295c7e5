#!/usr/bin/env bash
# The main job: stages 01 -> 05 of a recipe folder, ending with output/<exp>/submission.csv.
#
#   bash run_all.sh                                   # shipped MILK10k sample, CPU, a few minutes
#   bash run_all.sh configs/milk10k_dev               # the full dev-set CPU recipe
#   bash run_all.sh configs/milk10k_sample --data /kaggle/input/milk10k --output /kaggle/working/output
#
# A recipe folder holds base.yaml (01), train_*.yaml (02, each one an image-model experiment),
# stack*.yaml (03 + 04), submit.yaml (05): `python -m lib.stages.plan RECIPE` prints the commands.
# Only the folder's own files run (not ablations/). Extra arguments are passed to every stage.
set -euo pipefail
cd "$(dirname "$0")"
RECIPE=${1:-configs/milk10k_sample}
[ $# -gt 0 ] && shift
PY=${PYTHON:-python}
t0=$(date +%s)
stage() { echo "=== $* ($(( $(date +%s) - t0 ))s)"; "$PY" "$@"; }

# The stage commands, one per line, shell-quoted, extra arguments appended (lib/stages/plan.py: the
# plan the Kaggle notebook and the e2e tests run too); a recipe without base.yaml/submit.yaml stops here.
plan=$("$PY" -m lib.stages.plan "$RECIPE" "$@")
mapfile -t steps <<< "$plan"
for step in "${steps[@]}"; do eval "stage $step"; done
if [ -f "$RECIPE/score.txt" ]; then
  # score.txt: "<truth csv> <submit exp> [task]" for a test split whose labels are held out
  # The truth file belongs to the recipe's own data: with another --data / --test-data it is skipped.
  out=output; prev=""; other_data=""
  for a in "$@"; do
    [ "$prev" = "--output" ] && out=$a
    case "$a" in --data|--test-data|--data=*|--test-data=*) other_data=1 ;; esac
    prev=$a
  done
  read -r truth exp task < "$RECIPE/score.txt"
  if [ -n "$other_data" ]; then
    echo "=== scoring skipped: --data/--test-data given, $RECIPE/score.txt holds the labels of the recipe's own data"
  elif [ ! -f "$truth" ]; then
    echo "=== scoring skipped: held-out labels $truth not found"
  else
    stage tools/score_submission.py --truth "$truth" --submission "$out/$exp/submission.csv" \
      --json "$out/$exp/score.json" --task "${task:-auto}"
  fi
fi
echo "=== done in $(( $(date +%s) - t0 ))s"
