#!/usr/bin/env bash
# The GPU check, one script for a CUDA machine. Its parts' time limits add up to 7.9 minutes (printed at the start),
# so by its own estimate it ends within 8 minutes; a part that overruns is cut, each part's time is printed and kept
# in OUT/phases.txt, and the summary says what ran:
#   1. the GPU tests (pytest -m gpu: every method trains a step in bf16 on CUDA; tiny runs in bf16 and fp16);
#   2. the layer benchmark (benchmarks/layers.py) in fp32 and in bf16 at 4,096 and 16,384 tokens;
#   3. bf16 training steps of t5-base-shaped models (random weights, offline), each setting in its own process so
#      that its peak memory is its own: dense, switch and mpoe at k = 1 micro-batch per optimizer step and at k = 8
#      (STEPS steps at k = 1, STEPS / 8 at k = 8; each process spends 20-35 s starting up and warming up on an H200);
# then one summary table (benchmarks/gpu_summary.py). Everything lands in OUT (default gpu_check/).
#   bash benchmarks/gpu_check.sh            # PYTHON=... to use another interpreter, OUT=... another folder
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-gpu_check}
STEPS=${STEPS:-48}
TRAINING=("dense 1" "switch 1" "mpoe 1" "dense 8" "switch 8" "mpoe 8")
LIMITS=(70 40 40 54 54 54 54 54 54)  # seconds: tests, layers fp32 and bf16, then each training setting
mkdir -p "$OUT"
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: no CUDA GPU visible to $PYTHON (torch.cuda.is_available() is False); this check needs one" >&2
  exit 2
fi
"$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda)" > "$OUT/machine.txt"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
total=0; for limit in "${LIMITS[@]}"; do total=$((total + limit)); done
echo "== GPU check: ${#LIMITS[@]} parts, time limits adding up to ${total} s" >&2
: > "$OUT/phases.txt"
part=0
phase() {  # phase NAME OUTFILE COMMAND...: run under the part's time limit, print and record its time
  local name=$1 log=$2 limit=${LIMITS[$part]} start=$SECONDS status
  shift 2
  part=$((part + 1))
  echo "== $part/${#LIMITS[@]} $name (limit $limit s)" >&2
  timeout "$limit" "$@" > "$log" 2>&1
  status=$?
  local note="$((SECONDS - start)) s of $limit"
  [ "$status" -eq 124 ] && note="$note, cut at the limit"
  [ "$status" -ne 0 ] && [ "$status" -ne 124 ] && note="$note, exit $status"
  echo "   $name: $note" >&2
  echo "$name: $note" >> "$OUT/phases.txt"
}

phase "GPU tests" "$OUT/pytest.txt" "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests
for precision in fp32 bf16; do
  phase "layers $precision" "$OUT/layers_$precision.md" "$PYTHON" benchmarks/layers.py --device cuda \
    --precision "$precision" --tokens 4096 16384 --repeats 5 --json "$OUT/layers_$precision.json"
done
for setting in "${TRAINING[@]}"; do
  read -r method k <<< "$setting"
  steps=$STEPS; [ "$k" -gt 1 ] && steps=$(( (STEPS + 7) / 8 ))
  phase "training $method k=$k" "$OUT/train_bf16_${method}_k$k.md" "$PYTHON" benchmarks/train_throughput.py \
    --device cuda --shape t5-base --precision bf16 --batch 32 --steps "$steps" --methods "$method" \
    --grad-accum "$k" --json "$OUT/train_bf16_${method}_k$k.json"
done
"$PYTHON" benchmarks/gpu_summary.py "$OUT" | tee "$OUT/summary.md"
