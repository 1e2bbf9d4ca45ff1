#!/usr/bin/env bash
# A recipe screen on one CUDA machine: every recipe trains in its own process at the same time
# (a DCGAN-64 step is launch-bound on a large GPU, so a dozen small runs share it well), each
# judged by the gate at every checkpoint (scripts/compare_recipes.py). Same data, seed and
# budget for every arm. RESULTS gets each arm's results.json/md, last sample grid and the log.
#
#     scripts/gpu_screen.sh REAL.h5 WORK RESULTS LIMIT PRESET STEPS EVERY RECIPE...
# (DEVICE=cpu runs it here, for a smoke test.)
set -u
DATA=$1 WORK=$2 RESULTS=$3 LIMIT=$4 PRESET=$5 STEPS=$6 EVERY=$7
shift 7
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
mkdir -p "$WORK" "$RESULTS"
for recipe in "$@"; do
    timeout "$LIMIT" python3 scripts/compare_recipes.py --data "$DATA" --out "$WORK/$recipe" \
        --preset "$PRESET" --recipes "$recipe" --steps "$STEPS" --eval-every "$EVERY" \
        --device "${DEVICE:-cuda}" >"$WORK/$recipe.log" 2>&1 &
done
wait
for recipe in "$@"; do
    keep="$RESULTS/${recipe//[^A-Za-z0-9._-]/_}"  # the results' names: plain characters only
    mkdir -p "$keep"
    cp "$WORK/$recipe.log" "$keep/log.txt"
    cp "$WORK/$recipe"/results.* "$keep/" 2>/dev/null
    last=$(ls "$WORK/$recipe"/runs/*/samples/*.png 2>/dev/null | tail -1)
    [ -n "$last" ] && cp "$last" "$keep/samples.png"
    tail -3 "$WORK/$recipe/results.md" 2>/dev/null | head -1 || tail -3 "$WORK/$recipe.log"
done
