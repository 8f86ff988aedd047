#!/usr/bin/env bash
# Make a local Debian bookworm base image for the Dockerfile (BASE_IMAGE_CPU), for machines with
# podman but no container registry: `debootstrap --variant=minbase` from the Debian mirror this
# machine's apt already uses, then `podman import`. Does nothing when the image exists.
#
#   scripts/image_base.sh [IMAGE]        # default localhost/moe-serve-base:bookworm
#   FORCE=1 scripts/image_base.sh        # rebuild it
#
# Needs root, podman and debootstrap (apt-get install podman debootstrap runc).
set -euo pipefail
IMAGE="${1:-localhost/moe-serve-base:bookworm}"
SUITE="${SUITE:-bookworm}"
# python3 + venv (ensurepip) for the virtual environment; ca-certificates for pip over TLS
PACKAGES="${PACKAGES:-python3,python3-venv,ca-certificates}"

if [ -z "${FORCE:-}" ] && podman image exists "$IMAGE"; then
  echo "[image_base] $IMAGE exists ($(podman image inspect --format '{{.Created}}' "$IMAGE"))"
  exit 0
fi
for tool in podman debootstrap; do
  command -v "$tool" >/dev/null || { echo "[image_base] $tool missing: apt-get install -y podman debootstrap runc" >&2; exit 1; }
done

# The mirror apt already uses (deb822 .sources or one-line .list), default deb.debian.org.
mirror=$(grep -rhoE '^URIs:\s*\S+/debian/?$' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1 | awk '{print $2}' || true)
if [ -z "$mirror" ]; then
  mirror=$(grep -rhoE '^deb\s+(\[[^]]*\]\s+)?\S+/debian/?\s' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
           | head -n 1 | awk '{print $NF}' || true)
fi
mirror="${MIRROR:-${mirror:-http://deb.debian.org/debian}}"

root=$(mktemp -d /var/tmp/moe-serve-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "[image_base] debootstrap --variant=minbase $SUITE from $mirror (packages: $PACKAGES)"
t0=$(date +%s)
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$mirror" \
  | grep -E '^I: (Retrieving|Validating|Installing|Configuring) (Release|Packages|core|base)|^I: Base system' || true
[ -x "$root/usr/bin/python3" ] || { echo "[image_base] debootstrap failed (no python3 in the root fs)" >&2; exit 1; }
# what a container image does not need
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
       "$root"/usr/share/man/* "$root"/usr/share/locale/*
# the root fs is imported as is: sources.list from debootstrap points at the same mirror
echo "[image_base] podman import -> $IMAGE"
tar -C "$root" -c . | podman import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' - "$IMAGE" >/dev/null
echo "[image_base] $IMAGE: $(podman image inspect --format '{{.Size}}' "$IMAGE") bytes, $(( $(date +%s) - t0 )) s"
