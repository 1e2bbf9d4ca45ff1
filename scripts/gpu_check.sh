#!/usr/bin/env bash
# The GPU checks, in one call on a CUDA machine (each phase time-boxed, a failure never stops
# the next one):
#   1. scripts/bench_train.py on the GPU at the full and the quick preset's sizes;
#   2. `carsynth run --preset quick --device cuda` end to end (collect on this machine's cores);
#   3. the pipeline's recipe at the full preset's sizes (and the quick preset's) trained on the
#      quick data for what the budget leaves, every checkpoint judged by the gate
#      (scripts/compare_recipes.py), with the test suite running beside them on the GPU.
# Everything goes to WORK; RESULTS gets the small files worth keeping (logs, JSON, figures).
#
# The whole script ends within BUDGET seconds: phase 3 gets what phases 1-2 left.
#
#     scripts/gpu_check.sh REAL.h5 WORK RESULTS [BUDGET]
set -u
DATA=$1 WORK=$2 RESULTS=$3 BUDGET=${4:-540}
export PYTHONUNBUFFERED=1 SDL_VIDEODRIVER=dummy
mkdir -p "$WORK" "$RESULTS"
phase() { echo "=== $1 ($(date +%T))"; }
timed() {  # timed NAME LIMIT COMMAND...: run with a time limit, log to WORK/NAME.log
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
    echo "$name: exit $?, $((SECONDS - start)) s"
}
# steps between judged checkpoints so that 5 of them take about TRAIN_SECONDS at a share of
# the benchmarked rate (the two runs and the tests share the GPU and the cores)
interval() {  # interval BENCH_JSON BATCH
    python3 - "$1" "$2" "$TRAIN_SECONDS" <<'EOF'
import json, sys
try:
    rate = json.load(open(sys.argv[1]))["images_per_s"]["carsynth train --fm"]
except (OSError, KeyError, ValueError):
    rate = 2000.0
print(max(50, int(rate * 0.4 * float(sys.argv[3]) / int(sys.argv[2]) / 5 / 50) * 50))
EOF
}

phase "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
nproc

phase "1. bench_train on the GPU"
timed bench_full 90 python3 scripts/bench_train.py --device cuda --data "$DATA" --ngf 64 \
    --ndf 64 --batch-size 256 --steps 300 --workers 8 --json "$WORK/bench_train_full.json"
tail -6 "$WORK/bench_full.log"
timed bench_quick 60 python3 scripts/bench_train.py --device cuda --data "$DATA" --ngf 32 \
    --ndf 32 --batch-size 64 --steps 600 --workers 8 --json "$WORK/bench_train_quick.json"
tail -6 "$WORK/bench_quick.log"

phase "2. carsynth run --preset quick --device cuda"
timed quick_run 200 python3 -m carsynth run --preset quick --out "$WORK/quick" --device cuda \
    --no-progress
grep -v "^step\|it/s" "$WORK/quick_run.log" | tail -25

phase "3. the recipe on the quick data, gate on every checkpoint; tests beside"
limit=$((BUDGET - SECONDS - 20))  # the time left, less the copying of the results
TRAIN_SECONDS=$(((limit - 100) / 2))  # half for training, 100 s and the rest for the judging
full=$(interval "$WORK/bench_train_full.json" 256)
quick=$(interval "$WORK/bench_train_quick.json" 64)
echo "judged every $full steps (full sizes), $quick steps (quick sizes), $limit s at most"
timed curve_full "$limit" python3 scripts/compare_recipes.py --data "$DATA" \
    --out "$WORK/curve_full" --preset full --recipes fm2+lr5e-4 --steps $((full * 5)) \
    --eval-every "$full" --device cuda &
timed curve_quick "$limit" python3 scripts/compare_recipes.py --data "$DATA" \
    --out "$WORK/curve_quick" --preset quick --recipes fm2+lr5e-4 --steps $((quick * 5)) \
    --eval-every "$quick" --device cuda &
timed pytest "$limit" env OMP_NUM_THREADS=2 python3 -m pytest -q -n 6 --timeout 200 \
    -p no:cacheprovider &
wait
for arm in full quick; do
    echo "--- $arm sizes"
    tail -4 "$WORK/curve_$arm/results.md" 2>/dev/null || tail -5 "$WORK/curve_$arm.log"
done
echo "--- tests"
grep -E "passed|failed|^FAILED|^ERROR" "$WORK/pytest.log" | tail -25

phase "results"
cat "$WORK"/*.log >"$RESULTS/logs.txt"
cp "$WORK"/bench_train_*.json "$RESULTS"/ 2>/dev/null
cp "$WORK/quick/validation/report.json" "$RESULTS/quick_report.json" 2>/dev/null
for arm in full quick; do
    cp "$WORK/curve_$arm/results.json" "$RESULTS/curve_$arm.json" 2>/dev/null
done
cp "$WORK/curve_full/curve.png" "$RESULTS/curve_full.png" 2>/dev/null
last=$(ls "$WORK"/curve_full/runs/*/samples/*.png 2>/dev/null | tail -1)
[ -n "$last" ] && cp "$last" "$RESULTS/samples_full.png"
ls -la "$RESULTS"
