"""The data path between MQTT and alerts, testable without a broker.

`Ingest.handle` runs on paho's network thread for every message: decode, window, enqueue; it never
blocks and never raises. `ScoringWorker` is the scoring thread: micro-batches from the queue, one
forward pass per batch, the threshold decision, alerts out.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import orjson
import structlog

from monitor.alerts import ThresholdDecision, build_alert
from monitor.batching import MicroBatcher, WindowQueue
from monitor.config import AlertSettings, ShardSettings
from monitor.errors import PayloadError
from monitor.log import RateLimiter
from monitor.metrics import Metrics
from monitor.payload import PayloadDecoder, sensor_id_from_topic
from monitor.scoring import Scores
from monitor.windowing import Window, WindowAssembler

log = structlog.get_logger("monitor.pipeline")


def shard_of(sensor_id: str, count: int) -> int:
    """A stable shard number for a sensor (CRC-32, the same on every host and run)."""
    return zlib.crc32(sensor_id.encode("utf-8")) % count


class Ingest:
    """Message -> sensor id -> samples -> windows -> scoring queue, with every outcome counted."""

    def __init__(
        self,
        decoder: PayloadDecoder,
        assembler: WindowAssembler,
        windows: WindowQueue[Window],
        metrics: Metrics,
        sensor_id_level: int,
        shard: ShardSettings,
        warning_interval_seconds: float = 60.0,
    ) -> None:
        self.decoder = decoder
        self.assembler = assembler
        self.windows = windows
        self.metrics = metrics
        self.sensor_id_level = sensor_id_level
        self.shard = shard
        self.lock = threading.Lock()  # the assembler is touched by paho's thread and by housekeeping
        self._warnings = RateLimiter(warning_interval_seconds)
        self._evicted_counted = 0

    def handle(self, topic: str, payload: bytes, now: float) -> None:
        """Process one message; any failure is counted and logged, never raised into paho."""
        sensor_id = None
        try:
            sensor_id = sensor_id_from_topic(topic, self.sensor_id_level)
            if self.shard.count > 1 and shard_of(sensor_id, self.shard.count) != self.shard.index:
                self.metrics.messages.labels("other_shard").inc()
                return
            message = self.decoder.decode(payload)
            with self.lock:
                result = self.assembler.feed(sensor_id, message, now)
        except PayloadError as error:
            self.metrics.messages.labels(error.reason).inc()
            if self._warnings.allow((sensor_id or topic, error.reason), now):
                log.warning("message_dropped", sensor_id=sensor_id, topic=topic[:200], reason=error.reason, detail=error.detail[:200], bytes=len(payload))
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
        for window in result.windows:
            if not self.windows.offer(window):
                self.metrics.windows_dropped.labels("queue_full").inc()
                if self._warnings.allow(("queue_full",), now):
                    log.warning("scoring_queue_full", capacity=self.windows.capacity, sensor_id=sensor_id)

    def housekeeping(self, now: float) -> None:
        """Evict idle sensors and refresh the gauges (called about once a second)."""
        with self.lock:
            self.assembler.evict_idle(now)
            evicted = self.assembler.evicted_total - self._evicted_counted
            active = self.assembler.active_sensors
            buffered = self.assembler.buffered_samples()
        if evicted:
            self._evicted_counted += evicted
            self.metrics.sensors_evicted.inc(evicted)
            log.info("sensors_evicted", count=evicted, active=active)
        self.metrics.active_sensors.set(active)
        self.metrics.buffered_samples.set(buffered)
        self.metrics.queue_depth.set(self.windows.depth())


class Engine:
    """What the scoring thread needs to score and decide; swapped as a whole on model reload."""

    def __init__(self, score: Callable[[np.ndarray], Scores], threshold: float, window: int, name: str, version: str) -> None:
        self.score = score
        self.decision = ThresholdDecision(threshold)
        self.window = window
        self.model = {"name": name, "version": version}


@dataclass
class AlertRoute:
    """Where and how alerts go."""

    publish: Callable[[str, bytes, int], None]
    topic_template: str
    qos: int
    settings: AlertSettings


class ScoringWorker(threading.Thread):
    """The scoring thread: drains the queue in micro-batches until stopped and the queue is empty."""

    def __init__(self, batcher: MicroBatcher[Window], engine: Engine, route: AlertRoute, metrics: Metrics, stop: threading.Event) -> None:
        super().__init__(name="scorer", daemon=True)
        self.batcher = batcher
        self.engine = engine
        self.route = route
        self.metrics = metrics
        self.stop_event = stop
        self.last_beat = time.monotonic()

    def run(self) -> None:
        while True:
            self.last_beat = time.monotonic()
            batch = self.batcher.next_batch(self.stop_event)
            if batch:
                self.process(batch)
            elif self.stop_event.is_set() and self.batcher.source.depth() == 0:
                return

    def process(self, batch: list[Window]) -> None:
        """Score one batch and publish an alert for each anomalous window; never raises."""
        engine = self.engine
        try:
            started = time.perf_counter()
            scores = engine.score(np.stack([window.samples for window in batch]))
            self.metrics.inference_seconds.observe(time.perf_counter() - started)
        except Exception:
            log.exception("scoring_failed", batch=len(batch))
            self.metrics.windows_dropped.labels("scoring_error").inc(len(batch))
            return
        decided = time.monotonic()
        self.metrics.batch_size.observe(len(batch))
        self.metrics.windows_scored.inc(len(batch))
        flagged = engine.decision.anomalous(scores.errors)
        for index, window in enumerate(batch):
            self.metrics.latency_seconds.observe(max(decided - window.completed_at, 0.0))
            self.metrics.reconstruction_error.observe(float(scores.errors[index]))
            if flagged[index]:
                self._alert(engine, window, scores, index)

    def _alert(self, engine: Engine, window: Window, scores: Scores, index: int) -> None:
        settings = self.route.settings
        alert = build_alert(
            window.sensor_id,
            window.start_seq,
            engine.window,
            float(scores.errors[index]),
            scores.profiles[index],
            engine.decision.threshold,
            engine.model,
            window.start_ts,
            settings.top_timesteps,
            settings.include_profile,
        )
        self.metrics.anomalies.inc()
        topic = self.route.topic_template.format(sensor_id=window.sensor_id)
        try:
            self.route.publish(topic, orjson.dumps(alert), self.route.qos)
        except Exception as error:
            reason = getattr(error, "reason", "publish_error")
            self.metrics.alerts_dropped.labels(reason).inc()
            log.error("alert_dropped", reason=reason, sensor_id=window.sensor_id, window_start_seq=window.start_seq, score=alert["score"], error=str(error))
            return
        self.metrics.alerts_published.inc()
        log.info(
            "alert_published",
            sensor_id=window.sensor_id,
            window_start_seq=window.start_seq,
            score=round(alert["score"], 5),
            threshold=round(engine.decision.threshold, 5),
        )
