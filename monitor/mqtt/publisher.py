"""What the output stages publish through: a `Publisher` queues one message or refuses it with a closed reason.

Alerts and episode events go out through the daemon's connection (`connection.MqttConnection`) or, in tests, any
object with `publish`; a refusal carries one of `DROP_REASONS`, so the `reason` label of the dropped-message
counters stays closed whatever the transport raises.
"""

from __future__ import annotations

from typing import Literal, Protocol, get_args

DropReason = Literal["queue_full", "publish_error"]
DROP_REASONS: tuple[DropReason, ...] = get_args(DropReason)  # the `reason` labels of monitor_alerts_dropped_total


class PublishRefused(Exception):
    """The transport would not take the message; `reason` is one of `DROP_REASONS`."""

    def __init__(self, reason: DropReason, detail: str = "") -> None:
        super().__init__(f"{reason} ({detail})" if detail else reason)
        self.reason: DropReason = reason


class Publisher(Protocol):
    """Queues one message for the broker and returns its packet id, or raises `PublishRefused`."""

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> int: ...
