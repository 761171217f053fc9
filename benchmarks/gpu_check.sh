#!/usr/bin/env bash
# The GPU check, one script for a CUDA machine (sized for under 8 minutes on one recent GPU; the time limits
# below cut any part that overruns, and the summary says what ran):
#   1. the GPU tests (pytest -m gpu: every method trains a step in bf16 on CUDA; tiny runs in bf16 and fp16);
#   2. the layer benchmark (benchmarks/layers.py) in fp32 and in bf16 at 4,096 and 16,384 tokens;
#   3. 200 bf16 training steps of t5-base-shaped dense, switch and mpoe models (random weights, offline),
# then one summary table (benchmarks/gpu_summary.py). Everything lands in OUT (default gpu_check/).
#   bash benchmarks/gpu_check.sh            # PYTHON=... to use another interpreter, OUT=... another folder
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-gpu_check}
STEPS=${STEPS:-200}
mkdir -p "$OUT"
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: no CUDA GPU visible to $PYTHON (torch.cuda.is_available() is False); this check needs one" >&2
  exit 2
fi
"$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda)" > "$OUT/machine.txt"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline

echo "== 1/3 GPU tests" >&2
timeout 180 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests > "$OUT/pytest.txt" 2>&1
echo "== 2/3 layer benchmark, fp32 and bf16" >&2
for precision in fp32 bf16; do
  timeout 120 "$PYTHON" benchmarks/layers.py --device cuda --precision "$precision" --tokens 4096 16384 \
    --repeats 5 --json "$OUT/layers_$precision.json" > "$OUT/layers_$precision.md" 2>&1
done
echo "== 3/3 $STEPS bf16 training steps, t5-base shape" >&2
timeout 180 "$PYTHON" benchmarks/train_throughput.py --device cuda --shape t5-base --precision bf16 \
  --batch 32 --steps "$STEPS" --methods dense switch mpoe --json "$OUT/train_bf16.json" > "$OUT/train_bf16.md" 2>&1
"$PYTHON" benchmarks/gpu_summary.py "$OUT" | tee "$OUT/summary.md"
