# Shared by the apt-based installers (source it; bash): `apt_prepare TAG` checks that apt-get
# exists (exit 2 otherwise) and sets SUDO ("" as root, "sudo -n" with password-less sudo,
# else exit 1); `apt_install TAG PACKAGE...` installs quietly without recommends.

apt_prepare() {
  local tag="$1"
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "[$tag] apt-get not available; install the packages by hand" >&2
    exit 2
  fi
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      SUDO="sudo -n"
    else
      echo "[$tag] not root and no password-less sudo; cannot apt-get install" >&2
      exit 1
    fi
  fi
  export DEBIAN_FRONTEND=noninteractive
}

apt_install() {
  local tag="$1"
  shift
  echo "[$tag] apt-get install $*"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
