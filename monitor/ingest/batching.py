"""The bounded window queue and the micro-batcher: up to `max_batch` windows or `max_wait_seconds`.

The MQTT thread puts ready windows; a full queue makes it wait, up to the caller's bound (the daemon is behind:
while the MQTT thread waits it reads no input, which waits at the broker), then refuses the window (the caller
counts the drop). With a `key` (the sensor id), the queue counts each key's windows, so the caller can bound one
sensor's share of it, and put the windows of a sensor holding more than its fair share behind the others'. The
scoring thread takes batches: it waits for a first window, then
gathers more until the batch is full or the first window has waited `max_wait_seconds` since its
last sample arrived, whichever comes first. Under a backlog the deadline has already passed, so
batches are filled straight from the queue and no time is spent waiting.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar


class Timed(Protocol):
    @property
    def completed_at(self) -> float: ...


ItemT = TypeVar("ItemT", bound=Timed)


class KeyShares:
    """Counts of items by key (a sensor id), and whether one key holds more than its share of them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: Counter[str] = Counter()
        self._counted = 0  # the sum of `_by_key`

    def add(self, key: str) -> None:
        with self._lock:
            self._by_key[key] += 1
            self._counted += 1

    def remove(self, key: str) -> None:
        with self._lock:
            self._counted -= 1
            left = self._by_key[key] - 1
            if left:
                self._by_key[key] = left
            else:
                del self._by_key[key]

    def count(self, key: str) -> int:
        with self._lock:
            return self._by_key.get(key, 0)

    def over_share(self, key: str, floor: int, fair_share: float) -> bool:
        """`key` holds at least `floor` items and more than twice `fair_share` (room / the keys that may use it): a
        flood, where a burst of many keys (a backlog) holds at most about a fair share each."""
        with self._lock:
            count = self._by_key.get(key, 0)
        return count >= floor and count > 2 * fair_share


class WindowQueue(Generic[ItemT]):
    """A bounded queue of ready windows in two lanes, counted by `key` when one is given.

    `offer(..., behind=True)` puts a window in the second lane (its sensor holds more than its fair share); `get`
    takes from the first lane first, so the other sensors' windows are not scored behind a flood. A key with windows
    in the second lane keeps its later ones there too, so each sensor's windows stay in order."""

    def __init__(self, capacity: int, key: Callable[[ItemT], str] | None = None) -> None:
        self.capacity = capacity
        self._key = key
        self._shares = KeyShares()
        self._lanes: tuple[deque[ItemT], deque[ItemT]] = (deque(), deque())
        self._behind: Counter[str] = Counter()  # each key's windows in the second lane
        self._size = 0
        lock = threading.Lock()
        self._not_full = threading.Condition(lock)
        self._not_empty = threading.Condition(lock)

    def offer(self, item: ItemT, wait_seconds: float = 0.0, behind: bool = False) -> bool:
        """Put, waiting up to `wait_seconds` for room; False when the queue stayed full."""
        key = None if self._key is None else self._key(item)
        if key is not None:  # counted before it can be taken, so a count is never below what is queued
            self._shares.add(key)
        with self._not_full:
            if self._size >= self.capacity and wait_seconds > 0:
                self._not_full.wait_for(lambda: self._size < self.capacity, wait_seconds)
            if self._size >= self.capacity:
                if key is not None:
                    self._shares.remove(key)
                return False
            lane = int(key is not None and (behind or self._behind[key] > 0))
            if lane and key is not None:
                self._behind[key] += 1
            self._lanes[lane].append(item)
            self._size += 1
            self._not_empty.notify()
        return True

    def queued_for(self, key: str) -> int:
        """Windows of `key` queued (or being put)."""
        return self._shares.count(key)

    def over_share(self, key: str, floor: int, keys: int) -> bool:
        """`key` holds at least `floor` windows and more than twice its fair share of the queue, the capacity divided
        by the `keys` (sensors) that may use it."""
        return self._shares.over_share(key, floor, self.capacity / max(keys, 1))

    def depth(self) -> int:
        with self._not_empty:
            return self._size

    def get(self, timeout_seconds: float) -> ItemT | None:
        taken = self.take(timeout_seconds)
        return None if taken is None else taken[0]

    def take(self, timeout_seconds: float, first_lane_only: bool = False) -> tuple[ItemT, int] | None:
        """The next window and its lane (0 first, 1 behind), waiting up to `timeout_seconds`; with
        `first_lane_only`, only a window of the first lane."""
        with self._not_empty:
            ready = (lambda: bool(self._lanes[0])) if first_lane_only else (lambda: self._size > 0)
            if not ready() and timeout_seconds > 0:
                self._not_empty.wait_for(ready, timeout_seconds)
            if not ready():
                return None
            lane = 0 if self._lanes[0] else 1
            item = self._lanes[lane].popleft()
            self._size -= 1
            if lane and self._key is not None:
                key = self._key(item)
                self._behind[key] -= 1
                if not self._behind[key]:
                    del self._behind[key]
            self._not_full.notify()
        if self._key is not None:
            self._shares.remove(self._key(item))
        return item, lane


class MicroBatcher(Generic[ItemT]):
    """Gathers windows from a `WindowQueue` into batches bounded by size and by waiting time.

    Windows put behind (their sensor holds more than its fair share) get at most `behind_share` of the scoring
    thread's time: after a batch of them, the next is taken only from the first lane for as long as that share asks.
    A flood then leaves the thread idle time, and the CPU and GIL it would take go to the other sensors' input. A
    batch begun in the second lane holds at most `behind_batch` windows, so the others' windows that arrive while it
    is scored wait for a short batch, not a full one."""

    def __init__(
        self,
        source: WindowQueue[ItemT],
        max_batch: int,
        max_wait_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        behind_share: float = 1.0,
        behind_batch: int | None = None,
    ) -> None:
        self.source = source
        self.max_batch = max_batch
        self.max_wait_seconds = max_wait_seconds
        self.clock = clock
        self.behind_share = behind_share
        self.behind_batch = max_batch if behind_batch is None else behind_batch
        self._behind_since: float | None = None  # when the last batch of windows put behind was handed out
        self._first_lane_until = 0.0

    def next_batch(self, stop: threading.Event, poll_seconds: float = 0.1) -> list[ItemT]:
        """The next batch; empty when `stop` is set and nothing is queued, or after `poll_seconds` idle. A batch that
        starts in the queue's first lane takes only from it, so the windows put behind do not slow it down."""
        wait, resting = poll_seconds, False
        if self._behind_since is not None or self._first_lane_until:
            now = self.clock()
            if self._behind_since is not None:  # that batch has been scored: rest from the second lane in proportion
                self._first_lane_until = now + (now - self._behind_since) * (1 / self.behind_share - 1)
                self._behind_since = None
            resting = now < self._first_lane_until and not stop.is_set()
            if resting:
                wait = min(poll_seconds, self._first_lane_until - now)
            else:
                self._first_lane_until = 0.0
        taken = self.source.take(wait, first_lane_only=resting)
        if taken is None:
            return []
        first, lane = taken
        batch = [first]
        deadline = first.completed_at + self.max_wait_seconds
        limit = self.max_batch if lane == 0 else min(self.max_batch, self.behind_batch)
        while len(batch) < limit:
            taken = self.source.take(0.0, first_lane_only=lane == 0)
            if taken is None:
                remaining = deadline - self.clock()
                if remaining <= 0 or stop.is_set():
                    break
                taken = self.source.take(remaining, first_lane_only=lane == 0)
                if taken is None:
                    break
            batch.append(taken[0])
        if lane:
            self._behind_since = self.clock()
        return batch
