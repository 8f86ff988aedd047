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

if ! command -v apt-get >/dev/null 2>&1; then
  echo "[install_prometheus] apt-get not available; install prometheus + promtool by hand" >&2
  exit 2
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "[install_prometheus] not root and no password-less sudo; cannot apt-get install" >&2
    exit 2
  fi
fi

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

export DEBIAN_FRONTEND=noninteractive
echo "[install_prometheus] apt-get install prometheus"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null

command -v promtool >/dev/null 2>&1 || { echo "[install_prometheus] promtool missing after install" >&2; exit 1; }
echo "[install_prometheus] ok: $(prometheus --version 2>&1 | head -n 1)"
