"""The MQTT ingest alone: how many messages a second one process takes from Mosquitto, on one core.

A backlog of QoS 1 messages is queued by the broker for a persistent session while its client is
away; then the client connects and drains it as fast as it can. Two clients are timed:
- `paho`: bare paho-mqtt as the daemon configures it (MQTT 5, manual acknowledgements), doing nothing
  with a message but acknowledge it;
- `daemon`: the daemon's own ingest, `MqttConnection` + `Ingest` (decode, validate, window, queue the
  windows; nothing scores them), for each input format: JSON (`daemon`), binary frames (`daemon-frame`) and
  Sparkplug B (`daemon-sparkplug_b`: one edge node whose devices are the sensors; its backlog starts with their
  BIRTH messages, counted among the messages).
CPU seconds of the process per message is the floor of what one message costs the daemon's MQTT
thread: in the running daemon it only goes up (the scoring thread's share of the GIL, cold caches
after every wake-up).

A flood is drained too (`flood_payloads`): after one message from each of the 500 sensors, 4,096-sample messages
from one more, the largest the daemon takes by default. `daemon-flooded` is the daemon's ingest with its default
scoring queue and per-sensor bound: the flooding sensor soon holds more than its share of the queue, and its
further messages are dropped before they are decoded, as in the running daemon. `paho` drains the same messages.
"""

from __future__ import annotations

import functools
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from prometheus_client import CollectorRegistry

from bench.harness import WINDOW_SAMPLES as WINDOW
from monitor.config.schema import (
    BatchingSettings,
    InputSettings,
    MqttSettings,
    SparkplugDevice,
    SparkplugSettings,
    WindowingSettings,
)
from monitor.ingest.acks import InOrderAcks, PendingWindows, Receipt
from monitor.ingest.batching import WindowQueue
from monitor.ingest.formats import InputFormats
from monitor.ingest.frame import encode_frame
from monitor.ingest.payload import PayloadDecoder
from monitor.ingest.sparkplug import EdgeNode
from monitor.ingest.stage import Ingest
from monitor.ingest.windowing import WindowAssembler
from monitor.mqtt.connection import MqttConnection
from monitor.telemetry.log import configure_logging
from monitor.telemetry.metrics import Metrics
from monitor.training.datasets import read_ucr
from tests.support import Broker

TOPIC = "sensors/{sensor_id}/ecg"
GROUP, NODE, CHANNELS = "bench", "edge", ("ECG",)
FILTERS = ("sensors/+/ecg", f"spBv1.0/{GROUP}/#")
SENSORS = 500
FLOOD_SAMPLES = WindowingSettings().max_samples_per_message  # the largest message the daemon takes by default


def payloads(normal_data: Path, count: int, chunk: int, input_format: str = "json") -> list[tuple[str, bytes]]:
    """`count` messages of `chunk` samples, round-robin over SENSORS sensors, each sensor's seq contiguous (with
    Sparkplug B, the node's and its devices' births first, then `count` less as many DDATA messages)."""
    beats = read_ucr(normal_data).windows[:, :, 0].reshape(-1)
    node = EdgeNode(GROUP, NODE)
    births = [node.nbirth(0)] + [node.dbirth(f"s{s:04d}", CHANNELS, 0) for s in range(SENSORS)]
    out = births if input_format == "sparkplug_b" else []
    for index in range(count - len(out)):
        sensor, round_index = index % SENSORS, index // SENSORS
        start = (round_index * chunk + sensor * 997) % (len(beats) - chunk)
        values = np.round(beats[start : start + chunk].astype(np.float64), 4)
        seq, ts = round_index * chunk, 1.7e9 + round_index
        topic = TOPIC.format(sensor_id=f"s{sensor:04d}")
        if input_format == "sparkplug_b":
            out.append(node.ddata(f"s{sensor:04d}", CHANNELS, values, ts * 1000, 4.0))
        elif input_format == "frame":
            out.append((topic, encode_frame(values, seq, ts)))
        else:
            samples = orjson.dumps(values.tolist())
            out.append((topic, b'{"seq":%d,"ts":%.3f,"samples":%b}' % (seq, ts, samples)))
    return out


def flood_payloads(normal_data: Path, count: int) -> list[tuple[str, bytes]]:
    """`count` messages: one of 35 samples from each of SENSORS sensors, then the rest, of FLOOD_SAMPLES samples each,
    from one more sensor."""
    samples = orjson.dumps(np.round(np.sin(np.arange(FLOOD_SAMPLES) / 20.0), 4).tolist())
    flood = [
        (TOPIC.format(sensor_id="flood"), b'{"seq":%d,"samples":%b}' % (index * FLOOD_SAMPLES, samples))
        for index in range(count - SENSORS)
    ]
    return payloads(normal_data, SENSORS, 35) + flood


def queue_backlog(port: int, messages: list[tuple[str, bytes]]) -> None:
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-transport-pub", protocol=mqtt.MQTTv311)
    publisher.max_inflight_messages_set(0)
    publisher.max_queued_messages_set(0)
    publisher.connect("127.0.0.1", port)
    publisher.loop_start()
    infos = [publisher.publish(topic, payload, qos=1) for topic, payload in messages]
    infos[-1].wait_for_publish(120)
    publisher.disconnect()
    publisher.loop_stop()


class PahoClient:
    """Bare paho as the daemon configures it: MQTT 5, persistent session, manual acknowledgements."""

    def __init__(self, port: int, client_id: str, on_message: Callable[[], None]) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, manual_ack=True
        )
        self.client.on_connect = lambda client, userdata, flags, reason, props: client.subscribe(
            [(topic_filter, 1) for topic_filter in FILTERS]
        )
        self.client.on_message = lambda client, userdata, message: (on_message(), client.ack(message.mid, message.qos))
        self.port = port

    def start(self) -> None:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 3600
        self.client.connect_async("127.0.0.1", self.port, clean_start=False, properties=properties)
        self.client.loop_start()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def daemon_ingest(
    port: int, client_id: str, on_message: Callable[[], None], input_format: str = "json", shares: bool = False
) -> MqttConnection:
    """The daemon's MQTT connection feeding its `Ingest` (windows are queued, nothing scores them). With `shares`,
    the daemon's default scoring queue and per-sensor bound; without, a queue that never fills."""
    metrics = Metrics(CollectorRegistry(), 64, 1.0)
    assembler = WindowAssembler(WINDOW, WINDOW, 1, 10 * SENSORS, 3600.0)
    decoder = PayloadDecoder(1)
    devices = [
        SparkplugDevice(group=GROUP, node=NODE, device=f"s{s:04d}", channels=list(CHANNELS), sample_rate_hz=250.0)
        for s in range(SENSORS)
    ]
    settings_ = InputSettings(format=input_format, sparkplug=SparkplugSettings(devices=devices))
    formats = None if settings_.json_only else InputFormats(settings_, decoder)
    if shares:
        batching = BatchingSettings()
        queue: WindowQueue = WindowQueue(batching.queue_capacity, key=lambda window: window.sensor_id)
        bound: int | None = batching.max_queued_per_sensor
    else:
        queue, bound = WindowQueue(10**7), None
    ingest = Ingest(decoder, assembler, queue, metrics, 1, formats=formats, max_queued_per_sensor=bound)

    def handle(topic: str, payload: bytes, now: float, receipt: Receipt, redelivered: bool) -> None:
        ingest.handle(topic, payload, now, receipt, redelivered)
        connection.acknowledge()  # the earlier messages, as the daemon's main loop does (this one is released after)
        on_message()

    acks = InOrderAcks()
    settings = MqttSettings(port=port, client_id=client_id, subscribe=list(FILTERS))
    connection = MqttConnection(settings, handle, metrics, acks, PendingWindows(acks))
    return connection


CLIENTS: dict[str, Callable[[int, str, Callable[[], None]], PahoClient | MqttConnection]] = {
    "paho": PahoClient,
    "daemon": daemon_ingest,
    "daemon-frame": functools.partial(daemon_ingest, input_format="frame"),
    "daemon-sparkplug_b": functools.partial(daemon_ingest, input_format="sparkplug_b"),
    "daemon-flooded": functools.partial(daemon_ingest, shares=True),
}
FORMATS = {"paho": "json", "daemon": "json", "daemon-frame": "frame", "daemon-sparkplug_b": "sparkplug_b"}
FLOOD_CLIENTS = ("paho", "daemon-flooded")


def drain(kind: str, messages: list[tuple[str, bytes]], chunk: int, work: Path, timeout: float = 120.0) -> dict:
    """Wall and CPU seconds for one client to take the queued `messages` (of `chunk` samples each)."""
    count = len(messages)
    broker = Broker(work / f"mosquitto-{kind}-{chunk}").start()
    client_id = f"bench-transport-{kind}-{chunk}"
    received, done = [0], threading.Event()

    def counted() -> None:
        received[0] += 1
        if received[0] == count:
            done.set()

    try:
        first = CLIENTS[kind](broker.port, client_id, counted)  # creates the persistent session and its subscription
        first.start()
        time.sleep(1.0)
        first.close()
        queue_backlog(broker.port, messages)
        received[0] = 0
        client = CLIENTS[kind](broker.port, client_id, counted)
        cpu, wall = time.process_time(), time.perf_counter()
        client.start()
        finished = done.wait(timeout)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        client.close()
    finally:
        broker.stop()
    return {
        "client": kind,
        "chunk_samples": chunk,
        "messages": received[0],
        "complete": finished,
        "messages_per_second": received[0] / wall,
        "cpu_us_per_message": cpu * 1e6 / max(received[0], 1),
    }


def transport_rates(
    normal_data: Path, chunks: tuple[int, ...], count: int, repeats: int, flood_count: int
) -> list[dict]:
    """`drain` for every client and message size, then the flood (`flood_count` messages) for bare paho and the
    daemon's ingest with its queue bounds; the best (lowest-CPU) of `repeats` runs each."""
    configure_logging("error")  # the daemon's ingest logs its connections; the bench prints its own lines
    sets = [
        (kind, chunk, functools.partial(payloads, normal_data, count, chunk, FORMATS[kind]))
        for chunk in chunks
        for kind in FORMATS
    ]
    flood = functools.partial(flood_payloads, normal_data, flood_count)
    sets += [(kind, FLOOD_SAMPLES, flood) for kind in FLOOD_CLIENTS]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-transport-") as directory:
        for kind, chunk, make_messages in sets:
            messages = make_messages()
            runs = [drain(kind, messages, chunk, Path(directory) / f"run{index}") for index in range(repeats)]
            rows.append(min(runs, key=lambda run: run["cpu_us_per_message"]))
            print(f"    {rows[-1]}", flush=True)
    return rows
