#!/usr/bin/env bash
# The GPU check, in one call (< 6 minutes on an H200): the CUDA tests, the engine tests on
# CUDA, the quantized MoE kernels' benchmark, then the GPU benchmark (python -m loadtest gpu). Logs and
# JSON go to $OUT (default ./gpu_check_out).
#
#   bash scripts/gpu_check.sh               # needs an NVIDIA GPU: stops at once without one
#   GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh   # no GPU: the same steps on the CPU, toy sizes
#   GPU_CHECK_SECONDS=330                   # the whole run's budget (the benchmark gets what is left)
#   GPU_CHECK_QUANT_SECONDS=100             # the quantized MoE benchmark's share of it
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET="${GPU_CHECK_SECONDS:-330}"
QUANT_BUDGET="${GPU_CHECK_QUANT_SECONDS:-100}"
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
elapsed() { echo $(( $(date +%s) - START )); }

echo "=== gpu_check $(date -u +%FT%TZ) on $(hostname), python $($PY -V 2>&1)"
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  if [ "${GPU_CHECK_DRY_RUN:-0}" != "1" ]; then
    echo "gpu_check: no CUDA GPU visible to torch ($($PY -c 'import torch; print(torch.__version__)' 2>&1));"
    echo "           this script measures on a GPU. GPU_CHECK_DRY_RUN=1 runs its steps on the CPU instead."
    exit 2
  fi
  DRY=1
  echo "=== DRY RUN on the CPU: the cuda tests skip, the benchmark runs at toy sizes"
else
  DRY=0
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv || true
fi
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"

echo "=== [$(elapsed)s] CUDA tests: kernels vs references (quantized ones too), bf16 parity, CUDA graphs vs eager, placement without syncs"
timeout 180 $PY -m pytest -q -p no:cacheprovider -m cuda -o addopts="" \
  tests/models/kernels tests/models/test_triton_qmoe.py tests/models/test_cuda_parity.py tests/engine/test_decode_graphs.py \
  tests/engine/test_attention_variant_kernels.py tests/placement/test_executor.py tests/engine/test_piecewise_graphs.py \
  tests/placement/test_quantized.py tests/models/test_quant.py tests/models/kernels/test_kv_fp8.py 2>&1 | tee "$OUT/pytest_cuda.log" | tail -25
CUDA_RC=${PIPESTATUS[0]}

echo "=== [$(elapsed)s] engine tests with the engine on the default device (CUDA when present)"
timeout 120 $PY -m pytest -q -p no:cacheprovider -o addopts="" -m "not slow" \
  tests/engine/test_engine.py tests/engine/test_decode_graphs.py 2>&1 | tee "$OUT/pytest_engine.log" | tail -15
ENGINE_RC=${PIPESTATUS[0]}

echo "=== [$(elapsed)s] quantized MoE kernels (FP8 block, MXFP4, INT4 vs bf16): python -m loadtest gpu --models none with ${QUANT_BUDGET}s"
if [ "$DRY" = "1" ]; then
  QUANT_ARGS=(--cpu-dry-run --quant-batches 1)
else
  QUANT_ARGS=()
fi
timeout $(( QUANT_BUDGET + 20 )) $PY -m loadtest gpu --models none --time-budget "$QUANT_BUDGET" \
  --json "$OUT/bench_gpu_quant.json" "${QUANT_ARGS[@]}" 2>&1 | tee "$OUT/bench_gpu_quant.log" | grep -v "^USDT" | tail -40
QUANT_RC=${PIPESTATUS[0]}

LEFT=$(( BUDGET - $(elapsed) - 15 ))
echo "=== [$(elapsed)s] python -m loadtest gpu with ${LEFT}s"
if [ "$DRY" = "1" ]; then
  BENCH_ARGS=(--cpu-dry-run --layers 2 --batches 1,4 --eager-batches 1 --hf-batches 1 --moe-kernel-batches 1 --async-batches 4
              --prompt-len 16 --output-len 8)
else
  BENCH_ARGS=()
fi
timeout $(( LEFT + 10 )) $PY -m loadtest gpu --time-budget "$LEFT" --json "$OUT/bench_gpu.json" --quant-models "" \
  "${BENCH_ARGS[@]}" "$@" 2>&1 | tee "$OUT/bench_gpu.log" | grep -v "^USDT" | tail -60
BENCH_RC=${PIPESTATUS[0]}

echo "=== [$(elapsed)s] done: cuda tests rc=$CUDA_RC, engine tests rc=$ENGINE_RC, quant bench rc=$QUANT_RC, bench rc=$BENCH_RC"
[ "$CUDA_RC" = 0 ] && [ "$ENGINE_RC" = 0 ] && [ "$QUANT_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
