"""When an input message may be acknowledged to the broker: once nothing of it can be lost any more.

Each message gets a `Receipt` when it arrives, holding it back for as long as something depends on it: its
handling, its record in the journal until that is fsynced, and each window it completed until that window is
decided (scored, and its alert acknowledged by the broker, or dropped and counted). `InOrderAcks` hands the
receipts back in the order the messages arrived, and only once the oldest is free: MQTT requires PUBACKs in
the order of the PUBLISHes, so one message waiting for its window holds back the acknowledgement of the later
ones (for as long as one batch takes; partial windows hold nothing, because they are in the journal).

`PendingWindows` is the registry of windows (fixed or beat) cut but not decided: it releases their receipts and
gives the journal's checkpoint the windows a crash would otherwise lose.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from monitor.ingest.batching import KeyShares
from monitor.window import Window

EARLY_ACK_SECONDS = 5.0  # an acknowledgement may precede `alert_sent` by microseconds; never by this long


class Receipt:
    """One input message: its packet id and QoS for the PUBACK, and how many things still hold it back."""

    __slots__ = ("mid", "qos", "holds", "first_sent")

    def __init__(self, mid: int, qos: int, first_sent: bool) -> None:
        self.mid = mid
        self.qos = qos
        self.holds = 1  # its handling
        self.first_sent = first_sent  # a QoS 1/2 message first sent on the current connection (not a redelivery)


class InOrderAcks:
    """Receipts in arrival order; `ready()` pops those at the head that nothing holds any more.

    QoS 0 messages get receipts too (they keep their place in the order) but need no PUBACK, so they are not counted
    as unacknowledged: the count is what MQTT 5 Receive Maximum bounds, the QoS 1 and 2 messages the broker waits for.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._receipts: deque[Receipt] = deque()
        self._awaiting_puback = 0
        self._first_sent = 0  # receipts marked `first_sent` and not yet handed back

    def received(self, mid: int, qos: int, redelivered: bool = False) -> Receipt:
        receipt = Receipt(mid, qos, qos > 0 and not redelivered)
        with self._lock:
            self._receipts.append(receipt)
            self._awaiting_puback += qos > 0
            self._first_sent += receipt.first_sent
        return receipt

    def new_connection(self) -> None:
        """The input held so far came on an earlier connection: the broker re-sends what it has not acknowledged."""
        with self._lock:
            for receipt in self._receipts:
                receipt.first_sent = False
            self._first_sent = 0

    def hold(self, receipt: Receipt) -> None:
        with self._lock:
            receipt.holds += 1

    def release(self, receipt: object) -> None:
        with self._lock:
            receipt.holds -= 1  # type: ignore[attr-defined]

    def ready(self) -> list[Receipt]:
        """The receipts that can be acknowledged now, oldest first (one thread only calls it and sends the PUBACKs)."""
        out = []
        with self._lock:
            receipts = self._receipts
            while receipts and receipts[0].holds <= 0:
                receipt = receipts.popleft()
                self._awaiting_puback -= receipt.qos > 0
                self._first_sent -= receipt.first_sent
                out.append(receipt)
        return out

    def unacknowledged(self) -> int:
        """QoS 1 and 2 messages received and not yet handed back for their PUBACK."""
        with self._lock:
            return self._awaiting_puback

    def first_sent_unacknowledged(self) -> int:
        """QoS 1 and 2 messages first sent on the current connection and not yet handed back: a lower bound of what
        the broker has in flight to us (it counts a message until our PUBACK reaches it, redeliveries too)."""
        with self._lock:
            return self._first_sent


class PendingWindows:
    """Windows cut and not yet decided, with the receipt of the message that completed each (None when replayed)."""

    def __init__(self, acks: InOrderAcks, on_decided: Callable[[Window], None] | None = None) -> None:
        """`on_decided(window)` is told of each tracked window decided (the journal records it)."""
        self.acks = acks
        self.on_decided = on_decided
        self._lock = threading.Lock()
        self._windows: dict[int, tuple[Window, Receipt | None]] = {}  # by id(window): the window is kept alive here
        self._alerts: dict[int, Window] = {}  # alert mid -> its window, until the broker acknowledges the alert
        self._alert_shares = KeyShares()  # those alerts, counted by sensor
        # Alert mids acknowledged before `alert_sent` could record them, with when: acknowledgements of other messages
        # (episode events) land here too, so entries expire long before paho could reuse their mid.
        self._early_acks: dict[int, float] = {}

    def add(self, window: Window, receipt: Receipt | None) -> None:
        if receipt is not None:
            self.acks.hold(receipt)
        with self._lock:
            self._windows[id(window)] = (window, receipt)

    def decided(self, window: Window) -> None:
        """The window needs nothing more (not anomalous, alert acknowledged, or dropped and counted)."""
        with self._lock:
            entry = self._windows.pop(id(window), None)
        if entry is None:
            return
        if self.on_decided is not None:
            self.on_decided(window)
        if entry[1] is not None:
            self.acks.release(entry[1])

    def alert_sent(self, window: Window, mid: int) -> None:
        """The window's alert was queued as `mid`; the window is decided when the broker acknowledges it."""
        with self._lock:
            early = time.monotonic() - self._early_acks.pop(mid, float("-inf")) < EARLY_ACK_SECONDS
            if not early:
                self._alerts[mid] = window
                self._alert_shares.add(window.sensor_id)
        if early:
            self.decided(window)

    def alert_acknowledged(self, mid: int) -> None:
        """Called from paho's network thread (under paho's lock): only our own bookkeeping here."""
        with self._lock:
            window = self._alerts.pop(mid, None)
            if window is not None:
                self._alert_shares.remove(window.sensor_id)
            else:  # its `alert_sent` comes right after, or it was not an alert
                now = time.monotonic()
                if len(self._early_acks) > 1024:
                    self._early_acks = {m: t for m, t in self._early_acks.items() if now - t < EARLY_ACK_SECONDS}
                self._early_acks[mid] = now
        if window is not None:
            self.decided(window)

    def alerts_over_share(self, sensor_id: str, floor: int, fair_share: float) -> bool:
        """The sensor has at least `floor` alerts waiting for the broker's acknowledgement, and more than twice
        `fair_share`: a flood of anomalous windows that would fill the alert queue for all."""
        return self._alert_shares.over_share(sensor_id, floor, fair_share)

    def windows(self) -> list[Window]:
        with self._lock:
            return [window for window, _ in self._windows.values()]

    def __len__(self) -> int:
        with self._lock:
            return len(self._windows)
