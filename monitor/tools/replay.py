"""`monitor replay`: publish a recorded stream to the broker as live sensors would.

A UCR file's beats are dealt round-robin to N sensors and streamed back to back, so beat i is
window i // N of sensor i % N (with stride = window length). A continuous recording is streamed
as it is by each of the N sensors; with its annotation file (`sample,symbol`, WFDB codes) every sensor's
annotated beats are its labels, for `monitor watch` to score alerts by beat. Messages carry `seq`, `ts` and
`sample_rate_hz`, in chunks of `chunk` samples, paced at the sample rate times `speed` (0 = as fast as the broker
takes them).

Every input format can be sent: JSON objects, binary frames (float32) on the sensor topics, or Sparkplug B, where
the sensors are the devices `input.sparkplug.devices` maps: each edge node sends its NBIRTH, each device its
DBIRTH, then DDATA with the samples by alias and timestamp.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import MQTTErrorCode

from monitor.config.schema import InputFormat, MqttSettings, SparkplugDevice
from monitor.errors import DataError, MonitorError
from monitor.ingest.frame import FLOAT32, encode_frame
from monitor.ingest.sparkplug import EdgeNode
from monitor.mqtt.client import client_id_for, connect_side_client, make_client
from monitor.training.beat_data import MATCH_SECONDS, SCORED_CLASSES, aami_class, read_annotations
from monitor.training.datasets import (
    UCR_SUFFIXES,
    WindowSet,
    data_suffix,
    input_channel_names,
    read_samples,
    read_ucr,
)

log = structlog.get_logger("monitor.replay")
METADATA_FILE = "model.json"  # monitor.model.artifact's name for it; importing that module would load torch


@dataclass(frozen=True)
class ReplayPlan:
    """Per-sensor streams `[sensors][T, C]`; for UCR data the label of every (sensor, window), for an annotated
    recording its beats (sample index, WFDB symbol)."""

    streams: list[np.ndarray]
    sensor_ids: list[str]
    labels: dict[tuple[str, int], int]
    beats: tuple[np.ndarray, np.ndarray] | None = None


def sensor_topic(subscribe_filter: str, level: int, sensor_id: str) -> str:
    """The topic a sensor publishes on: the subscription filter with its `+` at `level` filled in."""
    levels = subscribe_filter.split("/")
    if level >= len(levels) or levels[level] != "+":
        raise MonitorError(f"mqtt.subscribe[0] {subscribe_filter!r} has no '+' at level {level} (mqtt.sensor_id_level)")
    levels[level] = sensor_id
    return "/".join(level_name.replace("+", "x").replace("#", "x") for level_name in levels)


def sensor_names(sensors: int, prefix: str = "sensor-") -> list[str]:
    return [f"{prefix}{index:04d}" for index in range(sensors)]


def plan_ucr(data: WindowSet, sensor_ids: list[str]) -> ReplayPlan:
    """Deal beats round-robin: beat i is window i // sensors of sensor i % sensors."""
    sensors = len(sensor_ids)
    window = data.window
    streams, labels = [], {}
    for index, sensor_id in enumerate(sensor_ids):
        beats = data.windows[index::sensors]
        streams.append(beats.reshape(-1, data.channels))
        if data.labels is not None:
            for position, label in enumerate(data.labels[index::sensors]):
                labels[(sensor_id, position * window)] = int(label)
    return ReplayPlan(streams, sensor_ids, labels)


def plan_recording(
    recording: np.ndarray, sensor_ids: list[str], beats: tuple[np.ndarray, np.ndarray] | None = None
) -> ReplayPlan:
    return ReplayPlan([recording] * len(sensor_ids), sensor_ids, {}, beats)


def load_plan(
    path: str | Path,
    sensors: int,
    sensor_ids: list[str] | None = None,
    annotations: str | Path | None = None,
    channel_names: Sequence[str] | None = None,
) -> ReplayPlan:
    """The plan for `sensors` sensors named sensor-0000..., or for the sensors named `sensor_ids`; a recording's
    `annotations` label its beats; a CSV header must name `channel_names`."""
    path = Path(path)
    if sensors < 1:
        raise DataError("--sensors must be at least 1")
    names = sensor_ids or sensor_names(sensors)
    if data_suffix(path) in UCR_SUFFIXES:
        if annotations is not None:
            raise DataError(f"{path}: UCR windows carry their labels; --annotations is for a continuous recording")
        return plan_ucr(read_ucr(path), names)
    samples = read_samples(path, channel_names)
    beats = None
    if annotations is not None:
        positions, symbols = read_annotations(annotations)
        if len(positions) and positions[-1] >= len(samples):
            raise DataError(f"{annotations}: sample {int(positions[-1])} is beyond the recording's {len(samples)}")
        beats = (positions, symbols)
    return plan_recording(samples, names, beats)


def model_channel_names(model_path: Path) -> tuple[str, ...] | None:
    """The input channel names the daemon's model recorded, read from its `model.json` without loading the model
    (replay runs where the model may not be); None when there is no readable model or it names none."""
    try:
        metadata = orjson.loads((model_path / METADATA_FILE).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return input_channel_names(metadata) if isinstance(metadata, dict) else None


def messages(plan: ReplayPlan, chunk: int) -> Iterator[tuple[int, str, int, np.ndarray]]:
    """(round, sensor id, seq, samples) in publishing order: every sensor's chunk r, then r + 1."""
    longest = max(len(stream) for stream in plan.streams)
    for round_index, start in enumerate(range(0, longest, chunk)):
        for sensor_id, stream in zip(plan.sensor_ids, plan.streams, strict=True):
            if start < len(stream):
                yield round_index, sensor_id, start, stream[start : start + chunk]


class Replayer:
    """Publishes a plan with QoS 1 and waits until the broker has acknowledged every message."""

    def __init__(
        self,
        settings: MqttSettings,
        topic_filter: str,
        sensor_id_level: int,
        qos: int = 1,
        input_format: InputFormat = "json",
        devices: Sequence[SparkplugDevice] = (),
    ) -> None:
        """`devices`: with Sparkplug B, the mapped devices the plan's sensors are (by sensor id)."""
        self.settings = settings
        self.topic_filter = topic_filter
        self.sensor_id_level = sensor_id_level
        self.qos = qos
        self.input_format = input_format
        self.devices = {device.sensor: device for device in devices}
        self.nodes = {(device.group, device.node): EdgeNode(device.group, device.node) for device in devices}
        self.connected = threading.Event()
        self.client = make_client(settings, client_id_for(settings, "replay"))
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.on_connect = lambda client, userdata, flags, code, props: (
            None if code.is_failure else self.connected.set()
        )

    def connect(self, timeout_seconds: float = 10.0) -> None:
        connect_side_client(self.client, self.settings, self.connected, timeout_seconds)

    def publish(self, plan: ReplayPlan, chunk: int, sample_rate_hz: float, speed: float) -> int:
        """Publish everything; returns the number of messages. speed 0 = as fast as possible. JSON messages say their
        `sample_rate_hz`, so a daemon configured for another rate refuses them instead of scoring them wrongly."""
        start_wall = time.time()
        start_clock = time.monotonic()
        infos = [self._send(topic, payload) for topic, payload in self._births(plan, start_wall)]
        topics = (
            {}
            if self.devices
            else {
                sensor_id: sensor_topic(self.topic_filter, self.sensor_id_level, sensor_id)
                for sensor_id in plan.sensor_ids
            }
        )
        for round_index, sensor_id, seq, samples in messages(plan, chunk):
            if speed > 0:
                due = start_clock + round_index * chunk / sample_rate_hz / speed
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            ts = start_wall + seq / sample_rate_hz
            if self.input_format == "sparkplug_b":
                device = self.devices[sensor_id]
                node = self.nodes[(device.group, device.node)]
                assert device.device is not None  # _births refused node-level mappings
                topic, payload = node.ddata(device.device, device.channels, samples, ts * 1000, 1000 / sample_rate_hz)
                infos.append(self._send(topic, payload))
            else:
                infos.append(
                    self._send(topics[sensor_id], encode_message(self.input_format, samples, seq, ts, sample_rate_hz))
                )
        for info in infos:
            info.wait_for_publish(timeout=60)
        return len(infos)

    def _births(self, plan: ReplayPlan, start_wall: float) -> list[tuple[str, bytes]]:
        """Sparkplug B: each edge node's NBIRTH, then each device's DBIRTH (nothing for the other formats)."""
        if self.input_format != "sparkplug_b":
            return []
        stamp = int(start_wall * 1000)
        births = [node.nbirth(stamp) for node in self.nodes.values()]
        for sensor_id in plan.sensor_ids:
            device = self.devices[sensor_id]
            if device.device is None:
                raise MonitorError(f"sensor {sensor_id}: replay sends device data (DDATA); map a device, not a node")
            births.append(self.nodes[(device.group, device.node)].dbirth(device.device, device.channels, stamp))
        return births

    def _send(self, topic: str, payload: bytes) -> mqtt.MQTTMessageInfo:
        info = self.client.publish(topic, payload, qos=self.qos)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise MonitorError(f"publish failed: {mqtt.error_string(info.rc)}")
        return info

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def encode_message(input_format: str, samples: np.ndarray, seq: int, ts: float, sample_rate_hz: float) -> bytes:
    """One sensor message of `samples` [n, C] as a JSON object (with its `sample_rate_hz`, so a daemon configured for
    another rate refuses it instead of scoring it wrongly) or a binary frame (float32)."""
    if input_format == "frame":
        return encode_frame(samples, seq, ts, FLOAT32)
    body = {
        "seq": seq,
        "ts": ts,
        "sample_rate_hz": sample_rate_hz,
        "samples": samples[:, 0].tolist() if samples.shape[1] == 1 else samples.tolist(),
    }
    return orjson.dumps(body)


def write_labels(plan: ReplayPlan, path: str | Path, sample_rate_hz: float) -> None:
    """Ground truth for the replayed windows or beats, one JSON object a line (written whole, then renamed).

    Windows: `{"sensor_id", "window_start_seq", "label"}` (the UCR class). Beats: first
    `{"beats": {"sample_rate_hz", "match_seconds", "samples"}}` (how `monitor watch` matches an alert's `beat_seq`
    to an annotated beat, and how many samples each sensor sends), then `{"sensor_id", "beat_seq", "symbol",
    "class"}` for every annotated beat of an AAMI class (N normal; S, V, F anomalous).
    """
    if plan.beats is None and not plan.labels:
        raise DataError("--labels-out: a recording has no labels of its own; give its --annotations (sample,symbol)")
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("wb") as handle:
        for (sensor_id, start_seq), label in sorted(plan.labels.items()):
            handle.write(orjson.dumps({"sensor_id": sensor_id, "window_start_seq": start_seq, "label": label}) + b"\n")
        if plan.beats is not None:
            header = {"sample_rate_hz": sample_rate_hz, "match_seconds": MATCH_SECONDS, "samples": len(plan.streams[0])}
            handle.write(orjson.dumps({"beats": header}) + b"\n")
            positions, symbols = plan.beats
            for sensor_id in plan.sensor_ids:
                for position, symbol in zip(positions.tolist(), symbols.tolist(), strict=True):
                    if aami_class(symbol) in SCORED_CLASSES:
                        record = {"sensor_id": sensor_id, "beat_seq": position, "symbol": symbol}
                        handle.write(orjson.dumps({**record, "class": aami_class(symbol)}) + b"\n")
    temporary.replace(path)
