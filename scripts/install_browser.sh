#!/usr/bin/env bash
# Install headless Chromium and its WebDriver from the distribution's packages, for the
# browser tests of the web playground (tests/ui). Never downloads a browser from elsewhere.
# Idempotent: does nothing when both are already installed.
# Exit status: 0 installed or already present; 1 the install failed; 2 apt-get unavailable.
set -euo pipefail

CHROMIUM="${MOE_SERVE_CHROMIUM:-/usr/bin/chromium}"
DRIVER="${MOE_SERVE_CHROMEDRIVER:-/usr/bin/chromedriver}"

if [ -x "$CHROMIUM" ] && [ -x "$DRIVER" ]; then
  echo "[install_browser] already installed: $("$CHROMIUM" --version 2>/dev/null | head -n 1)"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "[install_browser] apt-get not available; install chromium + chromedriver by hand" >&2
  exit 2
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "[install_browser] not root and no password-less sudo; cannot apt-get install" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
echo "[install_browser] apt-get install chromium chromium-driver"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null

for bin in "$CHROMIUM" "$DRIVER"; do
  [ -x "$bin" ] || { echo "[install_browser] $bin missing after install" >&2; exit 1; }
done
echo "[install_browser] ok: $("$CHROMIUM" --version 2>/dev/null | head -n 1)"
