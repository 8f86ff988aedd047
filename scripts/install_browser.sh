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

. "$(dirname "$0")/apt_lib.sh"
apt_prepare install_browser
apt_install install_browser chromium chromium-driver fonts-dejavu-core

for bin in "$CHROMIUM" "$DRIVER"; do
  [ -x "$bin" ] || { echo "[install_browser] $bin missing after install" >&2; exit 1; }
done
echo "[install_browser] ok: $("$CHROMIUM" --version 2>/dev/null | head -n 1)"
