"""The input stage, on paho's network thread: message -> sensor id -> payload -> windowing -> bounded queue.

`Ingest.handle` runs for every message: decode, window, enqueue; it never raises, and every outcome is counted.
It blocks only while the scoring queue is full, for at most `admission_wait_seconds` a window (the input then waits
at the broker); a sensor flooding the queue has its messages dropped before they are decoded, and its windows
beyond its share, so that it costs the others neither room nor waiting.
`housekeeping` evicts idle sensors; the gauges of live state are read when
scraped (`watch_gauges`). With a journal, every message fed is appended to it under the windowing's lock.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from monitor.ecg.beats import UNSCORABLE_REASONS
from monitor.errors import PayloadError
from monitor.ingest.acks import PendingWindows, Receipt
from monitor.ingest.batching import WindowQueue
from monitor.ingest.beat_windowing import BeatAssembler, BeatFeedResult
from monitor.ingest.formats import InputFormats
from monitor.ingest.journal import Journal, Replayed, encode_windows
from monitor.ingest.payload import REJECT_REASONS, TS_IGNORED_REASONS, Message, PayloadDecoder, sensor_id_from_topic
from monitor.ingest.windowing import FeedResult, WindowAssembler
from monitor.model.baseline import SensorBaselines
from monitor.telemetry.log import RateLimiter
from monitor.telemetry.metrics import Metrics
from monitor.window import Window

log = structlog.get_logger("monitor.ingest")
RATE_TOLERANCE = 0.005  # a message's sample_rate_hz within 0.5 % of the configured rate is the same rate
# A sensor is put behind the others only from a quarter of `max_queued_per_sensor` windows on: a backlog spread over
# thousands of sensors holds fewer than that each, so it is scored at full speed.
BEHIND_FLOOR_DIVISOR = 4
WRONG_RATE = "wrong_sample_rate"  # this stage's outcome for a message of another rate than windowing.sample_rate_hz


class Ingest:
    """Message -> sensor id -> samples -> windows -> scoring queue, with every outcome counted."""

    def __init__(
        self,
        decoder: PayloadDecoder,
        assembler: WindowAssembler | BeatAssembler,
        windows: WindowQueue[Window],
        metrics: Metrics,
        sensor_id_level: int,
        warnings: RateLimiter | None = None,
        sensor_id_pattern: str | None = None,
        pending: PendingWindows | None = None,
        journal: Journal | None = None,
        baselines: SensorBaselines | None = None,
        formats: InputFormats | None = None,
        max_queued_per_sensor: int | None = None,
        admission_wait_seconds: float = 0.0,
        sample_rate_hz: float | None = None,
    ) -> None:
        """`pending` tracks the windows cut until they are decided, `journal` keeps the input on disk (both
        optional: without them a crash loses the windows in memory, see RELIABILITY.md); `formats` chooses the
        format of each topic (without it every message is JSON, read by `decoder`). A sensor may hold at most
        `max_queued_per_sensor` windows in `windows` (which must count them by sensor id), and a window waits up to
        `admission_wait_seconds` for room before it is dropped. With `sample_rate_hz` (`windowing.sample_rate_hz`)
        a message that gives another rate is dropped as `wrong_sample_rate`."""
        self.decoder = decoder
        self.formats = formats
        self.sample_rate_hz = sample_rate_hz
        self.ended_streams: list[str] = []  # sensors a Sparkplug DEATH ended, until the housekeeping takes them
        self.assembler = assembler
        self.windows = windows
        self.metrics = metrics
        self.sensor_id_level = sensor_id_level
        self.baselines = baselines  # with `baseline: sensor`: warm-ups and per-sensor normalisation, under the lock
        self.lock = threading.Lock()  # the assembler is touched by paho's thread and by housekeeping
        self._warnings = warnings or RateLimiter(60.0)
        self.sensor_id_pattern = re.compile(sensor_id_pattern) if sensor_id_pattern else None
        self.pending = pending
        self.journal = journal
        self.max_queued_per_sensor = max_queued_per_sensor or windows.capacity
        self.behind_floor = max(1, self.max_queued_per_sensor // BEHIND_FLOOR_DIVISOR)
        self.admission_wait_seconds = admission_wait_seconds
        self._share_drops: Counter[str] = Counter()  # by sensor, since its last `sensor_over_share` line
        self._replay_decided: Counter[tuple[str, int]] = Counter()  # during a replay: windows not to score again
        self._evicted_counted = 0
        metrics.declare(
            metrics.messages, (*REJECT_REASONS, "control", WRONG_RATE)
        )  # control: Sparkplug B without samples
        metrics.declare(metrics.windows_dropped, ("stream_ended",))  # partial windows a Sparkplug B DEATH ended
        metrics.declare(metrics.ts_ignored, TS_IGNORED_REASONS)
        metrics.declare(metrics.beats_unscorable, UNSCORABLE_REASONS)
        self._outcomes = {False: metrics.messages.labels("accepted"), True: metrics.messages.labels("duplicate")}

    def handle(
        self, topic: str, payload: bytes, now: float, receipt: Receipt | None = None, redelivered: bool = False
    ) -> None:
        """Process one message; any failure is counted and logged, never raised into paho.

        With a `receipt`, the message's acknowledgement waits for its journal record to be on disk and for the
        windows it completed to be decided; without one (a replay), it is not journaled again.
        """
        sensor_id = None
        try:
            input_format = "json" if self.formats is None else self.formats.format_of(topic)
            if input_format == "sparkplug_b":
                assert self.formats is not None and self.formats.sparkplug is not None
                outcome = self.formats.sparkplug.read(topic, payload, now)
                if outcome.message is None or outcome.sensor_id is None:
                    self._control(outcome.ended, now)
                    return
                sensor_id, message = outcome.sensor_id, outcome.message
            else:
                sensor_id = sensor_id_from_topic(topic, self.sensor_id_level, self.sensor_id_pattern)
                if self._over_share(sensor_id):  # before the cost of decoding it
                    raise PayloadError("sensor_share", "the sensor's windows fill its share of the scoring queue")
                decoder = self.decoder if self.formats is None or input_format == "json" else self.formats.frame
                message = decoder.decode(payload)
            self._check_rate(message)
            with self.lock:  # the journal's checkpoint takes it too: records, windows and state stay in step
                result: FeedResult | BeatFeedResult = self.assembler.feed(sensor_id, message, now, redelivered)
                windows = result.windows if self.baselines is None else self._after_warm_up(result.windows)
                journal, pending = self.journal, self.pending
                if receipt is not None and journal is not None and pending is not None and not result.duplicate:
                    pending.acks.hold(receipt)  # released by the journal once the record is fsynced
                    journal.append(topic, payload, receipt)
                if pending is not None:
                    for window in windows:
                        pending.add(window, receipt)
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
        self._outcomes[result.duplicate].inc()  # the labelled children, looked up once
        ts_ignored = message.ts_ignored or (
            "backwards" if isinstance(result, FeedResult) and result.ts_backwards else None
        )
        if ts_ignored is not None:
            self.metrics.ts_ignored.labels(ts_ignored).inc()
            if self._warnings.allow((sensor_id, "ts_ignored"), now):
                log.warning("ts_ignored", sensor_id=sensor_id, reason=ts_ignored, seq=message.seq)
        self.metrics.samples.inc(len(message.samples) - result.duplicate_samples if not result.duplicate else 0)
        if result.duplicate_samples:
            self.metrics.duplicate_samples.inc(result.duplicate_samples)
        if result.restart_windows_dropped:
            self.metrics.windows_dropped.labels("seq_restart").inc(result.restart_windows_dropped)
        if result.restarted:
            self.metrics.seq_restarts.inc()
            if self._warnings.allow((sensor_id, "seq_restart"), now):
                log.warning("seq_restart", sensor_id=sensor_id, seq=message.seq)
        if result.gaps:
            self.metrics.seq_gaps.inc(result.gaps)
            if result.gap_windows_dropped:
                self.metrics.windows_dropped.labels("seq_gap").inc(result.gap_windows_dropped)
            if self._warnings.allow((sensor_id, "seq_gap"), now):
                log.warning("seq_gap", sensor_id=sensor_id, seq=message.seq, windows_dropped=result.gap_windows_dropped)
        if isinstance(result, BeatFeedResult):
            self._count_beats(sensor_id, result, now)
        for window in windows:
            if self._replay_decided[(window.sensor_id, window.start_seq)] > 0:
                self._replay_decided[(window.sensor_id, window.start_seq)] -= 1
                self._decided(window)
                continue
            reason = self._admit(window)
            if reason is not None:
                self._decided(window)
                self.metrics.windows_dropped.labels(reason).inc()
                self._log_drop(reason, sensor_id, now)

    def _admit(self, window: Window) -> str | None:
        """Queue the window, or say why not: its sensor floods the queue (`_over_share`: dropped at once, so that no
        other sensor waits for it), or the queue stayed full for `admission_wait_seconds` (meanwhile paho's thread
        reads nothing: the input waits at the broker)."""
        windows = self.windows
        if self._over_share(window.sensor_id):
            return "sensor_share"
        # More than its fair share queued, and more than a few: behind the other sensors' windows (`WindowQueue`),
        # not dropped yet. Without the floor, a backlog of thousands of sensors (fair shares of 2-3 windows) would put
        # them all behind, and the scoring thread would rest from its whole backlog (`MicroBatcher.behind_share`).
        queued = windows.queued_for(window.sensor_id)
        behind = queued >= self.behind_floor and queued > windows.capacity / max(self.assembler.active_sensors, 1)
        if windows.offer(window, behind=behind):
            return None
        if self.admission_wait_seconds <= 0:
            return "queue_full"
        started = time.monotonic()
        queued = windows.offer(window, self.admission_wait_seconds, behind)
        self.metrics.input_waits.inc()
        self.metrics.input_wait_seconds.inc(time.monotonic() - started)
        return None if queued else "queue_full"

    def _over_share(self, sensor_id: str) -> bool:
        """The sensor holds at least `max_queued_per_sensor` queued windows and more than twice its fair share of the
        queue (capacity / active sensors). A backlog of many sensors fills the queue about evenly and waits instead;
        one sensor sending far more than the others loses its excess even while they have nothing queued."""
        return self.windows.over_share(sensor_id, self.max_queued_per_sensor, self.assembler.active_sensors)

    def _log_drop(self, reason: str, sensor_id: str, now: float) -> None:
        """Rate-limited: the queue being full once per interval, a sensor over its share once per sensor and interval
        (with its windows dropped since its last line)."""
        if reason == "queue_full":
            if self._warnings.allow(("queue_full",), now):
                log.warning(
                    "scoring_queue_full",
                    capacity=self.windows.capacity,
                    waited_seconds=self.admission_wait_seconds,
                    sensor_id=sensor_id,
                )
            return
        self._share_drops[sensor_id] += 1
        if self._warnings.allow((sensor_id, "over_share"), now):  # apart from its messages dropped (sensor_share)
            log.warning(
                "sensor_over_share",
                sensor_id=sensor_id,
                windows_dropped=self._share_drops.pop(sensor_id),
                max_queued_per_sensor=self.max_queued_per_sensor,
            )

    def _check_rate(self, message: Message) -> None:
        """A stream sampled at another rate than the configured one would be cut and scored wrongly (beats too long
        or too short), without a sign: refused instead, counted and logged."""
        given, expected = message.sample_rate_hz, self.sample_rate_hz
        if given is None or expected is None:
            return
        if not abs(given - expected) <= RATE_TOLERANCE * expected:  # NaN too
            raise PayloadError(WRONG_RATE, f"{given:g} Hz, windowing.sample_rate_hz is {expected:g}")

    def _control(self, ended: list[str], now: float) -> None:
        """A message without samples (a Sparkplug BIRTH, DEATH, command or host state); a DEATH ends the streams of
        its sensors: their partial windows are dropped, and the episode stage is told at the next housekeeping."""
        self.metrics.messages.labels("control").inc()
        for sensor_id in ended:
            with self.lock:
                dropped = self.assembler.end_stream(sensor_id)
                self.ended_streams.append(sensor_id)
            if dropped:
                self.metrics.windows_dropped.labels("stream_ended").inc(dropped)
            log.info("stream_ended", sensor_id=sensor_id, windows_dropped=dropped)

    def take_ended_streams(self) -> list[str]:
        """The sensors whose stream ended since the last call."""
        with self.lock:
            ended, self.ended_streams = self.ended_streams, []
        return ended

    def _decided(self, window: Window) -> None:
        if self.pending is not None:
            self.pending.decided(window)

    def _after_warm_up(self, windows: Sequence[Window]) -> list[Window]:
        """Warm-up windows are counted and held back; the others come normalised by their sensor's baseline, with
        its score scale as their error scale (1 for a model without one)."""
        assert self.baselines is not None
        ready: list[Window] = []
        for window in windows:
            admitted = self.baselines.admit(window.sensor_id, window.samples)
            if admitted is None:
                self.metrics.windows_warming_up.inc()
            else:
                self.metrics.baseline_clipped_share.observe(float(admitted[1].mean()))
                scale = self.baselines.scale_of(window.sensor_id)
                ready.append(dataclasses.replace(window, samples=admitted[0], error_scale=scale))
        return ready

    def _count_beats(self, sensor_id: str, result: BeatFeedResult, now: float) -> None:
        if not result.beats_found and not result.detector_resets:
            return  # most messages complete no beat: no counter to touch
        self.metrics.beats_found.inc(result.beats_found)
        if result.detector_resets:
            self.metrics.detector_resets.inc(result.detector_resets)
        if result.relearns:
            self.metrics.beat_relearns.inc(result.relearns)
            log.info("beat_rhythm_relearned", sensor_id=sensor_id, relearns=result.relearns)
        if result.noisy_stretch:
            self.metrics.beats_noisy_stretch.inc(result.noisy_stretch)
        for reason, count in result.unscorable.items():
            self.metrics.beats_unscorable.labels(reason).inc(count)
            if reason != "warmup" and self._warnings.allow((sensor_id, "unscorable"), now):
                log.warning("beats_unscorable", sensor_id=sensor_id, reason=reason, beats=count)

    def housekeeping(self, now: float) -> None:
        """Evict idle sensors (called about once a second)."""
        with self.lock:
            self.assembler.evict_idle(now)
            evicted = self.assembler.evicted_total - self._evicted_counted
            active = self.assembler.active_sensors
            warming = 0 if self.baselines is None else self.baselines.sensors_warming_up
            off_baseline = 0 if self.baselines is None else self.baselines.sensors_off_baseline
        if evicted:
            self._evicted_counted += evicted
            self.metrics.sensors_evicted.inc(evicted)
            log.info("sensors_evicted", count=evicted, active=active)
        self.metrics.sensors_warming_up.set(warming)
        self.metrics.sensors_off_baseline.set(off_baseline)

    def snapshot(self) -> dict[str, Any]:
        """What a journal checkpoint holds (the caller holds `lock`): positions, partial windows, undecided windows."""
        pending = self.pending.windows() if self.pending is not None else []
        return {"windowing": self.assembler.snapshot(), "pending": encode_windows(pending), **self.baselines_state()}

    def baselines_state(self) -> dict[str, Any]:
        """The per-sensor baselines' part of a saved state (journal checkpoint or state file): none without them."""
        return {} if self.baselines is None else {"baselines": self.baselines.snapshot()}

    def checkpoint_if_due(self, now: float) -> None:
        if self.journal is not None and self.journal.checkpoint_due(now):
            with self.lock:  # a failure is counted and logged by the journal, and retried at the next call
                self.journal.checkpoint(self.snapshot())

    def replay(self, replayed: Replayed, now: float) -> None:
        """Rebuild the state a crash left in the journal: its checkpoint, its undecided windows (queued again,
        waiting for room: the scorer is running, input is not yet), then its messages, fed again."""
        if replayed.windowing is not None:
            with self.lock:
                try:
                    self.assembler.restore(replayed.windowing, now)
                except ValueError as error:  # another model's or an older format's: its sensors start afresh
                    log.warning("journal_checkpoint_state_discarded", error=str(error)[:300])
                else:
                    self.restore_baselines(replayed.baselines, "journal")
        self._replay_decided = replayed.decided
        for window in replayed.pending:
            if self._replay_decided[(window.sensor_id, window.start_seq)] > 0:
                self._replay_decided[(window.sensor_id, window.start_seq)] -= 1
                continue
            if self.pending is not None:
                self.pending.add(window, None)
            while not self.windows.offer(window):
                time.sleep(0.01)
        for topic, payload in replayed.messages:
            while self.windows.depth() > self.windows.capacity // 2:  # never drop a replayed window for room
                time.sleep(0.01)
            self.handle(topic, payload, now)
        self._replay_decided = Counter()

    def restore_baselines(self, state: Any, source: str) -> None:
        """Take back the baselines, warm-ups and score scales of the restored sensors (the caller holds `lock`);
        without them, or from another model, each sensor starts a new warm-up."""
        if self.baselines is None:
            return
        try:
            restored = self.baselines.restore(state, self.assembler.sensor_ids())
        except ValueError as error:
            log.warning("baseline_state_discarded", source=source, error=str(error)[:300])
        else:
            log.info(
                "baseline_state_restored", source=source, sensors=restored, warming_up=self.baselines.sensors_warming_up
            )

    def watch_gauges(self) -> None:
        """Queue depth, active sensors, buffered samples, unacknowledged input and undecided windows are read when
        scraped."""

        def locked(read: Callable[[], float]) -> Callable[[], float]:
            def under_lock() -> float:
                with self.lock:
                    return read()

            return under_lock

        assembler, pending = self.assembler, self.pending
        self.metrics.watch(
            self.windows.depth,
            locked(lambda: assembler.active_sensors),
            locked(assembler.buffered_samples),
            (lambda: pending.acks.unacknowledged()) if pending is not None else (lambda: 0),
            (lambda: len(pending)) if pending is not None else (lambda: 0),
        )
