#!/usr/bin/env bash
# The coding agents the API tests drive (tests/agents): Claude Code (`claude`) and Codex CLI
# (`codex`), installed from npm into .tools/npm (gitignored), and the o200k_base vocabulary that
# openai-harmony needs for the `openai` tool-call parser (gpt-oss), taken from the npm package
# js-tiktoken (which ships it) and written as the .tiktoken file harmony reads from
# TIKTOKEN_ENCODINGS_BASE, checked against harmony's own SHA-256. Any failure exits non-zero
# (CI fails). Idempotent: does nothing when all three are there and work.
#   TOOLS_DIR=...   install somewhere else (default: <repo>/.tools)
#   CLAUDE_CODE_VERSION / CODEX_VERSION / JS_TIKTOKEN_VERSION   other versions than the pinned ones (tested)
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS_DIR="${TOOLS_DIR:-$PWD/.tools}"
NPM_DIR="$TOOLS_DIR/npm"
VOCAB_DIR="$TOOLS_DIR/tiktoken"
PKGS=("@anthropic-ai/claude-code@${CLAUDE_CODE_VERSION:-2.1.332}" "@openai/codex@${CODEX_VERSION:-0.171.0}"
      "js-tiktoken@${JS_TIKTOKEN_VERSION:-1.0.21}")
O200K_SHA256=446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d

command -v npm >/dev/null 2>&1 || { echo "[install_agents] npm is required" >&2; exit 3; }
PY="${PYTHON:-python3}"

works() {
  "$NPM_DIR/node_modules/.bin/claude" --version >/dev/null 2>&1 \
    && "$NPM_DIR/node_modules/.bin/codex" --version >/dev/null 2>&1 \
    && [ -f "$VOCAB_DIR/o200k_base.tiktoken" ]
}

if ! works; then
  mkdir -p "$NPM_DIR"
  [ -f "$NPM_DIR/package.json" ] || echo '{"name": "moe-serve-test-tools", "private": true}' > "$NPM_DIR/package.json"
  echo "[install_agents] npm install ${PKGS[*]}" >&2
  npm install --prefix "$NPM_DIR" --no-audit --no-fund --loglevel=error "${PKGS[@]}"
  mkdir -p "$VOCAB_DIR"
  "$PY" - "$NPM_DIR/node_modules/js-tiktoken/dist/ranks/o200k_base.js" "$VOCAB_DIR/o200k_base.tiktoken" "$O200K_SHA256" <<'EOF'
import hashlib, json, os, sys
src, dst, want = sys.argv[1:4]
text = open(src, encoding="utf-8").read()
ranks = json.loads(text[text.index("{"):text.rindex("}") + 1])["bpe_ranks"]
pairs = []
for line in ranks.split("\n"):  # js-tiktoken's packed form: "! <first rank> <base64> <base64> ..."
    if line:
        _, offset, *tokens = line.split(" ")
        pairs += [(int(offset) + i, t) for i, t in enumerate(tokens)]
data = "".join(f"{t} {r}\n" for r, t in sorted(pairs)).encode()
got = hashlib.sha256(data).hexdigest()
if got != want:
    sys.exit(f"[install_agents] o200k_base.tiktoken: sha256 {got}, expected {want}")
with open(dst + ".partial", "wb") as f:
    f.write(data)
os.replace(dst + ".partial", dst)
EOF
fi
works || { echo "[install_agents] claude, codex or the o200k vocabulary does not work after the install" >&2; exit 4; }
echo "[install_agents] claude $("$NPM_DIR/node_modules/.bin/claude" --version), $("$NPM_DIR/node_modules/.bin/codex" --version)," \
  "o200k_base.tiktoken in $VOCAB_DIR"
