"""The scoring thread: next batch -> engine -> alert sink, until stopped and the queue is empty.

The engine and the sink are swapped together (`swap`, one assignment) when SIGHUP reloads them, so a batch
is always scored and alerted by a matching pair. `progress_at` is the worker's heartbeat: it moves after
every batch and every idle poll, never inside a forward pass, so the daemon can tell a hung scorer from
a busy one and stop feeding systemd's watchdog.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import structlog

from monitor.alerts import AlertSink
from monitor.batching import MicroBatcher
from monitor.engine import Engine
from monitor.metrics import Metrics
from monitor.windowing import Window

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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name="scorer", daemon=True)
        self.batcher = batcher
        self.metrics = metrics
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
            scores = engine.score(np.stack([window.samples for window in batch]))
            self.metrics.inference_seconds.observe(time.perf_counter() - started)
        except Exception:
            log.exception("scoring_failed", batch=len(batch))
            self.metrics.windows_dropped.labels("scoring_error").inc(len(batch))
            return
        decided = self.clock()
        self.metrics.batch_size.observe(len(batch))
        self.metrics.windows_scored.inc(len(batch))
        for index, window in enumerate(batch):
            self.metrics.latency_seconds.observe(max(decided - window.completed_at, 0.0))
            self.metrics.reconstruction_error.observe(float(scores.errors[index]))
        sink.handle(batch, scores, engine)
