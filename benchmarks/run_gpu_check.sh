#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run: the test suite with the GPU visible
# (tests/test_cuda.py runs only there) and bench_speed on the GPU.
#
#   benchmarks/run_gpu_check.sh OUT_DIR MODEL [bench_speed options...]
#
# MODEL: a model spec for bench_speed (e.g. smollm2-135m-instruct), or a directory holding only
# config.json and tokenizer files together with --random-init (same shapes, random weights).
# Writes OUT_DIR/{gpu.txt,pytest.log,speed_gpu.json,speed_gpu.md,bench_speed.log}.
set -uo pipefail
out=${1:?usage: run_gpu_check.sh OUT_DIR MODEL [bench_speed options]}
model=${2:?usage: run_gpu_check.sh OUT_DIR MODEL [bench_speed options]}
shift 2
cd "$(dirname "$0")/.."
mkdir -p "$out"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
$PY -c "import torch, transformers, lightning, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lightning', lightning.__version__, 'peft', peft.__version__)" | tee -a "$out/gpu.txt"

echo "== tests/test_cuda.py"
timeout 300 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/pytest.log"
echo "== bench_speed on the GPU"
timeout 420 $PY benchmarks/bench_speed.py --device cuda --model "$model" --threads "$(nproc)" \
  --parts peak,train,batch,generate,stages --peak-sizes 4096,8192 \
  --train-settings fp32-fused,bf16-fused,bf16-fused-eager-attn --headline bf16-fused \
  --sweep-batch-sizes 8,32,128 --train-steps 20 --train-warmup 3 --stage-attn sdpa \
  --out "$out/speed_gpu.json" "$@" 2>&1 | grep -v -i warn | tee "$out/bench_speed.log"
echo "== the whole test suite with the GPU visible"
timeout 400 $PY -m pytest -q -p no:cacheprovider -x tests 2>&1 | tail -30 | tee -a "$out/pytest.log"
