"""Per-sensor window assembly: absolute seq alignment, stride, gaps, duplicates, idle eviction.

Window k of a sensor covers the absolute samples [k*S, k*S + W) of its stream (docs/interface.md), so a
replay always yields the same windows. The rules, per message with n samples starting at q (its `seq`, or the
sensor's next expected index E when it has none; a new sensor without seq starts at 0):

- First message of a sensor: the stream starts at q; the first window is the first k with k*S >= q.
- q + n <= E: a duplicate (or older) message, ignored whole: `duplicate=True`, `duplicate_samples = n`.
- q < E < q + n: the old prefix of E - q samples is trimmed (`duplicate_samples`), the rest is appended.
- q > E: a gap (`gaps=1`). The missing samples [E, q) break every window k not yet emitted with k*S < q. Of
  those, the dropped count holds the ones that contained samples which arrived: started before E (k*S < E) or
  reaching past q (k*S + W > q); windows lying wholly inside the gap held nothing, so they are not counted and
  the count is bounded by the samples that arrived (at most 2*ceil(W/S) per message). Windows starting before
  the stream's first seq were never candidates. The buffer restarts at q; the next window is the first with k*S >= q.
- q > E + `seq_tolerance` (far ahead), or q <= `seq_tolerance` < E - q (back to the start: a reboot): a jump.
  A message far behind but not near the start is a resend (a sensor's client re-sending after an outage can be
  thousands of samples behind) and so a duplicate, as is any redelivery by the broker (its DUP flag). A new
  stream starts at q, as for a new sensor (`restarted=True`), and the old one is kept aside until the next message
  decides: if that one continues the old stream, the old stream goes on and the new one is dropped; otherwise the
  old one is dropped. So one message (an attacker's seq near 2**53, a stale retained message) costs the sensor
  nothing, and a sensor rebooting to seq 0 is scored again at once. The partial windows of the stream dropped
  count as `restart_windows_dropped`. At most one stream is kept aside per sensor.

Only samples from the next window's start onwards are buffered (fewer than W per sensor); samples that no
future window covers (S > W) are skipped without copying.

`start_ts`: a message carrying `ts` anchors (its seq, ts). A window's start time is the ts of the message that
delivered its first sample plus (offset of that sample in the message) * sample period, where the period is
(ts2 - ts1) / (seq2 - seq1) of the last two ts-carrying messages (unknown while that is not positive). Offset 0
needs no period; otherwise an unknown period, or a first sample delivered by a message without ts, gives None.

A new sensor arriving while `max_sensors` are active first evicts idle sensors; if none is idle it raises
`PayloadError("sensor_limit")`. That reason is deliberately not in `payload.REJECT_REASONS` (it is not a
property of the payload); callers label it with `SENSOR_LIMIT_REASON`.

`snapshot()`/`restore()` carry every sensor's partial window (and its seq and ts positions) across a restart
of the daemon as plain JSON data; a snapshot only fits an assembler with the same window, stride and channels.

Not thread-safe by design: one caller (the MQTT network thread) serialises access.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from monitor.errors import PayloadError
from monitor.ingest.payload import MAX_SEQ, Message
from monitor.window import Window, decode_array, encode_array

SENSOR_LIMIT_REASON = "sensor_limit"
STATE_FORMAT = "monitor-window-state"
STATE_VERSION = 1


@dataclass(slots=True)
class FeedResult:
    """What one message did to its sensor's stream; the counters feed the metrics."""

    windows: list[Window] = field(default_factory=list)
    gap_windows_dropped: int = 0  # windows that can never be completed because of a seq gap
    duplicate_samples: int = 0  # samples ignored because their seq was already seen
    duplicate: bool = False  # the whole message was old/duplicate and ignored
    gaps: int = 0  # seq gaps seen in this message (0 or 1)
    restarted: bool = False  # the seq jumped beyond the tolerance: a new stream started at it
    restart_windows_dropped: int = 0  # partial windows of a stream dropped after a jump
    ts_backwards: bool = False  # the message's ts went back beyond the tolerance: ignored


class _Anchor:
    """Samples [start, end) delivered by a message whose first sample (at seq) was taken at ts."""

    __slots__ = ("start", "end", "seq", "ts")

    def __init__(self, start: int, end: int, seq: int, ts: float) -> None:
        self.start = start
        self.end = end
        self.seq = seq
        self.ts = ts


class _Stream:
    """State of one sensor. Invariant: buffer[:fill] holds samples [next_k*S, next_seq), fill < W."""

    __slots__ = (
        "buffer",
        "fill",
        "next_seq",
        "next_k",
        "last_seen",
        "anchors",
        "last_anchor",
        "period_seconds",
        "aside",
    )

    def __init__(self, first_seq: int, stride: int, buffer: np.ndarray, now: float) -> None:
        self.buffer = buffer
        self.fill = 0
        self.next_seq = first_seq
        self.next_k = -(-first_seq // stride)  # ceil: the first window starting at or after the stream's start
        self.last_seen = now
        self.anchors: deque[_Anchor] = deque()  # ts anchors of messages that delivered still-needed samples
        self.last_anchor: tuple[int, float] | None = None  # (seq, ts) of the last message carrying ts
        self.period_seconds: float | None = None
        self.aside: _Stream | None = None  # the stream before a seq jump, until the next message decides


class _Sensor(Protocol):
    last_seen: float
    next_seq: int  # the seq of the next sample expected
    aside: Any  # the sensor's state before a seq jump (same type), until the next message decides; or None


SensorState = TypeVar("SensorState", bound=_Sensor)


class SensorStreams(Generic[SensorState]):
    """The seq policy both assemblers share, over per-sensor stream state: least recently seen first, at most
    `max_sensors`, idle ones evicted (fixed and beat mode). The decision-side stages keep their per-sensor records
    in `alerts.sensor_table.SensorTable` instead.

    `on_evict` is called with each evicted sensor's id, so per-sensor state kept elsewhere goes with it.
    """

    def __init__(
        self,
        max_sensors: int,
        idle_seconds: float,
        on_evict: Callable[[str], None] | None = None,
        seq_tolerance: int = 1024,
    ) -> None:
        if not idle_seconds > 0:
            raise ValueError(f"idle_seconds must be > 0, got {idle_seconds}")
        self.max_sensors = max_sensors
        self.idle_seconds = idle_seconds
        self.on_evict = on_evict
        self.seq_tolerance = seq_tolerance
        self._streams: OrderedDict[str, SensorState] = OrderedDict()  # least recently seen first
        self.refused: list[str] = []  # ids of the sensor entries the last `restore` left out
        self.evicted_total = 0  # every eviction, including those a new sensor triggers inside feed()

    def _take_entries(self, state: dict[str, Any], restored: Callable[[Any], SensorState]) -> int:
        """Replaces every sensor's state with `restored(entry)` of each entry of a snapshot's `sensors` (the last
        `max_sensors`); an entry it refuses (an inconsistent one) is left out and its id goes into `refused`."""
        items = state.get("sensors")
        if not isinstance(items, list):
            raise ValueError("the snapshot has no list of sensors")
        streams: OrderedDict[str, SensorState] = OrderedDict()
        self.refused = []
        for item in items[-self.max_sensors :]:
            try:
                streams[str(item["id"])] = restored(item)
            except (KeyError, TypeError, ValueError, IndexError, OverflowError):  # binascii.Error is a ValueError
                self.refused.append(str(item.get("id"))[:128] if isinstance(item, dict) else "?")
        self._streams = streams
        return len(streams)

    @property
    def active_sensors(self) -> int:
        """Number of sensors with state held."""
        return len(self._streams)

    def sensor_ids(self) -> Iterator[str]:
        """The sensors with state held, least recently seen first."""
        return iter(self._streams)

    def evict_idle(self, now: float) -> int:
        """Drops sensors with now - last_seen >= idle_seconds; returns how many. O(evicted)."""
        evicted = 0
        while self._streams:
            sensor_id, stream = next(iter(self._streams.items()))
            if now - stream.last_seen < self.idle_seconds:
                break
            del self._streams[sensor_id]
            if self.on_evict is not None:
                self.on_evict(sensor_id)
            evicted += 1
        self.evicted_total += evicted
        return evicted

    def end_stream(self, sensor_id: str) -> int:
        """Forget a sensor whose source said its stream ended (a Sparkplug DEATH); returns the partial windows
        dropped with it (its stream's and a stream kept aside's). Its per-sensor state elsewhere stays."""
        state = self._streams.pop(sensor_id, None)
        if state is None:
            return 0
        return self._partial_windows(state) + (0 if state.aside is None else self._partial_windows(state.aside))

    def _seen(self, sensor_id: str, now: float) -> SensorState | None:
        """The sensor's state, marked as seen now; None for a sensor without state."""
        stream = self._streams.get(sensor_id)
        if stream is not None:
            stream.last_seen = now
            self._streams.move_to_end(sensor_id)
        return stream

    channels: int  # samples per row a message must carry

    def _fresh_state(self, first_seq: int, now: float) -> SensorState:
        """A sensor's state for a stream starting at `first_seq` (a new sensor, or a new stream after a jump)."""
        raise NotImplementedError

    def _partial_windows(self, state: SensorState) -> int:
        """Windows of a stream given up after a jump that had held samples which arrived (counted as dropped)."""
        raise NotImplementedError

    def _new_state(self, sensor_id: str, first_seq: int, now: float) -> SensorState:
        self._make_room(now)
        state = self._streams[sensor_id] = self._fresh_state(first_seq, now)
        return state

    def _open(self, sensor_id: str, message: Message, now: float) -> tuple[SensorState, int]:
        """The sensor's state, marked as seen (made for a new sensor, at the message's seq), and the seq of the
        message's first sample (the sensor's next expected one when it carries none); ValueError for samples not
        shaped [n, channels]."""
        if message.samples.ndim != 2 or message.samples.shape[1] != self.channels:
            raise ValueError(f"samples must be [n, {self.channels}], got {message.samples.shape}")
        state = self._seen(sensor_id, now)
        if state is None:
            state = self._new_state(sensor_id, 0 if message.seq is None else message.seq, now)
        return state, state.next_seq if message.seq is None else message.seq

    def _follow_seq(
        self, sensor_id: str, state: SensorState, seq: int, now: float, redelivered: bool
    ) -> tuple[SensorState, bool, int]:
        """The seq policy of both modes (module docstring): (the state the message belongs to, whether it started a
        new stream, windows dropped with the stream given up). A jump starts a new stream and keeps the old one aside
        until the next message shows which goes on; a message far behind is a resend, left to `_unseen`."""
        aside = state.aside
        if abs(seq - state.next_seq) <= self.seq_tolerance or not self._is_jump(state, seq, redelivered):
            if aside is None:
                return state, False, 0
            state.aside = None
            return state, False, self._partial_windows(aside)
        if aside is not None and abs(seq - aside.next_seq) <= self.seq_tolerance:  # back to the stream kept aside
            aside.last_seen = now
            self._streams[sensor_id] = aside
            return aside, False, self._partial_windows(state)
        new = self._streams[sensor_id] = self._fresh_state(seq, now)
        new.aside = aside or state  # the established stream stays aside; an unconfirmed one is dropped
        return new, True, 0 if aside is None else self._partial_windows(state)

    def _is_jump(self, state: SensorState, seq: int, redelivered: bool) -> bool:
        """A seq far from the position: back to the stream kept aside, far ahead, or back near 0 (module docstring);
        further behind is a resend."""
        aside = state.aside
        if aside is not None and abs(seq - aside.next_seq) <= self.seq_tolerance:
            return True
        return not (seq < state.next_seq and (redelivered or seq > self.seq_tolerance))

    @staticmethod
    def _unseen(samples: np.ndarray, seq: int, next_seq: int) -> tuple[np.ndarray | None, int]:
        """The samples from `next_seq` on (None when all came before it: a duplicate), and how many were skipped."""
        if seq + len(samples) <= next_seq:
            return None, len(samples)
        trim = max(next_seq - seq, 0)
        return samples[trim:], trim

    def _make_room(self, now: float) -> None:
        """Before adding a sensor: evicts idle ones when full; PayloadError("sensor_limit") if none is idle."""
        if len(self._streams) >= self.max_sensors:
            self.evict_idle(now)
            if len(self._streams) >= self.max_sensors:
                raise PayloadError(SENSOR_LIMIT_REASON, f"{self.max_sensors} sensors active")


class WindowAssembler(SensorStreams[_Stream]):
    """Cuts each sensor's stream into windows of W samples every S samples (see the module docstring)."""

    def __init__(
        self,
        window: int,
        stride: int,
        channels: int,
        max_sensors: int,
        idle_seconds: float,
        on_evict: Callable[[str], None] | None = None,
        seq_tolerance: int = 1024,
        ts_tolerance_seconds: float = 1.0,
    ) -> None:
        """Args: window W and stride S in samples; channels C; max_sensors held at once; idle_seconds before eviction;
        on_evict, called with each evicted sensor's id; seq_tolerance, the seq jump beyond which a message far
        ahead, or back near 0, restarts the stream (module docstring); ts_tolerance_seconds, how far a later
        message's ts may go back before it is ignored."""
        if window < 1 or stride < 1 or channels < 1 or max_sensors < 1:
            raise ValueError(
                f"window, stride, channels, max_sensors must be >= 1: {window}, {stride}, {channels}, {max_sensors}"
            )
        super().__init__(max_sensors, idle_seconds, on_evict, seq_tolerance)
        self.window = window
        self.stride = stride
        self.channels = channels
        self.ts_tolerance_seconds = ts_tolerance_seconds
        # Room for a partial window plus a typical message, so most messages append in place.
        self._buffer_rows = 2 * window

    def buffered_samples(self) -> int:
        """Total samples held across sensors (each sensor holds fewer than W, or 2W just after a seq jump)."""
        return sum(stream.fill + (stream.aside.fill if stream.aside else 0) for stream in self._streams.values())

    def snapshot(self) -> dict[str, Any]:
        """Every sensor's position and partial window, JSON-ready (samples as base64 of little-endian float32)."""
        sensors = [
            {
                "id": sensor_id,
                "next_seq": stream.next_seq,
                "next_k": stream.next_k,
                "samples": encode_array(stream.buffer[: stream.fill]),
                "anchors": [[anchor.start, anchor.end, anchor.seq, anchor.ts] for anchor in stream.anchors],
                "last_anchor": list(stream.last_anchor) if stream.last_anchor is not None else None,
                "period_seconds": stream.period_seconds,
            }
            for sensor_id, stream in self._streams.items()
        ]
        shape = {"window": self.window, "stride": self.stride, "channels": self.channels}
        return {"format": STATE_FORMAT, "version": STATE_VERSION, **shape, "sensors": sensors}

    def restore(self, state: Any, now: float, max_abs_value: float = math.inf) -> int:
        """Replaces all sensors' state with a `snapshot()`; returns how many sensors it holds.

        Raises ValueError, and changes nothing, for a snapshot of another shape. A sensor entry that is not consistent
        (or holds a sample beyond `max_abs_value`, or a position beyond a message's) is left out: its id goes into
        `refused`, the others are taken. At most `max_sensors` are taken (the most recently seen); all count as seen
        at `now`.
        """
        shape = (self.window, self.stride, self.channels)
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a {STATE_FORMAT} of version {STATE_VERSION}")
        if (state.get("window"), state.get("stride"), state.get("channels")) != shape:
            raise ValueError(
                f"saved for window, stride, channels {state.get('window')}, {state.get('stride')}, "
                f"{state.get('channels')}, not {shape}"
            )
        return self._take_entries(state, lambda item: self._restored_stream(item, now, max_abs_value))

    def _restored_stream(self, item: dict[str, Any], now: float, max_abs_value: float) -> _Stream:
        samples = decode_array(item["samples"]).reshape(-1, self.channels)
        stream = _Stream(0, self.stride, np.empty((self._buffer_rows, self.channels), dtype=np.float32), now)
        stream.next_seq, stream.next_k, stream.fill = int(item["next_seq"]), int(item["next_k"]), len(samples)
        if (
            stream.fill != max(0, stream.next_seq - stream.next_k * self.stride)
            or stream.fill >= self.window
            or not 0 <= stream.next_seq < MAX_SEQ
            or not np.abs(samples).max(initial=0.0) <= max_abs_value  # NaN fails it too
        ):
            raise ValueError(
                f"sensor {item['id']!r}: {stream.fill} samples do not fit next_seq {stream.next_seq}, "
                f"next_k {stream.next_k}"
            )
        stream.buffer[: stream.fill] = samples
        stream.anchors.extend(
            _Anchor(int(start), int(end), int(seq), float(ts)) for start, end, seq, ts in item["anchors"]
        )
        if item["last_anchor"] is not None:
            stream.last_anchor = (int(item["last_anchor"][0]), float(item["last_anchor"][1]))
        times = [anchor.ts for anchor in stream.anchors] + [stream.last_anchor[1] if stream.last_anchor else 0.0]
        if not all(math.isfinite(ts) for ts in times):
            raise ValueError(f"sensor {item['id']!r}: a time that is not finite")
        stream.period_seconds = None if item["period_seconds"] is None else float(item["period_seconds"])
        return stream

    def feed(self, sensor_id: str, message: Message, now: float, redelivered: bool = False) -> FeedResult:
        """Adds a message to its sensor's stream; returns the windows it completed and what it dropped.

        `redelivered` (the broker's DUP flag: a message it sent before) makes a seq behind the position a
        duplicate however far behind, never a jump, even near the start: after a restart the broker redelivers
        everything not yet acknowledged, which may lie far behind what the journal restored.

        Raises PayloadError("sensor_limit") for a new sensor when max_sensors are active and none is idle.
        """
        stream, seq = self._open(sensor_id, message, now)
        result = FeedResult()
        stream, result.restarted, result.restart_windows_dropped = self._follow_seq(
            sensor_id, stream, seq, now, redelivered
        )
        samples, result.duplicate_samples = self._unseen(message.samples, seq, stream.next_seq)
        if samples is None:
            result.duplicate = True
            return result
        if seq > stream.next_seq:
            result.gaps = 1
            result.gap_windows_dropped = self._restart_after_gap(stream, seq)
        if message.ts is not None:
            result.ts_backwards = self._backwards(stream, seq, message.ts)
            if not result.ts_backwards:
                self._anchor(stream, seq, message.ts, seq + len(message.samples))
        self._append(sensor_id, stream, samples, now, result.windows)
        return result

    def _fresh_state(self, first_seq: int, now: float) -> _Stream:
        return _Stream(first_seq, self.stride, np.empty((self._buffer_rows, self.channels), dtype=np.float32), now)

    def _partial_windows(self, state: _Stream) -> int:
        return self._broken_windows(state, state.next_seq)

    def _broken_windows(self, stream: _Stream, seq: int) -> int:
        """Windows not yet emitted, starting before seq, that held samples which arrived (module docstring)."""
        stride, first_k_after = self.stride, -(-seq // self.stride)
        started = max(0, min(first_k_after, -(-stream.next_seq // stride)) - stream.next_k)
        reaching_past = first_k_after - max(stream.next_k + started, (seq - self.window) // stride + 1)
        return started + max(0, reaching_past)

    def _restart_after_gap(self, stream: _Stream, seq: int) -> int:
        """Restarts the buffer at seq; returns the windows the gap broke (rule in the module docstring)."""
        first_k_after = -(-seq // self.stride)
        dropped = self._broken_windows(stream, seq)
        stream.next_k = max(stream.next_k, first_k_after)
        stream.next_seq = seq
        stream.fill = 0
        stream.anchors.clear()
        return dropped

    def _backwards(self, stream: _Stream, seq: int, ts: float) -> bool:
        """A later message (higher seq) whose ts is more than `ts_tolerance_seconds` before the last one's: its ts
        is ignored, so no window time is extrapolated from it."""
        last = stream.last_anchor
        return last is not None and seq > last[0] and ts < last[1] - self.ts_tolerance_seconds

    def _anchor(self, stream: _Stream, seq: int, ts: float, end: int) -> None:
        """Records the message's (seq, ts): it updates the period and timestamps the samples it delivers."""
        if stream.last_anchor is not None and seq > stream.last_anchor[0]:
            last_seq, last_ts = stream.last_anchor
            stream.period_seconds = (ts - last_ts) / (seq - last_seq) if ts > last_ts else None
        stream.last_anchor = (seq, ts)
        if end > stream.next_k * self.stride:  # only samples a future window still needs get timestamps
            stream.anchors.append(_Anchor(max(seq, stream.next_seq), end, seq, ts))

    def _append(self, sensor_id: str, stream: _Stream, samples: np.ndarray, now: float, out: list[Window]) -> None:
        """Appends samples starting at stream.next_seq and emits every window they complete."""
        n = len(samples)
        window, stride = self.window, self.stride
        base = stream.next_k * stride  # absolute index of data[0] below: the next window's start
        skip = base - stream.next_seq  # > 0 only with an empty buffer: samples no window covers
        stream.next_seq += n
        if skip >= n:
            return
        if skip > 0:
            samples = samples[skip:]
        fill = stream.fill
        total = fill + len(samples)
        buffer = stream.buffer
        if total < window:
            buffer[fill:total] = samples
            stream.fill = total
            return
        if fill == 0:
            data = samples
        elif total <= len(buffer):
            buffer[fill:total] = samples
            data = buffer
        else:
            data = np.concatenate((buffer[:fill], samples))
        k = stream.next_k
        offset = k * stride - base
        while offset + window <= total:
            start = base + offset
            out.append(
                Window(sensor_id, start, data[offset : offset + window].copy(), self._start_ts(stream, start), now)
            )
            k += 1
            offset += stride
        stream.next_k = k
        keep = total - offset
        if keep > 0:
            buffer[:keep] = data[offset:total]  # numpy copes with the overlap when data is the buffer itself
            stream.fill = keep
        else:
            stream.fill = 0
        self._drop_anchors_before(stream, base + offset)

    def _start_ts(self, stream: _Stream, start: int) -> float | None:
        self._drop_anchors_before(stream, start)
        anchors = stream.anchors
        if not anchors or anchors[0].start > start:
            return None
        anchor = anchors[0]
        if start == anchor.seq:
            return anchor.ts
        if stream.period_seconds is None:
            return None
        start_ts = anchor.ts + (start - anchor.seq) * stream.period_seconds
        return start_ts if math.isfinite(start_ts) else None

    @staticmethod
    def _drop_anchors_before(stream: _Stream, index: int) -> None:
        anchors = stream.anchors
        while anchors and anchors[0].end <= index:
            anchors.popleft()
