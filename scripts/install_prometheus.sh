#!/usr/bin/env bash
# Install Prometheus and promtool (used by tests/metrics and by deploy/prometheus checks).
# Idempotent: does nothing when both `prometheus` and `promtool` are already on PATH.
# Uses the distribution package (apt-get); services are not started here: on Debian/Ubuntu
# images a policy-rc.d that denies starts is put in place for the install if none exists.
# Exit status: 0 installed or already present; 2 apt-get unavailable (callers may skip).
set -euo pipefail

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
  echo "[install_prometheus] already installed: $(promtool --version 2>&1 | head -n 1)"
  exit 0
fi

. "$(dirname "$0")/apt_lib.sh"
apt_prepare install_prometheus

POLICY=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$POLICY" ]; then
  # Keep the package's postinst from starting a prometheus daemon on :9090.
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
  $SUDO chmod +x "$POLICY"
  created_policy=1
fi
cleanup() { if [ "$created_policy" = 1 ]; then $SUDO rm -f "$POLICY"; fi; }
trap cleanup EXIT

apt_install install_prometheus prometheus

command -v promtool >/dev/null 2>&1 || { echo "[install_prometheus] promtool missing after install" >&2; exit 1; }
echo "[install_prometheus] ok: $(prometheus --version 2>&1 | head -n 1)"
