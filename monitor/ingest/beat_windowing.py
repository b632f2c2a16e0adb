"""Beat-mode assembly for the daemon: each sensor's samples -> its `BeatStream` -> one window per scorable beat.

The drop-in for `windowing.WindowAssembler` when `windowing.mode: beats` (same `feed`, `evict_idle`,
`snapshot`/`restore` and counters), so the daemon's ingest, queue and micro-batcher stay as they are. Per
message with n samples starting at q (its `seq`, or the sensor's next expected index E without one):

- q + n <= E: a duplicate, ignored; q < E < q + n: the old prefix is trimmed (as in fixed mode);
- a jump beyond `windowing.seq_tolerance` (far ahead, or back near 0: a reboot) starts a new stream and keeps the old
  one aside until the next message shows which goes on, exactly as in fixed mode (`windowing` module docstring):
  one message with a seq near 2**53 cannot silence a sensor;
- q > E otherwise: a gap. The detector's filters and thresholds describe a signal that is no longer continuous, so the
  sensor's stream is reset (`detector_resets`): detection starts again at q, with a new learning phase and
  template warm-up. Beats whose span the gap cut are lost.

Every beat found is counted; unscorable ones (`beats.UNSCORABLE_REASONS`) are counted by reason and never
scored, so never alerted. A beat window's `start_ts` is the ts of the last message carrying one, moved by the
configured sampling rate to the span's first sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from monitor.config.schema import WindowingSettings
from monitor.ecg.beats import BeatSpec, BeatStream
from monitor.errors import ConfigError
from monitor.ingest.payload import Message
from monitor.ingest.windowing import SensorStreams, WindowAssembler
from monitor.model.engine import Engine
from monitor.window import BeatMark, Window

STATE_FORMAT = "monitor-beat-state"
# 2: the dominant rhythm's warm-up, judgements and relearns; 3: the normal RR spread; 4: the interval before the last
# beat (earliness after an interposed beat); 5: the other normal classes
STATE_VERSION = 5


@dataclass(slots=True)
class BeatFeedResult:
    """What one message did; the counters feed the metrics."""

    windows: list[Window] = field(default_factory=list)
    beats_found: int = 0
    # reason -> beats; a plain dict, because a Counter made for every message cost measurably in the network thread
    unscorable: dict[str, int] = field(default_factory=dict)
    detector_resets: int = 0
    duplicate_samples: int = 0
    duplicate: bool = False
    gaps: int = 0
    gap_windows_dropped: int = 0  # always 0: a gap loses beats, not windows the ingest could count
    restarted: bool = False  # the seq jumped beyond the tolerance: a new stream (and detector) started at it
    restart_windows_dropped: int = 0  # always 0: a stream given up loses beats in progress, not windows
    relearns: int = 0  # the sensor's dominant rhythm forgotten and learned again (beats.BeatStream.relearns)
    noisy_stretch: int = 0  # beats scored in a noisy stretch (their stretch scale above 1, beats.BeatSpec)


class _Sensor:
    __slots__ = ("stream", "next_seq", "last_seen", "anchor", "aside")

    def __init__(self, stream: BeatStream, next_seq: int, now: float) -> None:
        self.stream = stream
        self.next_seq = next_seq
        self.last_seen = now
        self.anchor: tuple[int, float] | None = None  # (seq, ts) of the last message carrying ts
        self.aside: _Sensor | None = None  # the sensor's state before a seq jump, until the next message decides


class BeatAssembler(SensorStreams[_Sensor]):
    """Cuts each sensor's single-lead stream into beat windows (see the module docstring). Not thread-safe."""

    def __init__(
        self, spec: BeatSpec, sample_rate_hz: float, max_sensors: int, idle_seconds: float, seq_tolerance: int = 1024
    ) -> None:
        if max_sensors < 1:
            raise ValueError(f"max_sensors must be >= 1, got {max_sensors}")
        super().__init__(max_sensors, idle_seconds, seq_tolerance=seq_tolerance)
        self.spec = spec
        self.fs = float(sample_rate_hz)
        BeatStream(self.fs, spec)  # checks the sampling rate now, not at the first message
        self.channels = 1

    def buffered_samples(self) -> int:
        return sum(
            sensor.stream.buffered_samples + (sensor.aside.stream.buffered_samples if sensor.aside else 0)
            for sensor in self._streams.values()
        )

    def feed(self, sensor_id: str, message: Message, now: float, redelivered: bool = False) -> BeatFeedResult:
        """Adds a message to its sensor's stream; returns the beat windows it completed and what it counted.
        `redelivered` (the broker's DUP flag) as in `WindowAssembler.feed`."""
        sensor, seq = self._open(sensor_id, message, now)
        result = BeatFeedResult()
        sensor, result.restarted, result.restart_windows_dropped = self._follow_seq(
            sensor_id, sensor, seq, now, redelivered
        )
        samples, result.duplicate_samples = self._unseen(message.samples, seq, sensor.next_seq)
        if samples is None:
            result.duplicate = True
            return result
        if seq > sensor.next_seq:
            result.gaps = result.detector_resets = 1
            sensor.stream = BeatStream(self.fs, self.spec, origin=seq)
            sensor.next_seq = seq
        if message.ts is not None:
            sensor.anchor = (seq, message.ts)
        sensor.next_seq += len(samples)
        relearns = sensor.stream.relearns
        beats = sensor.stream.feed(samples[:, 0])
        result.relearns = sensor.stream.relearns - relearns
        for beat in beats:
            result.beats_found += 1
            if beat.reason is not None:  # unscorable
                result.unscorable[beat.reason] = result.unscorable.get(beat.reason, 0) + 1
                continue
            result.noisy_stretch += bool(self.spec.stretch_scale(beat.stretch) > 1)
            start_ts = (
                None if sensor.anchor is None else sensor.anchor[1] + (beat.start_seq - sensor.anchor[0]) / self.fs
            )
            result.windows.append(
                Window(
                    sensor_id,
                    beat.start_seq,
                    beat.window,
                    start_ts,
                    now,
                    float(self.spec.error_scale(beat.stretch, beat.qrs_correlation)),
                    float(self.spec.timing_score(beat.earliness, beat.rr_spread)),
                    BeatMark(beat.end_seq, beat.r_seq, beat.rr_seconds),
                )
            )
        return result

    def _fresh_state(self, first_seq: int, now: float) -> _Sensor:
        return _Sensor(BeatStream(self.fs, self.spec, origin=first_seq), first_seq, now)

    def _partial_windows(self, state: _Sensor) -> int:
        return 0

    def snapshot(self) -> dict[str, Any]:
        """Every sensor's detector, buffers, template and position, JSON-ready."""
        sensors = [
            {
                "id": sensor_id,
                "next_seq": sensor.next_seq,
                "anchor": list(sensor.anchor) if sensor.anchor else None,
                "stream": sensor.stream.snapshot(),
            }
            for sensor_id, sensor in self._streams.items()
        ]
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "sample_rate_hz": self.fs,
            "spec": self.spec.to_dict(),
            "sensors": sensors,
        }

    def restore(self, state: Any, now: float, max_abs_value: float = math.inf) -> int:
        """Replaces all sensors' state with a `snapshot()` of the same spec and rate; returns how many it holds.

        Raises ValueError, and changes nothing, for a snapshot of another version, spec or rate. A sensor entry that
        is not consistent (or holds a sample beyond `max_abs_value`) is left out: its id goes into `refused`, the
        others are taken."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a {STATE_FORMAT} of version {STATE_VERSION}")
        if state.get("sample_rate_hz") != self.fs or state.get("spec") != self.spec.to_dict():
            raise ValueError(
                f"saved for {state.get('sample_rate_hz')} Hz and another beat spec, not {self.fs} Hz and the model's"
            )
        return self._take_entries(state, lambda item: self._restored_sensor(item, now, max_abs_value))

    def _restored_sensor(self, item: dict[str, Any], now: float, max_abs_value: float) -> _Sensor:
        stream = BeatStream.restore(item["stream"], self.spec)
        if stream.fs != self.fs or int(item["next_seq"]) != stream.origin + stream.received:
            raise ValueError(f"sensor {item['id']!r}: position {item['next_seq']} does not fit its stream")
        if not stream.max_abs_sample() <= max_abs_value:  # NaN fails it too
            raise ValueError(f"sensor {item['id']!r}: a sample beyond {max_abs_value}")
        sensor = _Sensor(stream, int(item["next_seq"]), now)
        sensor.anchor = None if item["anchor"] is None else (int(item["anchor"][0]), float(item["anchor"][1]))
        return sensor


def check_mode(
    windowing: WindowingSettings, engine: Engine, model_path: object, origin: Callable[[str], str] | None = None
) -> None:
    """Refuses, with one line, a beat-mode model in fixed mode or a fixed-window model in beat mode; `origin` says
    where a key's value came from (`Config.origin`: the file or a `MONITOR_` variable)."""

    def given(key: str, value: object) -> str:
        return f"{key} {value}" + (f" (from {origin(key)})" if origin else "")

    if windowing.mode == "beats" and engine.segmentation is None:
        raise ConfigError(
            f"{given('windowing.mode', 'beats')} does not fit {given('model.path', model_path)}, a fixed-window "
            f"model ({engine.window}-sample windows): use a beat-mode model (models/mitdb-beats) or windowing.mode: "
            "fixed"
        )
    if windowing.mode == "beats" and windowing.baseline == "sensor":
        raise ConfigError(
            "windowing.baseline: sensor is for fixed windows; in beat mode every beat is normalised alone"
        )
    if windowing.mode == "fixed" and engine.segmentation is not None:
        raise ConfigError(
            f"{given('windowing.mode', 'fixed')} does not fit {given('model.path', model_path)}, a beat-mode model: "
            "set windowing.mode: beats and windowing.sample_rate_hz (configs/monitor-beats.yaml), or use a "
            "fixed-window model"
        )


def make_assembler(
    windowing: WindowingSettings, engine: Engine, on_evict: Callable[[str], None] | None = None
) -> WindowAssembler | BeatAssembler:
    """The assembler of the configured mode, shaped for the engine (`check_mode` first); `on_evict`: fixed mode."""
    if engine.segmentation is None:
        stride = windowing.stride or engine.window
        return WindowAssembler(
            engine.window,
            stride,
            engine.channels,
            windowing.max_sensors,
            windowing.idle_eviction_seconds,
            on_evict,
            windowing.seq_tolerance,
            windowing.ts_tolerance_seconds,
        )
    assert windowing.sample_rate_hz is not None  # the config requires it in beat mode
    return BeatAssembler(
        engine.segmentation,
        windowing.sample_rate_hz,
        windowing.max_sensors,
        windowing.idle_eviction_seconds,
        windowing.seq_tolerance,
    )
