"""The guard behind `pytest -m "not slow"`: a test not marked slow cannot start a broker, daemon or nats-server."""

from __future__ import annotations

import pytest

from tests.nats import NatsServer
from tests.support import Broker, DaemonProcess, ProcessNotAllowed, daemon_config, run_cli


def test_a_test_not_marked_slow_cannot_start_mosquitto(tmp_path):
    broker = Broker(tmp_path / "broker")
    with pytest.raises(ProcessNotAllowed, match="mosquitto not started: .*is not marked slow"):
        broker.start()
    assert broker.process is None


def test_a_test_not_marked_slow_cannot_start_the_daemon(tmp_path):
    with pytest.raises(ProcessNotAllowed, match="the daemon not started"):
        DaemonProcess(daemon_config(tmp_path / "m.yaml", 1))


def test_a_test_not_marked_slow_cannot_run_the_daemon_through_the_command_line(tmp_path):
    with pytest.raises(ProcessNotAllowed, match="the daemon not started"):
        run_cli("run", "--config", str(daemon_config(tmp_path / "m.yaml", 1)))


def test_a_test_not_marked_slow_cannot_start_nats_server(tmp_path):
    with pytest.raises(ProcessNotAllowed, match="nats-server not started"):
        NatsServer(tmp_path / "nats").start()
