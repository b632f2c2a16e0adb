#!/usr/bin/env bash
# Install what the monitor needs on a fresh Debian machine: Mosquitto (and, for the tests,
# Prometheus), then a virtualenv with the CPU build of PyTorch and the package itself.
# Idempotent: a second run installs nothing new. Run as root (or with the packages present).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PACKAGES=(mosquitto mosquitto-clients ${EXTRA_APT_PACKAGES:-})
# Debian's python3 needs python3-venv for `python3 -m venv`; another Python may bring it along.
command -v python3 >/dev/null || PACKAGES+=(python3)
python3 -c "import venv, ensurepip" 2>/dev/null || PACKAGES+=(python3-venv)

missing=()
for package in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "setup: missing Debian packages: ${missing[*]}; run as root or install them first" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The packages start their own services; the monitor's scripts and tests start their own brokers.
  if command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
    systemctl disable --now mosquitto prometheus nats-server 2>/dev/null || true
  fi
fi

if [[ ! -x $VENV/bin/python ]]; then
  echo "setup: creating the virtualenv $VENV"
  python3 -m venv "$VENV"
fi
# torch first, pinned: this version is the local CPU build; a bare `torch` would pull a CUDA build.
# Not quiet when it is missing: the download is the long part of a first run, and pip shows its progress.
if ! "$VENV/bin/python" -c 'import sys, torch; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
  echo "setup: installing torch 2.13.0 (CPU build) into $VENV: the first run's long step, a few minutes"
  "$VENV/bin/pip" install --disable-pip-version-check --progress-bar on "torch==2.13.0"
fi
echo "setup: installing monitor and its Python dependencies into $VENV (nothing new after the first run)"
"$VENV/bin/pip" install -q --disable-pip-version-check -e ".[report,onnx,test]"
echo "setup: done"
