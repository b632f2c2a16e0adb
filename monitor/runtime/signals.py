"""Lifecycle signals (SIGTERM, SIGINT, SIGHUP), recorded from the first moment of `monitor run`.

`install()` runs before anything slow (importing torch, loading the model): until then a SIGHUP would end the
process with no log line, which systemd takes for a clean exit. The handlers only record the signal; the
daemon's main loop acts on `received` once it runs (a handler runs between bytecodes in the main thread, and
one that took a lock the main thread holds would deadlock).
"""

from __future__ import annotations

import signal

LIFECYCLE_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

received: list[int] = []


def install() -> None:
    for signum in LIFECYCLE_SIGNALS:
        signal.signal(signum, lambda number, frame: received.append(number))
