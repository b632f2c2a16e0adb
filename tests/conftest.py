"""Shared fixtures over the helpers in `tests/support.py`: a broker, brokers of a test's own, MQTT captures,
daemons as real processes. Every fixture stops what it started in a `finally`, escalating TERM -> KILL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import Broker, Capture, DaemonProcess, stop_all


@pytest.fixture(scope="session")
def broker(tmp_path_factory) -> Iterator[Broker]:
    """One shared, non-persistent broker for tests that do not break it."""
    running = Broker(tmp_path_factory.mktemp("mosquitto"))
    try:
        yield running.start()
    finally:
        running.stop()


@pytest.fixture
def broker_factory(tmp_path) -> Iterator[Callable[..., Broker]]:
    """Brokers of a test's own (to kill, restart, or configure with TLS and passwords)."""
    made: list[Broker] = []

    def make(**kwargs) -> Broker:
        made.append(Broker(tmp_path / f"broker{len(made)}", **kwargs))
        return made[-1]

    try:
        yield make
    finally:
        stop_all(item.stop for item in made)


@pytest.fixture
def capture_factory() -> Iterator[Callable[..., Capture]]:
    made: list[Capture] = []

    def make(port: int, topics: list[str] | None = None, **options) -> Capture:
        made.append(Capture(port, topics or ["#"], **options))
        return made[-1]

    try:
        yield make
    finally:
        stop_all(item.close for item in made)


@pytest.fixture
def daemon_factory() -> Iterator[Callable[..., DaemonProcess]]:
    made: list[DaemonProcess] = []

    def make(config: Path, env: dict[str, str] | None = None, ready: bool = True) -> DaemonProcess:
        made.append(DaemonProcess(config, env))
        if ready:
            made[-1].wait_for_event("ready", timeout=60)
        return made[-1]

    try:
        yield make
    finally:
        stop_all(item.shutdown for item in made)
