"""sd_notify client against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import re
import socket
import time
import uuid

import pytest

from monitor.runtime import systemd


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
        (lambda: systemd.notify("READY=1\nSTATUS=up"), "READY=1\nSTATUS=up"),
    ],
)
def test_datagrams(notify_socket, send, expected):
    assert send() is True
    assert notify_socket() == expected


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
