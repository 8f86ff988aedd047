#!/usr/bin/env bash
# Install moe-serve into a virtual environment (default: ./.venv), with the dev extras, at the
# versions the tests pass with (constraints.txt; MOE_SERVE_CONSTRAINTS="" resolves the newest).
# torch: where the package index offers a CPU-only build (a "+cpu" local version) and the
# machine has no NVIDIA GPU, that build is preferred (a plain `pip install torch` would pull
# several GB of CUDA packages). Override with TORCH_SPEC="torch==X.Y.Z".
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MOE_SERVE_VENV:-.venv}"
PY="${PYTHON:-python3}"
EXTRAS="${MOE_SERVE_EXTRAS:-dev}"
CONSTRAINTS="${MOE_SERVE_CONSTRAINTS-constraints.txt}"
constrain=()
[ -n "$CONSTRAINTS" ] && constrain=(-c "$CONSTRAINTS")

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip "$@"; }

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  spec="${TORCH_SPEC:-}"
  if [ -z "$spec" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
    # the +cpu build of the constrained release (any release without constraints)
    pinned=$( [ -n "$CONSTRAINTS" ] && sed -n 's/^torch==//p' "$CONSTRAINTS" || true)
    pattern="${pinned//./\\.}"
    cpu_ver=$(pip index versions torch 2>/dev/null | grep -i '^Available versions' | tr ',' '\n' \
              | sed 's/^.*: //; s/ //g' | grep "^${pattern:-.*}+cpu$" | head -n 1 || true)
    [ -n "$cpu_ver" ] && spec="torch==$cpu_ver"
  fi
  spec="${spec:-torch}"
  echo "[install] installing $spec"
  pip install -q "${constrain[@]}" "$spec"
fi

echo "[install] installing moe-serve[$EXTRAS] (editable${CONSTRAINTS:+, -c $CONSTRAINTS})"
pip install -q "${constrain[@]}" -e ".[$EXTRAS]"
"$VENV/bin/python" -c "import server, models, torch; print('[install] ok: torch', torch.__version__)"
