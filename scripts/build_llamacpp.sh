#!/usr/bin/env bash
# Build llama.cpp's llama-server, llama-bench, llama-quantize and llama-perplexity from the
# vendored tree of the llama-cpp-python source distribution (PyPI), with cmake, for the
# benchmark peer (loadtest/peers/llamacpp.py). Cached outside the repo; idempotent.
#   LLAMACPP_HOME   where (default ~/.cache/moe-serve/llama.cpp): src/ (the tree), build/bin/
#   LLAMACPP_SPEC   which sdist (default llama-cpp-python==0.3.36)
# About 15 minutes on 2 cores. Native CPU tuning (GGML_NATIVE), no BLAS, OpenMP threads.
set -euo pipefail
HOME_DIR="${LLAMACPP_HOME:-$HOME/.cache/moe-serve/llama.cpp}"
SPEC="${LLAMACPP_SPEC:-llama-cpp-python==0.3.36}"
PY="${PYTHON:-python3}"
BIN="$HOME_DIR/build/bin"
TOOLS="llama-server llama-bench llama-quantize llama-perplexity"
if [ -x "$BIN/llama-server" ] && [ -x "$BIN/llama-bench" ] && [ -x "$BIN/llama-quantize" ] && [ -x "$BIN/llama-perplexity" ]; then
  echo "[llama.cpp] already built in $BIN"
  exit 0
fi
mkdir -p "$HOME_DIR"
if [ ! -f "$HOME_DIR/src/vendor/llama.cpp/CMakeLists.txt" ]; then
  tmp="$(mktemp -d)"
  echo "[llama.cpp] downloading the $SPEC source distribution"
  "$PY" -m pip download -q --no-deps --no-binary :all: -d "$tmp" "$SPEC"
  rm -rf "$HOME_DIR/src" && mkdir -p "$HOME_DIR/src"
  tar -xzf "$tmp"/*.tar.gz -C "$HOME_DIR/src" --strip-components=1
  rm -rf "$tmp"
fi
SRC="$HOME_DIR/src/vendor/llama.cpp"
echo "[llama.cpp] configuring $SRC"
cmake -S "$SRC" -B "$HOME_DIR/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DGGML_OPENMP=ON \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF
echo "[llama.cpp] building $TOOLS (about 15 minutes on 2 cores)"
# shellcheck disable=SC2086
cmake --build "$HOME_DIR/build" -j "$(nproc)" --target $TOOLS
echo "[llama.cpp] built: $(ls "$BIN")"
