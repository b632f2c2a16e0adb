"""Shared fixtures over the helpers in `tests/support.py`: a broker, brokers of a test's own, MQTT captures,
daemons as real processes. Every fixture stops what it started in a `finally`, escalating TERM -> KILL.

A test not marked slow may not start a broker, daemon, nats-server or Prometheus (nor use a fixture that does):
`tests.support.spawn` raises `ProcessNotAllowed` for it, so `pytest -m "not slow"` starts none."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from tests.support import Broker, Capture, DaemonProcess, forbid_processes, stop_all

T = TypeVar("T")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before the test's fixtures are set up: processes are allowed only to tests marked slow."""
    slow = item.get_closest_marker("slow") is not None
    forbid_processes(None if slow else f"{item.nodeid} is not marked slow (@pytest.mark.slow)")


@pytest.fixture(scope="session")
def broker(tmp_path_factory) -> Iterator[Broker]:
    """One shared, non-persistent broker for tests that do not break it."""
    running = Broker(tmp_path_factory.mktemp("mosquitto"))
    try:
        yield running.start()
    finally:
        running.stop()


def factory(
    build: Callable[..., T], stop: Callable[[T], object], check: Callable[[T], object] | None = None
) -> Iterator[Callable[..., T]]:
    """A fixture body: `make(...)` builds (and optionally checks) one more; teardown stops every one built,
    including one whose check failed."""
    made: list[T] = []

    def make(*args, **kwargs) -> T:
        made.append(build(*args, **kwargs))
        if check is not None:
            check(made[-1])
        return made[-1]

    try:
        yield make
    finally:
        stop_all(functools.partial(stop, item) for item in made)


@pytest.fixture
def broker_factory(tmp_path) -> Iterator[Callable[..., Broker]]:
    """Brokers of a test's own (to kill, restart, or configure with TLS and passwords)."""
    numbers = itertools.count()
    yield from factory(lambda **kwargs: Broker(tmp_path / f"broker{next(numbers)}", **kwargs), Broker.stop)


@pytest.fixture
def capture_factory() -> Iterator[Callable[..., Capture]]:
    """`make(port, topics=["#"], ...)`: QoS 1 subscribers recording what they receive."""
    yield from factory(lambda port, topics=None, **options: Capture(port, topics or ["#"], **options), Capture.close)


@pytest.fixture
def daemon_factory() -> Iterator[Callable[..., DaemonProcess]]:
    """`make(config, env=None, ready=True)`: the daemon as a real process; waits for `ready` unless told not to."""

    def build(config: Path, env: dict[str, str] | None = None, ready: bool = True) -> DaemonProcess:
        daemon = DaemonProcess(config, env)
        daemon.wait_ready = ready
        return daemon

    def check(daemon: DaemonProcess) -> None:
        if daemon.wait_ready:
            daemon.wait_for_event("ready", timeout=60)

    yield from factory(build, DaemonProcess.shutdown, check)
