#!/usr/bin/env bash
# Install the monitor as a systemd service: a venv in /opt/monitor, config in /etc/monitor, the unit.
#
# The installer owns /opt/monitor (venv, bundled models, README and docs) and replaces it on every run. Your own
# models belong in /etc/monitor/models (point model.path at /etc/monitor/models/NAME): the installer
# creates that directory and never changes what is in it, nor an existing /etc/monitor/monitor.yaml.
#
# Usage (as root, from anywhere): systemd/install.sh
# Environment: PYTHON (default python3, >= 3.11); TORCH_PIP_ARGS, extra pip arguments for the torch
# install, e.g. "--index-url <PyTorch's CPU-only wheel index>" to avoid pulling the CUDA build.
# Re-running upgrades the package and the bundled models (then: systemctl restart monitor) and keeps
# /etc/monitor/monitor.yaml, the credential and /etc/monitor/models. A model found in /opt/monitor/models
# that the repository does not ship (put there before this layout) is moved to /etc/monitor/models.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PREFIX=/opt/monitor
CONFDIR=/etc/monitor
USER_MODELS=$CONFDIR/models
UNITDIR=/etc/systemd/system
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0

step() { printf '==> %s\n' "$*"; }
# The service runs as a dynamic user: everything installed here must be world-readable.
umask 022

if [[ $(id -u) -ne 0 ]]; then
    echo "install.sh: run as root (it writes $PREFIX, $CONFDIR and $UNITDIR)" >&2
    exit 1
fi
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "install.sh: $PYTHON is older than Python 3.11" >&2
    exit 1
}

step "venv in $PREFIX/.venv"
install -d -m 0755 "$PREFIX"
[[ -x $PREFIX/.venv/bin/python ]] || "$PYTHON" -m venv "$PREFIX/.venv"
# torch first and pinned, so the package's looser torch requirement cannot pick another build.
# shellcheck disable=SC2086  # TORCH_PIP_ARGS is a list of arguments
"$PREFIX/.venv/bin/pip" install --no-input "torch==$TORCH_VERSION" ${TORCH_PIP_ARGS:-}
# The onnx extra: docs/user-guide.md documents model.backend: onnx for the service.
"$PREFIX/.venv/bin/pip" install --no-input --upgrade "$REPO[onnx]"
install -m 0644 "$REPO/README.md" "$PREFIX/README.md"
install -d -m 0755 "$PREFIX/docs"
install -m 0644 "$REPO"/docs/*.md "$PREFIX/docs/"   # the unit's Documentation= is docs/operations.md

step "models: bundled in $PREFIX/models, yours in $USER_MODELS"
install -d -m 0755 "$CONFDIR" "$USER_MODELS"
# Never delete a model the user put among the bundled ones: move it to the user directory instead.
if [[ -d $PREFIX/models ]]; then
    for model in "$PREFIX"/models/*/; do
        name=$(basename "$model")
        [[ -e $REPO/models/$name ]] && continue
        if [[ -e $USER_MODELS/$name ]]; then
            echo "install.sh: $model is not a bundled model and $USER_MODELS/$name exists; move one of them first" >&2
            exit 1
        fi
        mv "$model" "$USER_MODELS/$name"
        echo "    moved your model $name to $USER_MODELS/$name (point model.path there)"
    done
fi
rm -rf "$PREFIX/models.new"
cp -r "$REPO/models" "$PREFIX/models.new"
# cp keeps source modes, and an artifact written with mode 0600 would be unreadable to the service.
chmod -R u=rwX,go=rX "$PREFIX/models.new"
# Swap whole directories so a running daemon never sees a half-copied artifact on reload.
rm -rf "$PREFIX/models.old"
[[ -d $PREFIX/models ]] && mv "$PREFIX/models" "$PREFIX/models.old"
mv "$PREFIX/models.new" "$PREFIX/models"
rm -rf "$PREFIX/models.old"

step "config in $CONFDIR"
install -d -m 0700 "$CONFDIR/credentials"
# LoadCredential= with a path fails the unit (243/CREDENTIALS) when the file is missing, and the
# daemon reads the password only when mqtt.username is set: an empty one suits an anonymous broker.
[[ -e $CONFDIR/credentials/mqtt_password ]] || install -m 0600 /dev/null "$CONFDIR/credentials/mqtt_password"
if [[ -e $CONFDIR/monitor.yaml ]]; then
    echo "    keeping existing $CONFDIR/monitor.yaml"
else
    # World-readable for the dynamic user; it holds no secret (the password is a credential).
    install -m 0644 "$REPO/configs/monitor.yaml" "$CONFDIR/monitor.yaml"
fi
install -m 0644 "$REPO/systemd/monitor.env.example" "$CONFDIR/monitor.env.example"
# As the service will run it: from its WorkingDirectory (relative model paths) and as an unprivileged
# user like its dynamic one, so a file it cannot read fails here rather than at start.
(cd "$PREFIX" && setpriv --reuid=65534 --regid=65534 --clear-groups -- "$PREFIX/.venv/bin/monitor" check-config "$CONFDIR/monitor.yaml")

step "unit in $UNITDIR"
install -m 0644 "$REPO/systemd/monitor.service" "$UNITDIR/monitor.service"
# Several instances on one host (docs/operations.md): monitor@<i> reads $CONFDIR/monitor-<i>.yaml.
install -m 0644 "$REPO/systemd/monitor@.service" "$UNITDIR/monitor@.service"

next_steps=(
    "install -m 0600 /dev/stdin $CONFDIR/credentials/mqtt_password   # if the broker wants a password (with mqtt.username)"
    "systemctl enable --now monitor.service"
    "journalctl -u monitor.service -f"
)
# /run/systemd/system exists only when systemd is the running init (what sd_booted() checks).
if [[ -d /run/systemd/system && $(cat /proc/1/comm) == systemd ]]; then
    systemctl daemon-reload
    step "installed; next:"
else
    step "systemd is not PID 1 here: not reloading it; on a systemd host, next:"
    echo "    systemctl daemon-reload"
fi
printf '    %s\n' "${next_steps[@]}"
