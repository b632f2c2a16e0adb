"""sd_notify client against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import os
import re
import socket
import time
import uuid

import pytest

from monitor import systemd


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    """A bound datagram socket that NOTIFY_SOCKET points at; yields a function returning the next datagram."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2.0)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield lambda: sock.recv(4096).decode()


@pytest.mark.parametrize(
    ("send", "expected"),
    [
        (systemd.ready, "READY=1"),
        (systemd.stopping, "STOPPING=1"),
        (systemd.watchdog_ping, "WATCHDOG=1"),
        (lambda: systemd.status("scoring 12 sensors"), "STATUS=scoring 12 sensors"),
        (lambda: systemd.notify("READY=1\nSTATUS=up"), "READY=1\nSTATUS=up"),
    ],
)
def test_datagrams(notify_socket, send, expected):
    assert send() is True
    assert notify_socket() == expected


def test_status_stays_one_line(notify_socket):
    assert systemd.status("broker\ndown")
    assert notify_socket() == "STATUS=broker down"


def test_reloading_carries_monotonic_usec(notify_socket):
    before = time.monotonic_ns() // 1000
    assert systemd.reloading()
    match = re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=(\d+)", notify_socket())
    assert match
    assert before <= int(match.group(1)) <= time.monotonic_ns() // 1000


def test_abstract_socket(monkeypatch):
    name = f"monitor-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2.0)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.ready()
        assert sock.recv(4096) == b"READY=1"


def test_unset_socket_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    assert systemd.ready() is False
    assert systemd.watchdog_ping() is False


def test_unreachable_socket_returns_false(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert systemd.ready() is False


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("30000000", "other", None),
        (None, None, None),
        ("0", None, None),
        ("garbage", None, None),
    ],
)
def test_watchdog_interval(monkeypatch, usec, pid, expected):
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", {"self": str(os.getpid()), "other": "1"}.get(pid))):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert systemd.watchdog_interval_seconds() == expected
