"""Bursts and floods against real processes: a backlog is held at the broker and scored in full, a flooding sensor
loses only its own excess and the others keep their latency.

Real Mosquitto, the daemon as a child process with the bundled model, paho sensors. Each test prints the figures
RELIABILITY.md quotes (`pytest -s | grep FIGURE`).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from contextlib import suppress
from ctypes import c_longlong
from multiprocessing.synchronize import Event as ProcessEvent

import numpy as np
import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from tests.e2e.test_faults import figure
from tests.e2e.test_journal_faults import START_SECONDS
from tests.support import SPLITS, WINDOW, alert_all_model, daemon_config, metric, wait_until
from tests.support import Sensors as OrderedSensors

pytestmark = pytest.mark.slow

DROP_REASONS = ("seq_gap", "seq_restart", "queue_full", "sensor_share", "scoring_error", "non_finite_score")


def dropped(samples: dict) -> dict[str, float]:
    return {reason: metric(samples, "monitor_windows_dropped_total", reason=reason) for reason in DROP_REASONS}


def test_a_backlog_burst_waits_at_the_broker_and_is_scored_in_full(broker_factory, daemon_factory, tmp_path):
    """The ECG5000 test split four times over, one window a message, 50 sensors, published as fast as the broker takes
    them (as a broker delivers a persistent session's backlog): with the default queue (4,096) the daemon is behind,
    its input waits (counted) instead of being dropped, and every window is scored."""
    broker = broker_factory().start()
    daemon = daemon_factory(daemon_config(tmp_path / "m.yaml", broker.port), ready=False)
    daemon.wait_for_event("ready", timeout=START_SECONDS)
    beats = np.loadtxt(SPLITS / "test.txt.xz", dtype=np.float32, ndmin=2)[:, 1:]
    windows = np.concatenate([beats] * 4)
    sensors = OrderedSensors(broker.port, inflight=1000)
    try:
        started = time.monotonic()
        for index, window in enumerate(windows):
            sensors.send(f"b{index % 50:02d}", (index // 50) * WINDOW, window)
        wait_until(sensors.all_acknowledged, 120, what="the broker to take the burst")
        published = time.monotonic() - started
        scored = lambda: metric(daemon.scrape(), "monitor_windows_scored_total")  # noqa: E731
        wait_until(lambda: scored() >= len(windows), 300, what="every window scored")
        elapsed = time.monotonic() - started
        samples = daemon.scrape()
    finally:
        sensors.close()
    assert metric(samples, "monitor_windows_scored_total") == len(windows)
    assert sum(dropped(samples).values()) == 0
    waits = metric(samples, "monitor_input_waits_total")
    waited = metric(samples, "monitor_input_wait_seconds_total")
    figure(
        "backlog_burst",
        "windows / scored / dropped / published in / all scored after / input waits (seconds waited)",
        f"{len(windows)} / {len(windows)} / 0 / {published:.1f} s / {elapsed:.1f} s / {waits:.0f} ({waited:.1f} s)",
    )


def flood(port: int, sensor_id: str, halt: ProcessEvent, sent: c_longlong) -> None:
    """One sensor sending 4,096-sample messages as fast as the broker acknowledges them (20 in flight): thousands of
    times a 250 Hz sensor's samples, and far more windows than one scoring thread takes. Run in a process of its own
    at the lowest priority, standing in for a device elsewhere: in the test's process it would hold the GIL the
    latency measurement needs, and at equal priority its own CPU would be taken from the daemon's machine."""
    os.nice(19)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"flooder-{time.time_ns()}")
    client.max_inflight_messages_set(20)
    client.max_queued_messages_set(20)
    client.connect("127.0.0.1", port)
    client.loop_start()
    samples = np.sin(np.arange(4096) / 20.0).round(4).tolist()
    while not halt.is_set():
        payload = orjson.dumps({"seq": sent.value * 4096, "samples": samples})
        if client.publish(f"sensors/{sensor_id}/ecg", payload, qos=1).rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            sent.value += 1
        else:
            time.sleep(0.001)  # 20 in flight and 20 queued: wait for the broker's acknowledgements
    client.disconnect()
    client.loop_stop()


class Flooder:
    """`flood` in a child process, started and stopped by the test; `sent` counts its messages."""

    def __init__(self, port: int, sensor_id: str) -> None:
        context = multiprocessing.get_context("spawn")
        self.halt = context.Event()
        self._sent = context.Value("q", 0, lock=False)
        self.process = context.Process(target=flood, args=(port, sensor_id, self.halt, self._sent), daemon=True)

    @property
    def sent(self) -> int:
        return int(self._sent.value)

    def start(self) -> None:
        self.process.start()

    def stop(self) -> None:
        self.halt.set()
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()


class AlertTimes:
    """When each alert arrived (monotonic), by (sensor_id, window_start_seq)."""

    def __init__(self, port: int) -> None:
        self.arrived: dict[tuple[str, int], float] = {}
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"alert-times-{time.time_ns()}")
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.on_connect = lambda client, *args: client.subscribe("alerts/#", qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert subscribed.wait(10)

    def _on_message(self, client, userdata, message) -> None:
        alert = orjson.loads(message.payload)
        with self.lock:
            self.arrived.setdefault((alert["sensor_id"], alert["window_start_seq"]), time.monotonic())

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def stream_calm(sensors: OrderedSensors, ids: list[str], seconds: float, first: int) -> dict[tuple[str, int], float]:
    """Every sensor at 250 Hz in 35-sample messages (one round every 0.14 s) for whole windows; returns when the last
    message of each window was sent, by (sensor_id, window_start_seq)."""
    data = np.sin(np.arange(WINDOW) * 2 * np.pi / WINDOW).astype(np.float32)
    sent: dict[tuple[str, int], float] = {}
    due = time.monotonic()
    rounds = int(seconds / 0.14) // 4 * 4
    for round_ in range(rounds):
        seq = first + round_ * 35
        for sensor_id in ids:
            sensors.send(sensor_id, seq, data[seq % WINDOW : seq % WINDOW + 35])
        if round_ % 4 == 3:
            now = time.monotonic()
            sent.update({(sensor_id, seq - 105): now for sensor_id in ids})
        due += 0.14
        time.sleep(max(0.0, due - time.monotonic()))
    return sent


def p99(sent: dict[tuple[str, int], float], alerts: AlertTimes) -> tuple[float, int]:
    """99th percentile of send-to-alert latency, and how many of the windows have no alert."""
    with alerts.lock:
        latencies = [alerts.arrived[key] - at for key, at in sent.items() if key in alerts.arrived]
    return float(np.percentile(latencies, 99)) if latencies else float("inf"), len(sent) - len(latencies)


def test_a_flooding_sensor_loses_only_its_own_excess(broker_factory, daemon_factory, tmp_path):
    """100 sensors at 250 Hz (35-sample messages), then the same with one more sensor sending 4,096-sample messages
    at broker speed: the 100 lose no window and every one of their alerts arrives; the flooder's excess is dropped
    as `sensor_share`, logged by its name, and their latency stays near its baseline. (Its alerts once filled the
    alert queue while their acknowledgements waited behind its input on the one connection: alerts have a connection
    of their own now. Its windows once filled the scoring queue whenever the others had nothing queued, and the input
    waited for room: its share is now of the queue's room, not of what the others have queued.)"""
    broker = broker_factory().start()
    model = alert_all_model(tmp_path)
    daemon = daemon_factory(daemon_config(tmp_path / "m.yaml", broker.port, model=model), ready=False)
    daemon.wait_for_event("ready", timeout=START_SECONDS)
    alerts = AlertTimes(broker.port)
    sensors = OrderedSensors(broker.port, inflight=1000)
    ids = [f"calm{index:03d}" for index in range(100)]
    flooder = Flooder(broker.port, "flood")
    try:
        warm_up = stream_calm(sensors, ids, 2, 0)  # the daemon's first batches (tracing, first alerts) not measured
        wait_until(lambda: p99(warm_up, alerts)[1] == 0, 60, what="the warm-up's alerts")
        baseline_sent = stream_calm(sensors, ids, 8, len(warm_up) // len(ids) * WINDOW)
        wait_until(lambda: p99(baseline_sent, alerts)[1] == 0, 60, what="the baseline's alerts")
        flooder.start()
        flood_sent = stream_calm(sensors, ids, 16, (len(warm_up) + len(baseline_sent)) // len(ids) * WINDOW)
        flooder.stop()
        with suppress(AssertionError):  # asserted below, with the figures
            wait_until(lambda: p99(flood_sent, alerts)[1] == 0, 120, what="the calm sensors' alerts during the flood")
        samples = daemon.scrape()
    finally:
        flooder.halt.set()
        sensors.close()
        alerts.close()
    baseline, _ = p99(baseline_sent, alerts)
    flooded, lost = p99(flood_sent, alerts)
    drops = dropped(samples)
    named = daemon.events("sensor_over_share") + [
        event for event in daemon.events("message_dropped") if event["reason"] == "sensor_share"
    ]
    messages_dropped = metric(samples, "monitor_messages_received_total", outcome="sensor_share")
    figure(
        "flood",
        "calm windows lost / p99 send-to-alert baseline, flooded / flooder messages / its messages, windows dropped",
        f"{lost} of {len(flood_sent)} / {baseline * 1000:.0f} ms, {flooded * 1000:.0f} ms / {flooder.sent} / "
        f"{messages_dropped:.0f}, {drops['sensor_share']:.0f} ({len(named)} log lines); all window drops {drops}",
    )
    assert lost == 0 and drops["queue_full"] == 0 and messages_dropped > 0, drops
    assert named and {event["sensor_id"] for event in named} == {"flood"}
    # The aim is 2x; the second alone on this shared machine (broker, flooder and sensors on its 2 cores). Before
    # the flooder was cut at its share of the queue while the others had nothing queued, it was 20-30 s.
    assert flooded <= 2 * baseline + 1.0, (baseline, flooded)


def test_a_daemon_down_for_a_minute_while_100_sensors_stream_misses_no_window(broker_factory, daemon_factory, tmp_path):
    """100 sensors at 250 Hz; the daemon is stopped (SIGTERM, partial windows to the state file) 5 s in and started
    again 60 s later, the sensors streaming throughout: its persistent session held the minute's input at the broker,
    and every window of every sensor gets its alert, none dropped."""
    broker = broker_factory().start()
    model = alert_all_model(tmp_path)
    config = daemon_config(
        tmp_path / "m.yaml", broker.port, model=model, windowing={"state_file": str(tmp_path / "windows.json")}
    )
    first = daemon_factory(config, ready=False)
    first.wait_for_event("ready", timeout=START_SECONDS)
    alerts = AlertTimes(broker.port)
    sensors = OrderedSensors(broker.port, inflight=1000)
    ids = [f"s{index:03d}" for index in range(100)]
    sent: dict[tuple[str, int], float] = {}
    streamer = threading.Thread(target=lambda: sent.update(stream_calm(sensors, ids, 75, 0)), daemon=True)
    try:
        streamer.start()
        time.sleep(5)
        first_dropped = dropped(first.scrape())
        assert first.stop() == 0
        stopped = time.monotonic()
        time.sleep(60)
        second = daemon_factory(config, ready=False)
        second.wait_for_event("ready", timeout=START_SECONDS)
        restarted = time.monotonic() - stopped
        streamer.join(60)
        wait_until(lambda: p99(sent, alerts)[1] == 0, 180, what="every window's alert")
        caught_up = time.monotonic() - stopped
        second_dropped = dropped(second.scrape())
    finally:
        sensors.close()
        alerts.close()
    _, missing = p99(sent, alerts)
    figure(
        "restart_after_a_minute",
        "windows / without an alert / dropped (first, second run) / down for / all alerts in after the stop",
        f"{len(sent)} / {missing} / {sum(first_dropped.values()):.0f}, {sum(second_dropped.values()):.0f} / "
        f"{restarted:.0f} s / {caught_up:.0f} s",
    )
    assert missing == 0 and sum(first_dropped.values()) == sum(second_dropped.values()) == 0
    assert second.events("window_state_restored")[0]["sensors"] == len(ids)
