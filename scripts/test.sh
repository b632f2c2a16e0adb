#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: installs Mosquitto, Prometheus, nats-server, systemd (for
# `systemd-analyze security --offline`, which the unit tests run; no running systemd needed), gcc (a test builds a
# small library that steps a daemon's wall clock) and the virtualenv (scripts/setup.sh), then mypy on monitor/ and
# pytest. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
# Every tool the suite needs is installed below, so a test whose tool is missing (systemd-analyze, promtool,
# nats-server) fails instead of skipping: CI=1 unless the caller says otherwise.
export CI=${CI:-1}
EXTRA_APT_PACKAGES="prometheus openssl nats-server systemd gcc libc6-dev ${EXTRA_APT_PACKAGES:-}" scripts/setup.sh
"${VENV:-.venv}/bin/python" -m mypy  # monitor/, as configured in pyproject.toml; must be clean
exec "${VENV:-.venv}/bin/python" -m pytest -q -p no:cacheprovider "$@"
