# Shortcuts; the README's two set-up commands are scripts/demo.sh and scripts/test.sh (no make needed).
VENV ?= .venv
PY := $(VENV)/bin/python
export VENV

.PHONY: setup test test-fast demo train bench lint install-service

setup:
	scripts/setup.sh

test:  ## install everything (Mosquitto, Prometheus, the venv) and run the whole test suite
	scripts/test.sh

test-fast:  ## the in-process tests: no broker, daemon, nats-server or Prometheus (tests/conftest.py refuses them)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests/unit

demo:  ## run the daemon with the bundled model on a replayed ECG5000 stream, on a real Mosquitto
	scripts/demo.sh

train:  ## retrain the default model into runs/ecg5000 (about 4 minutes; the shipped one stays as it is)
	$(VENV)/bin/monitor train --config configs/train-ecg5000.yaml --output runs/ecg5000 --force

bench:  ## the benchmark suite; writes bench/RESULTS.md and bench/results.json
	$(PY) -m bench.run

lint:
	$(VENV)/bin/ruff check monitor tests bench

install-service:  ## install as a systemd service (see docs/operations.md)
	systemd/install.sh
