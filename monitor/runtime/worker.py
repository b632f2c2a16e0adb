"""The scoring thread: next batch -> engine -> alert sink, until stopped and the queue is empty.

The engine and the sink are swapped together (`swap`, one assignment) when SIGHUP reloads them, so a batch
is always scored and alerted by a matching pair. `progress_at` is the worker's heartbeat: it moves after
every batch and every idle poll, never inside a forward pass, so the daemon can tell a hung scorer from
a busy one and stop feeding systemd's watchdog.

Every window taken is decided in `pending` (monitor.ingest.acks): when its alert is queued the broker's acknowledgement
decides it, otherwise it is decided here (not anomalous, alert dropped, scoring failed). A score that is not
finite (inf/NaN; the decoder's magnitude bound makes it unexpected) is never observed or alerted: the window is
dropped, counted as `non_finite_score` and logged.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import structlog

from monitor.alerts.sink import AlertSink
from monitor.ingest.acks import PendingWindows
from monitor.ingest.batching import MicroBatcher
from monitor.model.engine import Engine
from monitor.model.scoring import Scores
from monitor.telemetry.metrics import Metrics
from monitor.window import Window

log = structlog.get_logger("monitor.worker")


class ScoringWorker(threading.Thread):
    """Drains the queue in micro-batches until `stop` is set and the queue is empty."""

    def __init__(
        self,
        batcher: MicroBatcher[Window],
        engine: Engine,
        sink: AlertSink,
        metrics: Metrics,
        stop: threading.Event,
        pending: PendingWindows,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name="scorer", daemon=True)
        self.batcher = batcher
        self.metrics = metrics
        self.pending = pending
        self.stop_event = stop
        self.clock = clock
        self._stage = (engine, sink)
        self.progress_at = clock()

    @property
    def engine(self) -> Engine:
        return self._stage[0]

    @property
    def sink(self) -> AlertSink:
        return self._stage[1]

    def swap(self, engine: Engine, sink: AlertSink) -> None:
        """Use `engine` and `sink` from the next batch on (one atomic assignment)."""
        self._stage = (engine, sink)

    def progressing(self, now: float, stall_seconds: float) -> bool:
        """True while the worker finished a batch or an idle poll within the last `stall_seconds`."""
        return now - self.progress_at < stall_seconds

    def run(self) -> None:
        while True:
            batch = self.batcher.next_batch(self.stop_event)
            if batch:
                self.process(batch)
            elif self.stop_event.is_set() and self.batcher.source.depth() == 0:
                return
            self.progress_at = self.clock()

    def process(self, batch: list[Window]) -> None:
        """Score one batch and hand it to the alert sink; never raises."""
        engine, sink = self._stage
        try:
            started = time.perf_counter()
            scores = engine.score_windows(batch)
            self.metrics.inference_seconds.observe(time.perf_counter() - started)
        except Exception:
            log.exception("scoring_failed", batch=len(batch))
            self.metrics.windows_dropped.labels("scoring_error").inc(len(batch))
            self._decided(batch, {})
            return
        decided = self.clock()
        self.metrics.batch_size.observe(len(batch))
        finite = np.isfinite(scores.errors)
        if not finite.all():
            batch, scores = self._drop_non_finite(batch, scores, finite)
        self.metrics.windows_scored.inc(len(batch))
        wall = time.time()
        for index, window in enumerate(batch):
            self.metrics.latency_seconds.observe(max(decided - window.completed_at, 0.0))
            if window.start_ts is not None:
                self.metrics.window_age_seconds.observe(max(wall - window.start_ts, 0.0))
            self.metrics.reconstruction_error.observe(float(scores.errors[index]))
        self._decided(batch, sink.handle(batch, scores, engine))

    def _drop_non_finite(self, batch: list[Window], scores: Scores, finite: np.ndarray) -> tuple[list[Window], Scores]:
        dropped = [window for window, ok in zip(batch, finite, strict=True) if not ok]
        self.metrics.windows_dropped.labels("non_finite_score").inc(len(dropped))
        log.error(
            "non_finite_score",
            windows=len(dropped),
            sensor_id=dropped[0].sensor_id,
            window_start_seq=dropped[0].start_seq,
        )
        self._decided(dropped, {})
        return [window for window, ok in zip(batch, finite, strict=True) if ok], scores.select(finite)

    def _decided(self, batch: list[Window], alerts: dict[int, int]) -> None:
        """Windows with a queued alert wait for its acknowledgement; the others are decided now."""
        for index, window in enumerate(batch):
            if index in alerts:
                self.pending.alert_sent(window, alerts[index])
            else:
                self.pending.decided(window)
