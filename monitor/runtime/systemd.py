"""A minimal sd_notify client (no libsystemd): tells systemd when the daemon is ready, reloading, stopping, alive.

Every call is a no-op returning False when `$NOTIFY_SOCKET` is unset, so the daemon runs the same
under systemd, in a terminal and in tests.
"""

from __future__ import annotations

import os
import socket
import time


def _address(raw: str) -> str | bytes:
    # A leading '@' names a socket in the abstract namespace, which the kernel spells with a NUL byte.
    return b"\0" + raw[1:].encode() if raw.startswith("@") else raw


def notify(state: str) -> bool:
    """Send one newline-separated `KEY=value` state to systemd; True if it was sent."""
    raw = os.environ.get("NOTIFY_SOCKET")
    if not raw:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), _address(raw))
    except OSError:
        # Losing a notification must never take the daemon down; systemd's timeouts cover the rest.
        return False
    return True


def ready() -> bool:
    return notify("READY=1")


def stopping() -> bool:
    return notify("STOPPING=1")


def reloading() -> bool:
    """RELOADING=1 with MONOTONIC_USEC, which systemd >= 253 needs for `Type=notify-reload`; older ones ignore it."""
    return notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")


def watchdog_ping() -> bool:
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    """STATUS=: the one line `systemctl status` shows under the unit."""
    return notify(f"STATUS={text}")
