"""Sparkplug B input: an edge node's BIRTH, DATA and DEATH messages -> a mapped sensor's samples and stream ends.

Topics are `spBv1.0/<group>/<type>/<edge node>[/<device>]`. `input.sparkplug.devices` maps a node (its own
metrics, NBIRTH/NDATA/NDEATH) or one of its devices (DBIRTH/DDATA/DDEATH) to a sensor id, names the metrics that
are its channels, in order, and gives their nominal sample rate. Messages of devices not mapped are ignored, and
no state is kept for a node none of whose devices is mapped (memory is bounded by the mapping).

- BIRTH: defines the device's metrics; the channels' aliases are taken from it. A channel missing from it, or
  not numeric, refuses it (`bad_samples`). A BIRTH for a live device (a rebirth) keeps its stream going.
- DATA: the channel metrics (by alias, or by name) become rows of samples, one row per metric timestamp, oldest
  first; every row needs a value for every channel (`wrong_channels`). Other metrics are ignored. DATA before a
  BIRTH (`no_birth`) or with an alias no BIRTH defined (`unknown_alias`) is refused and, with
  `input.sparkplug.rebirth`, a rebirth is requested from the node (NCMD `Node Control/Rebirth`), at most once a
  `rebirth_interval_seconds` per node.
- Sequence: every message of a node carries the node's seq (0-255, wrapping; NBIRTH starts it at 0). A skipped
  number means a lost message: the next DATA of each of the node's devices then starts after a gap (its size from
  the timestamps, at least one sample), so the windowing breaks the windows across it as for a JSON `seq` gap.
- DEATH: DDEATH ends the device's stream, NDEATH those of all the node's devices (an NDEATH whose bdSeq is not
  the one of the node's last NBIRTH is a stale will and ignored). The stage drops the partial windows and the
  episode stage resolves the sensor's open episode (reason `stream_ended`).

Sample seq numbers (the windowing's `seq`) count the samples of a device since its BIRTH; `ts` is the first
row's timestamp. Not thread-safe: used on paho's network thread only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog
from google.protobuf.message import DecodeError

from monitor.errors import PayloadError
from monitor.ingest import sparkplug_schema as schema
from monitor.ingest.payload import Message, checked_samples

log = structlog.get_logger("monitor.sparkplug")

NAMESPACE = "spBv1.0"
REBIRTH_METRIC = "Node Control/Rebirth"
BD_SEQ_METRIC = "bdSeq"
SEQ_MODULO = 256
SPARKPLUG_ONLY_REASONS = ("invalid_protobuf", "no_birth", "unknown_alias", "bad_ts")  # of REJECT_REASONS
_MESSAGE_TYPES = frozenset(("NBIRTH", "DBIRTH", "NDATA", "DDATA", "NDEATH", "DDEATH", "NCMD", "DCMD"))
_INTEGER_VALUES = frozenset(("int_value", "long_value"))
_FLOAT_VALUES = frozenset(("float_value", "double_value"))

Publish = Callable[[str, bytes], None]  # topic, payload: sends a command to an edge node


@dataclass(frozen=True)
class DeviceMapping:
    """A node or device that is a sensor: its channels (metric names, in order) and their nominal rate."""

    group: str
    node: str
    device: str | None
    sensor_id: str
    channels: tuple[str, ...]
    sample_rate_hz: float


@dataclass
class SparkplugOutcome:
    """What one message did: samples for a sensor, or streams ended (DEATH), or nothing (other control)."""

    sensor_id: str | None = None
    message: Message | None = None
    ended: list[str] = field(default_factory=list)


@dataclass
class _Device:
    mapping: DeviceMapping
    aliases: dict[int, int]  # channel metrics' alias -> channel index
    known_aliases: frozenset[int]  # every alias the BIRTH defined
    signed_bits: tuple[int, ...]  # per channel: two's complement width of a signed integer type, else 0
    next_seq: int = 0  # windowing seq of the next sample
    next_ts_ms: float | None = None  # expected timestamp of the next sample
    after_gap: bool = False  # the node lost a message since this device's last DATA


@dataclass
class _Node:
    expected_seq: int | None = None
    bd_seq: int | None = None
    devices: dict[str | None, _Device] = field(default_factory=dict)  # mapped and born; None: the node itself
    rebirth_requested_at: float = -math.inf


class SparkplugReader:
    """Reads Sparkplug B messages for the mapped devices (see the module docstring)."""

    def __init__(
        self,
        mappings: Sequence[DeviceMapping],
        channels: int,
        max_samples: int,
        max_bytes: int,
        max_abs_value: float,
        rebirth: bool = False,
        rebirth_interval_seconds: float = 10.0,
    ) -> None:
        wrong = [m.sensor_id for m in mappings if len(m.channels) != channels]
        if wrong:
            raise ValueError(f"sensors {wrong} do not have the model's {channels} channels")
        self.mappings = {(m.group, m.node, m.device): m for m in mappings}
        self._mapped_nodes = {(m.group, m.node) for m in mappings}  # state is kept for these nodes only
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.max_abs_value = max_abs_value
        self.rebirth = rebirth
        self.rebirth_interval_seconds = rebirth_interval_seconds
        self.publish: Publish | None = None  # set once the broker connection exists
        self.rebirths_requested = 0
        self._nodes: dict[tuple[str, str], _Node] = {}

    def read(self, topic: str, payload: bytes, now: float) -> SparkplugOutcome:
        """Handle one message; raises `PayloadError` for one that is refused (after any rebirth request)."""
        group, kind, node_name, device_name = _parse_topic(topic)
        if kind is None or kind.endswith("CMD") or (group, node_name) not in self._mapped_nodes:
            return SparkplugOutcome()  # host STATE, commands and other nodes carry no samples of a sensor
        if len(payload) > self.max_bytes:
            raise PayloadError("too_large", f"{len(payload)} bytes > {self.max_bytes}")
        try:
            decoded = schema.Payload.FromString(payload)
        except (DecodeError, RuntimeWarning, ValueError) as error:
            raise PayloadError("invalid_protobuf", str(error)) from None
        node = self._nodes.setdefault((group, node_name), _Node())
        if kind == "NDEATH":
            return self._node_death(node, decoded)
        self._follow_seq(node, kind, decoded)
        mapping = self.mappings.get((group, node_name, device_name))
        if mapping is None:
            return SparkplugOutcome()
        if kind.endswith("BIRTH"):
            self._birth(node, mapping, decoded)
            return SparkplugOutcome()
        if kind == "DDEATH":
            return SparkplugOutcome(ended=[mapping.sensor_id] if node.devices.pop(device_name, None) else [])
        device = node.devices.get(device_name)
        if device is None:
            self._request_rebirth(group, node_name, node, now)
            raise PayloadError("no_birth", f"{kind} for {mapping.sensor_id} before its BIRTH")
        try:
            return SparkplugOutcome(mapping.sensor_id, self._data(device, decoded))
        except PayloadError as error:
            if error.reason == "unknown_alias":
                self._request_rebirth(group, node_name, node, now)
            raise

    def _follow_seq(self, node: _Node, kind: str, decoded: Any) -> None:
        if not decoded.HasField("seq") or not 0 <= decoded.seq < SEQ_MODULO:
            raise PayloadError("bad_seq", f"{kind} without a seq in 0-255")
        seq = decoded.seq
        if kind == "NBIRTH":
            node.bd_seq = _metric_value(decoded, BD_SEQ_METRIC)
        elif node.expected_seq is not None and seq != node.expected_seq:
            for device in node.devices.values():
                device.after_gap = True
            log.info("sparkplug_seq_gap", expected=node.expected_seq, seq=seq, devices=len(node.devices))
        node.expected_seq = (seq + 1) % SEQ_MODULO

    def _node_death(self, node: _Node, decoded: Any) -> SparkplugOutcome:
        bd_seq = _metric_value(decoded, BD_SEQ_METRIC)
        if node.bd_seq is not None and bd_seq is not None and bd_seq != node.bd_seq:
            return SparkplugOutcome()  # the will of an earlier session, delivered late
        ended = [device.mapping.sensor_id for device in node.devices.values()]
        node.devices.clear()
        node.expected_seq = None
        return SparkplugOutcome(ended=ended)

    def _birth(self, node: _Node, mapping: DeviceMapping, decoded: Any) -> None:
        index = {name: channel for channel, name in enumerate(mapping.channels)}
        aliases: dict[int, int] = {}
        types: dict[int, int] = {}
        known: set[int] = set()
        for metric in decoded.metrics:
            if metric.HasField("alias"):
                known.add(metric.alias)
            channel = index.get(metric.name)
            if channel is None:
                continue
            if metric.datatype not in schema.NUMERIC_TYPES:
                raise PayloadError("bad_samples", f"BIRTH: channel {metric.name!r} has data type {metric.datatype}")
            types[channel] = metric.datatype
            if metric.HasField("alias"):
                aliases[metric.alias] = channel
        missing = [name for name in mapping.channels if index[name] not in types]
        if missing:
            raise PayloadError("bad_samples", f"BIRTH of {mapping.sensor_id} lacks channels {missing}"[:200])
        device = _Device(
            mapping,
            aliases,
            frozenset(known),
            tuple(schema.SIGNED_BITS.get(types[channel], 0) for channel in range(len(mapping.channels))),
        )
        previous = node.devices.get(mapping.device)
        if previous is not None:  # a rebirth: the stream goes on
            device.next_seq, device.next_ts_ms, device.after_gap = (
                previous.next_seq,
                previous.next_ts_ms,
                previous.after_gap,
            )
        node.devices[mapping.device] = device

    def _data(self, device: _Device, decoded: Any) -> Message:
        channels = len(device.mapping.channels)
        names = {name: channel for channel, name in enumerate(device.mapping.channels)}
        default_ts = decoded.timestamp if decoded.HasField("timestamp") else None
        stamps: list[int] = []
        columns: list[int] = []
        values: list[float] = []
        for metric in decoded.metrics:
            if metric.HasField("alias"):
                if metric.alias not in device.known_aliases:
                    raise PayloadError("unknown_alias", f"alias {metric.alias} of {device.mapping.sensor_id}")
                channel = device.aliases.get(metric.alias)
            else:
                channel = names.get(metric.name)
            if channel is None:
                continue  # a metric that is not a channel
            stamp = metric.timestamp if metric.HasField("timestamp") else default_ts
            if stamp is None:
                raise PayloadError("bad_ts", f"metric {metric.name or metric.alias} without a timestamp")
            stamps.append(stamp)
            columns.append(channel)
            values.append(_sample(metric, device.signed_bits[channel]))
        if not stamps:
            raise PayloadError("bad_samples", "no channel metric")
        times, row_of = np.unique(np.asarray(stamps, dtype=np.uint64), return_inverse=True)
        if len(times) > self.max_samples:
            raise PayloadError("too_many_samples", f"{len(times)} > {self.max_samples}")
        rows = np.full((len(times), channels), np.nan)
        filled = np.zeros((len(times), channels), dtype=np.int64)
        column_of = np.asarray(columns)
        np.add.at(filled, (row_of, column_of), 1)
        if (filled != 1).any():
            raise PayloadError("wrong_channels", "a timestamp without exactly one value for every channel")
        rows[row_of, column_of] = values
        samples = checked_samples(rows, self.max_abs_value)
        return self._place(device, samples, times)

    def _place(self, device: _Device, samples: np.ndarray, times: np.ndarray) -> Message:
        """The windowing seq of the rows: right after the last DATA's, or past a gap when the node lost a message."""
        period_ms = 1000.0 / device.mapping.sample_rate_hz
        first_ms = float(times[0])
        seq = device.next_seq
        if device.after_gap:
            skipped = 1 if device.next_ts_ms is None else round((first_ms - device.next_ts_ms) / period_ms)
            seq += max(1, skipped)
            device.after_gap = False
        device.next_seq = seq + len(samples)
        device.next_ts_ms = float(times[-1]) + period_ms
        return Message(samples=samples, seq=seq, ts=first_ms / 1000.0)

    def _request_rebirth(self, group: str, node_name: str, node: _Node, now: float) -> None:
        if not self.rebirth or self.publish is None or now - node.rebirth_requested_at < self.rebirth_interval_seconds:
            return
        node.rebirth_requested_at = now
        self.rebirths_requested += 1
        topic = f"{NAMESPACE}/{group}/NCMD/{node_name}"
        self.publish(topic, rebirth_request())
        log.info("sparkplug_rebirth_requested", topic=topic)


def rebirth_request(timestamp_ms: int | None = None) -> bytes:
    """The NCMD payload a host application sends to make an edge node publish its BIRTH messages again."""
    stamp = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    payload = schema.Payload(timestamp=stamp)
    payload.metrics.add(name=REBIRTH_METRIC, timestamp=stamp, datatype=schema.BOOLEAN, boolean_value=True)
    return bytes(payload.SerializeToString())


def _parse_topic(topic: str) -> tuple[str, str | None, str, str | None]:
    """(group, message type, edge node, device); type None for a host application's STATE message."""
    levels = topic.split("/")
    if len(levels) >= 2 and levels[0] == NAMESPACE and levels[1] == "STATE":
        return "", None, "", None
    if len(levels) not in (4, 5) or levels[0] != NAMESPACE or levels[2] not in _MESSAGE_TYPES or not all(levels):
        raise PayloadError("bad_topic", repr(topic)[:60])
    device = levels[4] if len(levels) == 5 else None
    if (device is None) != levels[2].startswith("N"):
        raise PayloadError("bad_topic", f"{levels[2]} with{'out' if device is None else ''} a device")
    return levels[1], levels[2], levels[3], device


def _sample(metric: Any, signed_bits: int) -> float:
    kind = metric.WhichOneof("value")
    if metric.is_null or kind is None:
        raise PayloadError("bad_samples", "a channel metric without a value")
    value = getattr(metric, kind)
    if kind in _INTEGER_VALUES:
        return float(value - (1 << signed_bits) if signed_bits and value >= 1 << (signed_bits - 1) else value)
    if kind in _FLOAT_VALUES:
        return float(value)
    raise PayloadError("bad_samples", f"a channel metric with a {kind}")


def _metric_value(decoded: Any, name: str) -> int | None:
    for metric in decoded.metrics:
        if metric.name == name and metric.WhichOneof("value") in _INTEGER_VALUES:
            return int(getattr(metric, metric.WhichOneof("value")))
    return None


class EdgeNode:
    """The messages of one Sparkplug B edge node and its devices, with its seq and aliases (for `monitor replay`,
    the bench's load generator and the tests): each method returns (topic, payload)."""

    def __init__(self, group: str, node: str, bd_seq: int = 0) -> None:
        self.group = group
        self.node = node
        self.bd_seq = bd_seq
        self.seq = 0
        self._aliases: dict[tuple[str | None, str], int] = {}  # unique over the node and its devices

    def _alias(self, device: str | None, name: str) -> int:
        return self._aliases.setdefault((device, name), len(self._aliases) + 1)

    def topic(self, kind: str, device: str | None = None) -> str:
        return f"{NAMESPACE}/{self.group}/{kind}/{self.node}" + (f"/{device}" if device is not None else "")

    def _payload(self, timestamp_ms: int, seq: bool = True) -> Any:
        payload = schema.Payload(timestamp=timestamp_ms)
        if seq:
            payload.seq = self.seq
            self.seq = (self.seq + 1) % SEQ_MODULO
        return payload

    def nbirth(self, timestamp_ms: int) -> tuple[str, bytes]:
        """The node's birth: seq starts again at 0; announces bdSeq and the rebirth command."""
        self.seq = 0
        payload = self._payload(timestamp_ms)
        payload.metrics.add(name=BD_SEQ_METRIC, timestamp=timestamp_ms, datatype=schema.INT64, long_value=self.bd_seq)
        payload.metrics.add(name=REBIRTH_METRIC, timestamp=timestamp_ms, datatype=schema.BOOLEAN, boolean_value=False)
        return self.topic("NBIRTH"), payload.SerializeToString()

    def ndeath(self, timestamp_ms: int) -> tuple[str, bytes]:
        """The node's death (its MQTT will): no seq, its bdSeq."""
        payload = self._payload(timestamp_ms, seq=False)
        payload.metrics.add(name=BD_SEQ_METRIC, datatype=schema.INT64, long_value=self.bd_seq)
        return self.topic("NDEATH"), payload.SerializeToString()

    def dbirth(
        self, device: str, channels: Sequence[str], timestamp_ms: int, datatype: int = schema.FLOAT
    ) -> tuple[str, bytes]:
        """A device's birth: each channel metric with its alias and data type, plus a status metric."""
        payload = self._payload(timestamp_ms)
        payload.metrics.add(name="Properties/Status", timestamp=timestamp_ms, datatype=schema.STRING, string_value="ok")
        for name in channels:
            metric = payload.metrics.add(
                name=name, alias=self._alias(device, name), timestamp=timestamp_ms, datatype=datatype
            )
            metric.float_value = 0.0  # the current value, as births carry
        return self.topic("DBIRTH", device), payload.SerializeToString()

    def ddata(
        self, device: str, channels: Sequence[str], samples: np.ndarray, first_ms: float, period_ms: float
    ) -> tuple[str, bytes]:
        """A device's data: row i of `samples` [n, C] at first_ms + i * period_ms (rounded to ms), by alias."""
        rows = np.asarray(samples, dtype=np.float64).reshape(len(samples), -1)
        stamps = [round(first_ms + row * period_ms) for row in range(len(rows))]
        payload = self._payload(stamps[-1])
        aliases = [self._alias(device, name) for name in channels]
        for stamp, row in zip(stamps, rows.tolist(), strict=True):
            for alias, value in zip(aliases, row, strict=True):
                payload.metrics.add(alias=alias, timestamp=stamp, float_value=value)
        return self.topic("DDATA", device), payload.SerializeToString()

    def ddeath(self, device: str, timestamp_ms: int) -> tuple[str, bytes]:
        return self.topic("DDEATH", device), self._payload(timestamp_ms).SerializeToString()
