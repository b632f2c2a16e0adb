"""The micro-batcher: batches close at max_batch or at the first window's deadline, whichever first."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from monitor.ingest.batching import MicroBatcher, WindowQueue


@dataclass
class Item:
    completed_at: float
    name: int = 0


def test_queue_refuses_beyond_capacity():
    queue: WindowQueue[Item] = WindowQueue(3)
    assert [queue.offer(Item(0.0, i)) for i in range(5)] == [True, True, True, False, False]
    assert queue.depth() == 3


class Clock:
    """An injectable clock: returns `now`, counts its calls, and runs `on_call` (an arrival while the batcher waits)."""

    def __init__(self, now: float, on_call: Callable[[int], float | None] | None = None) -> None:
        self.now = now
        self.calls = 0
        self.on_call = on_call

    def __call__(self) -> float:
        self.calls += 1
        if self.on_call is not None:
            moved = self.on_call(self.calls)
            if moved is not None:
                self.now = moved
        return self.now


def test_batch_closes_at_max_batch_without_waiting():
    queue: WindowQueue[Item] = WindowQueue(100)
    for i in range(10):
        queue.offer(Item(100.0, i))
    clock = Clock(100.0)
    batcher = MicroBatcher(queue, max_batch=4, max_wait_seconds=3600.0, clock=clock)
    full = [batcher.next_batch(threading.Event()) for _ in range(2)]
    assert clock.calls == 0  # full batches never look at the deadline
    clock.now = 100.0 + 3600.0  # the first window's deadline has come
    short = batcher.next_batch(threading.Event())
    assert [[item.name for item in batch] for batch in [*full, short]] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_batch_closes_at_the_deadline_of_its_first_window():
    queue: WindowQueue[Item] = WindowQueue(100)
    queue.offer(Item(100.0, 1))

    def arrivals(call: int) -> float | None:
        if call == 1:
            queue.offer(Item(100.05, 2))  # arrives while the batcher waits, within the deadline: joins the batch
            return 100.05
        if call == 2:
            queue.offer(Item(100.25, 3))  # arrives after the deadline (100.2): the next batch
            return 100.25
        return None

    batcher = MicroBatcher(queue, max_batch=64, max_wait_seconds=0.2, clock=Clock(100.0, arrivals))
    assert [item.name for item in batcher.next_batch(threading.Event())] == [1, 2]
    assert [item.name for item in batcher.next_batch(threading.Event())] == [3]


def test_a_backlog_is_batched_without_waiting_for_deadlines():
    queue: WindowQueue[Item] = WindowQueue(100)
    for i in range(5):
        queue.offer(Item(90.0, i))  # windows that have waited long already
    clock = Clock(100.0)
    batcher = MicroBatcher(queue, max_batch=64, max_wait_seconds=5.0, clock=clock)
    assert [item.name for item in batcher.next_batch(threading.Event())] == [0, 1, 2, 3, 4]
    assert clock.calls == 1  # one look at the clock: the deadline has passed, nothing more is awaited


def test_stop_returns_what_is_queued_then_nothing():
    queue: WindowQueue[Item] = WindowQueue(100)
    queue.offer(Item(100.0, 1))
    stop = threading.Event()
    stop.set()
    batcher = MicroBatcher(queue, max_batch=64, max_wait_seconds=3600.0, clock=Clock(100.0))
    assert [item.name for item in batcher.next_batch(stop)] == [1]  # stopping: no waiting for the deadline
    assert batcher.next_batch(stop, poll_seconds=0.01) == []


def test_queue_counts_windows_by_key_and_waits_for_room():
    queue: WindowQueue[Item] = WindowQueue(2, key=lambda item: f"s{item.name % 2}")
    assert queue.offer(Item(0.0, 0)) and queue.offer(Item(0.0, 2)) and not queue.offer(Item(0.0, 1))
    assert (queue.queued_for("s0"), queue.queued_for("s1")) == (2, 0)  # the refused one is not counted
    threading.Timer(0.2, lambda: queue.get(0.0)).start()  # the scorer takes one while the input waits
    assert queue.offer(Item(0.0, 1), wait_seconds=5.0)
    assert (queue.queued_for("s0"), queue.queued_for("s1"), queue.depth()) == (1, 1, 2)


def test_windows_put_behind_wait_for_the_others_and_each_key_stays_in_order():
    queue: WindowQueue[Item] = WindowQueue(10, key=lambda item: "flood" if item.name < 100 else "calm")
    assert queue.offer(Item(0.0, 0))  # the flooder's first window, within its share
    assert queue.offer(Item(0.0, 1), behind=True) and queue.offer(Item(0.0, 2), behind=True)
    assert queue.offer(Item(0.0, 3))  # not asked to wait, but its earlier windows are behind: it follows them
    assert queue.offer(Item(0.0, 100)) and queue.offer(Item(0.0, 101))
    taken = [item.name for item in iter(lambda: queue.get(0.0), None)]
    assert taken == [0, 100, 101, 1, 2, 3]
    assert queue.offer(Item(0.0, 4)) and queue.get(0.0).name == 4  # nothing behind any more: the first lane again


def test_a_batch_that_starts_in_the_first_lane_leaves_the_windows_put_behind_for_the_next():
    queue: WindowQueue[Item] = WindowQueue(10, key=lambda item: "flood" if item.name < 100 else "calm")
    for name in range(3):
        assert queue.offer(Item(0.0, name), behind=True)
    assert queue.offer(Item(0.0, 100)) and queue.offer(Item(0.0, 101))
    batcher = MicroBatcher(queue, max_batch=64, max_wait_seconds=0.0)
    assert [item.name for item in batcher.next_batch(threading.Event())] == [100, 101]
    assert [item.name for item in batcher.next_batch(threading.Event())] == [0, 1, 2]


def test_a_batch_begun_behind_holds_at_most_behind_batch_windows():
    """A flooder's 10 windows put behind are scored 3 at a time, not 64: a window of another sensor arriving while one
    of those batches is scored waits for 3 windows, not for the other 7; the others' batches stay up to max_batch."""
    queue: WindowQueue[Item] = WindowQueue(20, key=lambda item: "flood" if item.name < 100 else "calm")
    for name in range(10):
        assert queue.offer(Item(0.0, name), behind=True)
    batcher = MicroBatcher(queue, max_batch=64, max_wait_seconds=0.0, behind_batch=3)
    assert [item.name for item in batcher.next_batch(threading.Event())] == [0, 1, 2]
    assert queue.offer(Item(0.0, 100))
    assert [item.name for item in batcher.next_batch(threading.Event())] == [100]
    assert [item.name for item in batcher.next_batch(threading.Event())] == [3, 4, 5]
    assert queue.offer(Item(0.0, 101)) and queue.offer(Item(0.0, 102))
    assert queue.offer(Item(0.0, 103)) and queue.offer(Item(0.0, 104))
    assert [item.name for item in batcher.next_batch(threading.Event())] == [101, 102, 103, 104]  # more than 3: uncut


def test_windows_put_behind_get_at_most_their_share_of_the_scoring_time():
    """After a batch of windows put behind took 2 s to score, a share of 0.25 keeps the next 6 s for the first lane:
    a window put behind waits (an empty batch), a first-lane window is taken at once, then the second lane again."""
    now = [0.0]
    queue: WindowQueue[Item] = WindowQueue(10, key=lambda item: "flood" if item.name < 100 else "calm")
    batcher = MicroBatcher(queue, max_batch=2, max_wait_seconds=0.0, clock=lambda: now[0], behind_share=0.25)
    for name in range(4):
        assert queue.offer(Item(0.0, name), behind=True)
    assert [item.name for item in batcher.next_batch(threading.Event())] == [0, 1]
    now[0] = 2.0  # scored in 2 s
    assert batcher.next_batch(threading.Event(), poll_seconds=0.01) == []
    assert queue.offer(Item(0.0, 100))
    assert [item.name for item in batcher.next_batch(threading.Event(), poll_seconds=0.01)] == [100]
    now[0] = 7.9
    assert batcher.next_batch(threading.Event(), poll_seconds=0.01) == []
    now[0] = 8.0
    assert [item.name for item in batcher.next_batch(threading.Event(), poll_seconds=0.01)] == [2, 3]


def test_without_a_share_the_windows_put_behind_are_scored_whenever_the_first_lane_is_empty():
    now = [0.0]
    queue: WindowQueue[Item] = WindowQueue(10, key=lambda item: "flood")
    batcher = MicroBatcher(queue, max_batch=1, max_wait_seconds=0.0, clock=lambda: now[0])
    for name in range(2):
        assert queue.offer(Item(0.0, name), behind=True)
    assert [item.name for item in batcher.next_batch(threading.Event())] == [0]
    now[0] = 5.0
    assert [item.name for item in batcher.next_batch(threading.Event())] == [1]
