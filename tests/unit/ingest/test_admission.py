"""Admission to the scoring queue: a flooding sensor loses only its own excess, a full queue makes the input wait."""

from __future__ import annotations

import threading

import numpy as np
import orjson
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from monitor.ingest.batching import WindowQueue
from monitor.ingest.payload import PayloadDecoder
from monitor.ingest.stage import Ingest
from monitor.ingest.windowing import WindowAssembler
from monitor.telemetry.metrics import Metrics
from monitor.window import Window

W = 8


def make_ingest(capacity: int, share: int, wait: float) -> tuple[Ingest, WindowQueue[Window], CollectorRegistry]:
    registry = CollectorRegistry()
    queue: WindowQueue[Window] = WindowQueue(capacity, key=lambda window: window.sensor_id)
    ingest = Ingest(
        PayloadDecoder(1, 64, 4096),
        WindowAssembler(W, W, 1, 100, 60.0),
        queue,
        Metrics(registry, 4, 1.0),
        1,
        max_queued_per_sensor=share,
        admission_wait_seconds=wait,
    )
    return ingest, queue, registry


def send(ingest: Ingest, sensor_id: str, seq: int, windows: int) -> None:
    samples = np.zeros(W * windows).tolist()
    ingest.handle(f"sensors/{sensor_id}/ecg", orjson.dumps({"seq": seq, "samples": samples}), 0.0)


def dropped(registry: CollectorRegistry, reason: str) -> float | None:
    return registry.get_sample_value("monitor_windows_dropped_total", {"reason": reason})


def test_a_flooding_sensor_loses_its_own_excess_and_is_named():
    """Eleven sensors share a queue of 32: a fair share is 2.9 windows; at least 4 (the floor) and more than twice
    the fair share (5.8) is a flood."""
    ingest, queue, registry = make_ingest(capacity=32, share=4, wait=0.0)
    with capture_logs() as logs:
        for index in range(10):
            send(ingest, f"calm{index}", 0, 1)
        send(ingest, "flood", 0, 7)  # one message, seven windows: one beyond its share
        send(ingest, "flood", 7 * W, 7)
        for index in range(10):
            send(ingest, f"calm{index}", W, 1)
    assert queue.queued_for("flood") == 6 and all(queue.queued_for(f"calm{i}") == 2 for i in range(10))
    assert dropped(registry, "sensor_share") == 1 and dropped(registry, "queue_full") == 0
    # the second message is dropped before it is decoded: the flooder has its share queued
    assert registry.get_sample_value("monitor_messages_received_total", {"outcome": "sensor_share"}) == 1
    lines = [entry for entry in logs if entry["event"] == "sensor_over_share"]
    assert [(line["sensor_id"], line["windows_dropped"]) for line in lines] == [("flood", 1)]  # rate-limited
    messages = [entry for entry in logs if entry["event"] == "message_dropped"]
    assert [(line["sensor_id"], line["reason"]) for line in messages] == [("flood", "sensor_share")]


def test_a_backlog_of_many_sensors_fills_the_queue_evenly_and_nobody_is_dropped():
    """A broker delivering a backlog: every sensor over the floor, none far above the others: no sensor_share drop."""
    ingest, queue, registry = make_ingest(capacity=40, share=2, wait=0.0)
    for round_ in range(4):
        for index in range(10):
            send(ingest, f"s{index}", round_ * W, 1)
    assert queue.depth() == 40 and dropped(registry, "sensor_share") == 0


def lanes(queue: WindowQueue[Window]) -> dict[str, list[int]]:
    """Take every queued window: each sensor's lanes in the order taken (0 first, 1 put behind)."""
    taken: dict[str, list[int]] = {}
    while (item := queue.take(0.0)) is not None:
        taken.setdefault(item[0].sensor_id, []).append(item[1])
    return taken


def test_a_sensor_is_put_behind_only_over_its_fair_share_and_the_floor():
    """20 sensors share a queue of 40 (a fair share of 2): a sensor with three windows queued is over it. With
    max_queued_per_sensor 64 (a floor of 16) a backlog of a few windows a sensor stays in the first lane, so the
    scoring thread never rests from it; with 8 (a floor of 2) its fourth window is put behind."""
    for share, fourth_lane in ((64, 0), (8, 1)):
        ingest, queue, _ = make_ingest(capacity=40, share=share, wait=0.0)
        for index in range(20):
            send(ingest, f"s{index:02d}", 0, 1)
        send(ingest, "s00", W, 3)
        assert lanes(queue) == {"s00": [0, 0, 0, fourth_lane], **{f"s{index:02d}": [0] for index in range(1, 20)}}


def test_a_sensor_flooding_while_the_others_have_nothing_queued_is_cut_at_its_share():
    """The others' windows are scored as they come, so the flooder is alone in the queue: still over its share of it
    (the queue's room divided by the active sensors), so the input never waits for it."""
    ingest, queue, registry = make_ingest(capacity=64, share=4, wait=5.0)
    for index in range(15):
        send(ingest, f"calm{index}", 0, 1)
        queue.get(0.0)
    for message in range(3):
        send(ingest, "flood", message * 7 * W, 7)
    assert queue.queued_for("flood") == 9  # 64 / 16 sensors = 4 a fair share; more than twice that is a flood
    assert dropped(registry, "sensor_share") == 5 and registry.get_sample_value("monitor_input_waits_total") == 0
    assert registry.get_sample_value("monitor_messages_received_total", {"outcome": "sensor_share"}) == 1


def test_a_full_queue_makes_the_input_wait_for_room_instead_of_dropping():
    ingest, queue, registry = make_ingest(capacity=4, share=4, wait=5.0)
    for index in range(4):
        send(ingest, f"s{index}", 0, 1)
    taker = threading.Timer(0.3, lambda: queue.get(0.0))  # the scorer takes a window while the input waits
    taker.start()
    send(ingest, "late", 0, 1)
    taker.join()
    assert queue.queued_for("late") == 1 and dropped(registry, "queue_full") == 0
    assert registry.get_sample_value("monitor_input_waits_total") == 1
    assert registry.get_sample_value("monitor_input_wait_seconds_total") >= 0.2
    ingest.admission_wait_seconds = 0.1  # nothing takes a window now: the wait is bounded, then the drop counted
    send(ingest, "later", 0, 1)
    assert dropped(registry, "queue_full") == 1
