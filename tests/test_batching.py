"""The micro-batcher: batches close at max_batch or at the first window's deadline, whichever first."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from monitor.batching import MicroBatcher, WindowQueue


@dataclass
class Item:
    completed_at: float
    name: int = 0


def test_queue_refuses_beyond_capacity():
    queue: WindowQueue[Item] = WindowQueue(3)
    assert [queue.offer(Item(0.0, i)) for i in range(5)] == [True, True, True, False, False]
    assert queue.depth() == 3


def test_batch_closes_at_max_batch_without_waiting():
    queue: WindowQueue[Item] = WindowQueue(100)
    now = time.monotonic()
    for i in range(10):
        queue.offer(Item(now, i))
    batcher = MicroBatcher(queue, max_batch=4, max_wait_seconds=0.5)
    started = time.monotonic()
    full = [batcher.next_batch(threading.Event()) for _ in range(2)]
    assert time.monotonic() - started < 0.25  # full batches do not wait for the deadline
    short = batcher.next_batch(threading.Event())
    assert [[item.name for item in batch] for batch in [*full, short]] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert time.monotonic() - started >= 0.45  # the short one waited for its first window's deadline


def test_batch_closes_at_the_deadline_of_its_first_window():
    queue: WindowQueue[Item] = WindowQueue(100)
    batcher = MicroBatcher(queue, max_batch=64, max_wait_seconds=0.2)
    queue.offer(Item(time.monotonic(), 1))

    def late_arrivals():
        time.sleep(0.05)
        queue.offer(Item(time.monotonic(), 2))  # within the deadline: joins the batch
        time.sleep(0.4)
        queue.offer(Item(time.monotonic(), 3))  # after it: the next batch

    feeder = threading.Thread(target=late_arrivals)
    feeder.start()
    started = time.monotonic()
    first = batcher.next_batch(threading.Event())
    waited = time.monotonic() - started
    assert [item.name for item in first] == [1, 2]
    assert 0.15 <= waited < 0.4
    second = batcher.next_batch(threading.Event(), poll_seconds=2.0)
    feeder.join()
    assert [item.name for item in second] == [3]


def test_a_backlog_is_batched_without_waiting_for_deadlines():
    queue: WindowQueue[Item] = WindowQueue(100)
    old = time.monotonic() - 10  # windows that have waited long already
    for i in range(5):
        queue.offer(Item(old, i))
    batcher = MicroBatcher(queue, max_batch=64, max_wait_seconds=5.0)
    started = time.monotonic()
    assert len(batcher.next_batch(threading.Event())) == 5
    assert time.monotonic() - started < 1.0


def test_stop_returns_what_is_queued_then_nothing():
    queue: WindowQueue[Item] = WindowQueue(100)
    queue.offer(Item(time.monotonic(), 1))
    stop = threading.Event()
    stop.set()
    batcher = MicroBatcher(queue, max_batch=64, max_wait_seconds=5.0)
    started = time.monotonic()
    assert [item.name for item in batcher.next_batch(stop)] == [1]
    assert batcher.next_batch(stop, poll_seconds=0.01) == []
    assert time.monotonic() - started < 1.0
