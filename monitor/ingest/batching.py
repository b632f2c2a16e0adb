"""The bounded window queue and the micro-batcher: up to `max_batch` windows or `max_wait_seconds`.

The MQTT thread puts ready windows without ever blocking; a full queue refuses the window (the
caller counts the drop). The scoring thread takes batches: it waits for a first window, then
gathers more until the batch is full or the first window has waited `max_wait_seconds` since its
last sample arrived, whichever comes first. Under a backlog the deadline has already passed, so
batches are filled straight from the queue and no time is spent waiting.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar


class Timed(Protocol):
    @property
    def completed_at(self) -> float: ...


ItemT = TypeVar("ItemT", bound=Timed)


class WindowQueue(Generic[ItemT]):
    """A bounded FIFO of ready windows."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._queue: queue.Queue[ItemT] = queue.Queue(maxsize=capacity)

    def offer(self, item: ItemT) -> bool:
        """Put without blocking; False when the queue is full."""
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            return False
        return True

    def depth(self) -> int:
        return self._queue.qsize()

    def get(self, timeout_seconds: float) -> ItemT | None:
        try:
            return (
                self._queue.get(timeout=max(timeout_seconds, 0.0)) if timeout_seconds > 0 else self._queue.get_nowait()
            )
        except queue.Empty:
            return None


class MicroBatcher(Generic[ItemT]):
    """Gathers windows from a `WindowQueue` into batches bounded by size and by waiting time."""

    def __init__(
        self,
        source: WindowQueue[ItemT],
        max_batch: int,
        max_wait_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.max_batch = max_batch
        self.max_wait_seconds = max_wait_seconds
        self.clock = clock

    def next_batch(self, stop: threading.Event, poll_seconds: float = 0.1) -> list[ItemT]:
        """The next batch; empty when `stop` is set and nothing is queued, or after `poll_seconds` idle."""
        first = self.source.get(poll_seconds)
        if first is None:
            return []
        batch = [first]
        deadline = first.completed_at + self.max_wait_seconds
        while len(batch) < self.max_batch:
            item = self.source.get(0.0)
            if item is None:
                remaining = deadline - self.clock()
                if remaining <= 0 or stop.is_set():
                    break
                item = self.source.get(remaining)
                if item is None:
                    break
            batch.append(item)
        return batch
