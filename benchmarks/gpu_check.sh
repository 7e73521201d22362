#!/usr/bin/env bash
# GPU check for any CUDA machine, in under 8 minutes after `make install-dev install-vllm`:
#   1. the GPU tests (pytest -m gpu: flash-attention 2 selected and loading, bf16 loading),
#   2. the vLLM throughput benchmark in bf16 (HF generate vs vLLM, weight-sync cost), to benchmarks/results/gpu/,
#   3. one short round of configs/gpu_quickstart.yaml (bf16, vLLM colocated) to runs/gpu_check/.
# Each part has its own time limit; the script stops at the first failure and prints where the numbers are.
#   Run: bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print('torch', torch.__version__, torch.version.cuda)"

echo "== 1/3 GPU tests"
timeout 120 "$PY" -m pytest -q -p no:warnings -m gpu tests

echo "== 2/3 rollout throughput (bf16)"
timeout 240 "$PY" benchmarks/rollout_throughput.py --device cuda --dtype bfloat16 --prompts 8 --num_generations 8 \
    --max_completion_length 128 --repeats 3 --out "$OUT/rollout_throughput.json"

echo "== 3/3 one round of configs/gpu_quickstart.yaml"
rm -rf runs/gpu_check
start=$(date +%s)
timeout 180 .venv/bin/fedrl fit -c configs/gpu_quickstart.yaml --trainer.num_rounds 1 --trainer.local_steps 2 \
    --trainer.eval_before_training false --data.init_args.eval_size 16 --trainer.output_dir runs/gpu_check
echo "one round (2 local steps x 4 clients, eval): $(( $(date +%s) - start )) s; metrics in runs/gpu_check/metrics.csv"
echo "GPU check passed; throughput in $OUT/rollout_throughput.json"
