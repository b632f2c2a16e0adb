"""The input stage, on paho's network thread: message -> sensor id -> payload -> windowing -> bounded queue.

`Ingest.handle` runs for every message: decode, window, enqueue; it never blocks and never raises, and
every outcome is counted. `housekeeping` evicts idle sensors and refreshes the gauges.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence

import structlog

from monitor.baseline import SensorBaselines
from monitor.batching import WindowQueue
from monitor.beatwindowing import BeatAssembler, BeatFeedResult, BeatWindow
from monitor.errors import PayloadError
from monitor.log import RateLimiter
from monitor.metrics import Metrics
from monitor.payload import PayloadDecoder, sensor_id_from_topic
from monitor.windowing import Window, WindowAssembler

log = structlog.get_logger("monitor.ingest")


class Ingest:
    """Message -> sensor id -> samples -> windows -> scoring queue, with every outcome counted."""

    def __init__(
        self,
        decoder: PayloadDecoder,
        assembler: WindowAssembler | BeatAssembler,
        windows: WindowQueue[Window | BeatWindow],
        metrics: Metrics,
        sensor_id_level: int,
        warning_interval_seconds: float = 60.0,
        baselines: SensorBaselines | None = None,
    ) -> None:
        self.decoder = decoder
        self.assembler = assembler
        self.windows = windows
        self.metrics = metrics
        self.sensor_id_level = sensor_id_level
        self.baselines = baselines  # with `baseline: sensor`: warm-ups and per-sensor normalisation, under the lock
        self.lock = threading.Lock()  # the assembler is touched by paho's thread and by housekeeping
        self._warnings = RateLimiter(warning_interval_seconds)
        self._evicted_counted = 0

    def handle(self, topic: str, payload: bytes, now: float) -> None:
        """Process one message; any failure is counted and logged, never raised into paho."""
        sensor_id = None
        try:
            sensor_id = sensor_id_from_topic(topic, self.sensor_id_level)
            message = self.decoder.decode(payload)
            with self.lock:
                result = self.assembler.feed(sensor_id, message, now)
                windows = result.windows if self.baselines is None else self._after_warm_up(result.windows)
        except PayloadError as error:
            self.metrics.messages.labels(error.reason).inc()
            if self._warnings.allow((sensor_id or topic, error.reason), now):
                log.warning(
                    "message_dropped",
                    sensor_id=sensor_id,
                    topic=topic[:200],
                    reason=error.reason,
                    detail=error.detail[:200],
                    bytes=len(payload),
                )
            return
        except Exception:
            self.metrics.messages.labels("internal_error").inc()
            if self._warnings.allow(("internal_error", sensor_id), now):
                log.exception("message_failed", sensor_id=sensor_id, topic=topic[:200])
            return
        self.metrics.messages.labels("duplicate" if result.duplicate else "accepted").inc()
        self.metrics.samples.inc(len(message.samples) - result.duplicate_samples if not result.duplicate else 0)
        if result.duplicate_samples:
            self.metrics.duplicate_samples.inc(result.duplicate_samples)
        if result.gaps:
            self.metrics.seq_gaps.inc(result.gaps)
            if result.gap_windows_dropped:
                self.metrics.windows_dropped.labels("seq_gap").inc(result.gap_windows_dropped)
            if self._warnings.allow((sensor_id, "seq_gap"), now):
                log.warning("seq_gap", sensor_id=sensor_id, seq=message.seq, windows_dropped=result.gap_windows_dropped)
        if isinstance(result, BeatFeedResult):
            self._count_beats(sensor_id, result, now)
        for window in windows:
            if not self.windows.offer(window):
                self.metrics.windows_dropped.labels("queue_full").inc()
                if self._warnings.allow(("queue_full",), now):
                    log.warning("scoring_queue_full", capacity=self.windows.capacity, sensor_id=sensor_id)

    def _after_warm_up(self, windows: Sequence[Window | BeatWindow]) -> list[Window | BeatWindow]:
        """Warm-up windows are counted and held back; the others come normalised by their sensor's baseline."""
        assert self.baselines is not None
        ready: list[Window | BeatWindow] = []
        for window in windows:
            normalised = self.baselines.admit(window.sensor_id, window.samples)
            if normalised is None:
                self.metrics.windows_warming_up.inc()
            else:
                ready.append(dataclasses.replace(window, samples=normalised))
        return ready

    def _count_beats(self, sensor_id: str, result: BeatFeedResult, now: float) -> None:
        self.metrics.beats_found.inc(result.beats_found)
        if result.detector_resets:
            self.metrics.detector_resets.inc(result.detector_resets)
        for reason, count in result.unscorable.items():
            self.metrics.beats_unscorable.labels(reason).inc(count)
            if reason != "warmup" and self._warnings.allow((sensor_id, "unscorable"), now):
                log.warning("beats_unscorable", sensor_id=sensor_id, reason=reason, beats=count)

    def housekeeping(self, now: float) -> None:
        """Evict idle sensors and refresh the gauges (called about once a second)."""
        with self.lock:
            self.assembler.evict_idle(now)
            evicted = self.assembler.evicted_total - self._evicted_counted
            active = self.assembler.active_sensors
            buffered = self.assembler.buffered_samples()
            warming = 0 if self.baselines is None else self.baselines.sensors_warming_up
        if evicted:
            self._evicted_counted += evicted
            self.metrics.sensors_evicted.inc(evicted)
            log.info("sensors_evicted", count=evicted, active=active)
        self.metrics.active_sensors.set(active)
        self.metrics.buffered_samples.set(buffered)
        self.metrics.sensors_warming_up.set(warming)
        self.metrics.queue_depth.set(self.windows.depth())
