"""`monitor run`: wires the stages together and runs the daemon's lifecycle.

Start: signals (recorded from the first moment, `monitor.runtime.signals`) -> config -> logging -> engine -> metrics ->
ingest -> scoring thread -> journal replay -> MQTT.
Stop (SIGTERM/SIGINT): stop taking input -> score what is queued -> wait (bounded) for the broker to
acknowledge queued alerts -> acknowledge the input -> journal checkpoint -> disconnect -> stop the metrics server
-> exit 0; all of it within `health.stop_timeout_seconds`, else what was left is logged (`stop_incomplete`) and
the exit code is 1. A scorer stalled for `health.stall_exit_seconds`, or paho's network thread found dead, ends
the process the same way with exit code 1, for systemd to restart it.
Input acknowledgements (monitor.ingest.acks) are sent by the main loop, in arrival order, as messages are released.
Reload (SIGHUP): re-read the config and the model and apply what can change live (`LIVE_SETTINGS`); every other
changed setting is logged by key as needing a restart. A broken config or model is logged and the running one kept.
With `windowing.state_file`, the drain saves the sensors' partial windows and the next start takes them back,
with the per-sensor baselines and warm-ups when `windowing.baseline` is `sensor`.
The systemd watchdog is fed only while the scoring thread makes progress (see `ScoringWorker.progress_at`).
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from monitor.alerts.drift import DriftWatch
from monitor.alerts.episode_sink import EpisodeSink, read_retained, state_filter
from monitor.alerts.episodes import EpisodeTracker
from monitor.alerts.shadow import ShadowComparison
from monitor.alerts.sink import AlertSink
from monitor.config.schema import Config, ModelSettings, WindowingSettings, load_config
from monitor.errors import ConfigError, MonitorError
from monitor.ingest.acks import InOrderAcks, PendingWindows
from monitor.ingest.batching import MicroBatcher, WindowQueue
from monitor.ingest.beat_windowing import check_mode, make_assembler
from monitor.ingest.formats import InputFormats
from monitor.ingest.journal import Journal
from monitor.ingest.payload import PayloadDecoder
from monitor.ingest.stage import Ingest
from monitor.ingest.state_file import read_state, write_state
from monitor.model.artifact import artifact_problem
from monitor.model.baseline import SensorBaselines, resolve_baseline
from monitor.model.engine import Engine, EngineScales, load_engine, load_shadow_engine
from monitor.mqtt.connection import MqttConnection
from monitor.runtime import signals, systemd
from monitor.runtime.worker import ScoringWorker
from monitor.telemetry.log import RateLimiter, configure_logging
from monitor.telemetry.metrics import Metrics, serve_metrics

log = structlog.get_logger("monitor.daemon")

HOUSEKEEPING_SECONDS = 1.0
SIGNAL_POLL_SECONDS = 0.05
CLOSE_RESERVE_SECONDS = 2.0  # of the stop timeout, kept for the status message, the disconnect and the metrics server
# Settings a SIGHUP applies to the running daemon (a key, or a whole section ending in "."); any other changed
# setting is logged as `reload_needs_restart` with its key.
LIVE_SETTINGS = (
    "model.",
    "alerts.",
    "drift.",
    "mqtt.alert_topic",
    "mqtt.alert_qos",
    "batching.max_wait_seconds",
    "batching.behind_share",
    "batching.behind_batch",
    "logging.level",
)
RESTART_SETTINGS = ("alerts.lifecycle.",)  # within the live sections: the episode tracker keeps its start settings

EngineLoader = Callable[[ModelSettings], Engine]


def flatten(section: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """`{"mqtt": {"host": h}}` as `("mqtt.host", h)`."""
    for key, value in section.items():
        if isinstance(value, dict):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def changed_settings(old: Config, new: Config) -> list[str]:
    """The dotted keys whose values differ between two configs."""
    before, after = dict(flatten(old.model_dump())), dict(flatten(new.model_dump()))
    return sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))


def applies_live(key: str) -> bool:
    if key.startswith(RESTART_SETTINGS):
        return False
    return any(key.startswith(live) if live.endswith(".") else key == live for live in LIVE_SETTINGS)


def warm_up_windows(engine: Engine, windowing: WindowingSettings, source: str = "config") -> int | None:
    """A sensor's warm-up with `baseline: sensor` (None for `model`); a config not fitting the model is refused."""
    where = f"{source}: windowing.baseline"
    return resolve_baseline(engine.baseline, windowing.baseline, windowing.baseline_windows, where)


class Daemon:
    """The running monitor: one instance per process."""

    def __init__(
        self,
        config: Config,
        config_path: str | Path | None,
        registry: CollectorRegistry | None = None,
        engine_loader: EngineLoader = load_engine,
    ) -> None:
        self.config = config
        self.started_config = config  # what the settings that need a restart still have
        self.config_path = config_path
        self.registry = registry or CollectorRegistry()
        self.load_engine = engine_loader
        self.stop = threading.Event()
        self.signals = signals.received
        self.stall_seconds = config.health.stall_seconds
        self.stalled = False
        self.health_status = ""  # the last STATUS= sent to systemd
        self.exit_code = 0
        self.acks = InOrderAcks()
        journal = config.journal
        self.journal = (
            None
            if journal.path is None
            else Journal(
                journal.path,
                self.acks.release,
                journal.sync_interval_seconds,
                journal.max_bytes,
                journal.checkpoint_seconds,
            )
        )
        self.pending = PendingWindows(self.acks, self.journal.mark_decided if self.journal is not None else None)
        log_settings = config.logging  # one limiter for the input's and the alerts' rate-limited lines
        self.warnings = RateLimiter(
            log_settings.warning_interval_seconds, log_settings.max_warning_keys, log_settings.max_warnings_per_interval
        )

    def run(self) -> int:
        """Run until SIGTERM/SIGINT, then drain; returns the exit code."""
        signals.install()
        self.init_model()
        self.init_metrics()
        self.init_ingest()
        self.start_scoring()
        if not self.replay_journal():
            return self.abandon()
        # What start-up made (the model, torch, the modules) is never garbage: out of the collector's sight, a full
        # collection no longer walks it, so its pauses, which every window queued meanwhile waits for, stay short.
        gc.collect()
        gc.freeze()
        self.start_mqtt()
        self.main_loop()
        code = self.drain()
        if self.worker.is_alive():
            # A scorer stuck in a forward pass would hold up the interpreter's exit past the stop timeout.
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code

    def init_model(self) -> None:
        self.engine = self.load_engine(self.config.model)
        check_mode(self.config.windowing, self.engine, self.config.model.path, self.config.origin)
        self.warm_up = warm_up_windows(self.engine, self.config.windowing, str(self.config_path or "config"))
        log.info("model_loaded", path=str(self.config.model.path), **self.engine.describe())
        self.shadow = load_shadow_engine(self.config.model, self.engine, self.load_engine)
        if self.shadow is not None:
            log.info("shadow_model_loaded", path=str(self.config.model.shadow_path), **self.shadow.describe())

    def init_metrics(self) -> None:
        self.metrics = Metrics(self.registry, self.config.batching.max_batch, self.engine.threshold)
        if self.journal is not None:
            self.journal.metrics = self.metrics
        self._set_model_metrics()
        self.metrics.queue_capacity.set(self.config.batching.queue_capacity)
        count = self.config.partitions.count if self.config.partitions else None
        self.metrics.set_instance(self.config.instance_name, self.config.consumed_partitions, count)
        self.metrics_server = None
        settings = self.config.metrics
        if settings.enabled:
            try:
                self.metrics_server = serve_metrics(
                    self.registry,
                    settings.host,
                    settings.port,
                    settings.max_connections,
                    settings.timeout_seconds,
                    self.metrics.metrics_refused,
                )
            except OSError as error:
                raise ConfigError(f"metrics: cannot listen on {settings.host}:{settings.port} ({error})") from None
            log.info("metrics_serving", host=settings.host, port=self.metrics_server.server_port, path="/metrics")

    def _set_model_metrics(self) -> None:
        engine, shadow = self.engine, self.shadow
        self.metrics.set_model(engine.model.name, engine.model.version, engine.backend, engine.device, engine.threshold)
        if shadow is None:
            self.metrics.set_shadow(None, None, None)
        else:
            self.metrics.set_shadow(shadow.model.name, shadow.model.version, shadow.threshold)

    def init_ingest(self) -> None:
        config = self.config
        windowing = config.windowing
        engine = self.engine
        baselines = (
            None
            if self.warm_up is None
            else SensorBaselines(
                self.warm_up,
                engine.window,
                engine.channels,
                engine.baseline_follow_rate,
                EngineScales(lambda: self.engine) if engine.score_scale else None,
            )
        )
        self.queue: WindowQueue = WindowQueue(config.batching.queue_capacity, key=lambda window: window.sensor_id)
        assembler = make_assembler(windowing, self.engine, on_evict=None if baselines is None else baselines.forget)
        decoder = PayloadDecoder(
            assembler.channels,
            windowing.max_samples_per_message,
            windowing.max_payload_bytes,
            windowing.max_abs_value,
            windowing.ts_range,
        )
        self.ingest = Ingest(
            decoder,
            assembler,
            self.queue,
            self.metrics,
            config.mqtt.sensor_id_level,
            self.warnings,
            config.mqtt.sensor_id_pattern,
            self.pending,
            self.journal,
            baselines,
            None if config.input.json_only else InputFormats(config.input, decoder),
            max_queued_per_sensor=config.batching.max_queued_per_sensor,
            admission_wait_seconds=config.batching.admission_wait_seconds,
            sample_rate_hz=windowing.sample_rate_hz,
        )
        self.ingest.watch_gauges()
        if self.journal is None:  # the journal's checkpoint holds the partial windows, and more
            self.restore_windows()
        elif windowing.state_file is not None and windowing.state_file.exists():
            log.warning(
                "window_state_ignored",
                path=str(windowing.state_file),
                reason="journal.path is set: the journal holds the partial windows; the file is left as it is",
            )

    def replay_journal(self) -> bool:
        """Take back what the journal holds (a crash or a stop left it), then start a fresh one from that state.
        A damaged file is renamed aside (kept, never overwritten) and what could be read of it replayed. False, after
        one error line, when the journal cannot be read or written at all (a directory, unreadable, a full disk)."""
        journal = self.journal
        if journal is None:
            return True
        now = time.monotonic()
        try:
            if journal.path.is_dir():
                raise IsADirectoryError(errno.EISDIR, "journal.path is a directory", str(journal.path))
            replayed = journal.load(now)
        except OSError as error:
            log.error("journal_unusable", path=str(journal.path), error=str(error), exit_code=1)
            return False
        except ValueError as error:
            replayed = None
            size = journal.path.stat().st_size
            self.metrics.journal_discarded.labels("unreadable").inc(size)
            if not self.set_journal_aside("journal_unreadable", error=str(error)[:300], bytes=size):
                return False
        if replayed is not None:
            self.ingest.replay(replayed, now)
            self.metrics.journal_replayed.inc(len(replayed.messages))
            self.metrics.journal_discarded.labels("torn").inc(replayed.torn_bytes)
            self.metrics.journal_discarded.labels("damaged").inc(replayed.damaged_bytes)
            if replayed.damaged_spans and not self.set_journal_aside(
                "journal_damaged",
                damaged_bytes=replayed.damaged_bytes,
                damaged_spans=replayed.damaged_spans,
                checkpoint_lost=replayed.checkpoint_lost,
                messages_replayed=len(replayed.messages),
            ):
                return False
            log.info(
                "journal_replayed",
                path=str(journal.path),
                pending_windows=len(replayed.pending),
                messages=len(replayed.messages),
                torn_bytes=replayed.torn_bytes,
                damaged_bytes=replayed.damaged_bytes,
                sensors=self.ingest.assembler.active_sensors,
            )
        with self.ingest.lock:
            try:
                journal.start(self.ingest.snapshot())
            except OSError as error:  # the file the last run left is still in place: the next start replays it
                log.error("journal_unusable", path=str(journal.path), error=str(error), exit_code=1)
                return False
        return True

    def set_journal_aside(self, event: str, **details: object) -> bool:
        """Log a damaged or unreadable journal at error level and rename it aside; False when it cannot be moved."""
        assert self.journal is not None
        try:
            aside = self.journal.set_aside()
        except OSError as error:
            log.error(event, path=str(self.journal.path), kept_as=None, **details)
            log.error("journal_unusable", path=str(self.journal.path), error=str(error), exit_code=1)
            return False
        log.error(event, path=str(self.journal.path), kept_as=str(aside), **details)
        return True

    def abandon(self) -> int:
        """End a start that cannot go on (the input was never taken): exit code 1, for systemd to try again."""
        self.stop.set()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        log.info("stopped", drain_seconds=0.0, exit_code=1)
        return 1

    def restore_windows(self) -> None:
        """Take back the partial windows the last drain saved; a file that does not fit is logged and ignored."""
        path = self.config.windowing.state_file
        if path is None or not path.exists():
            return
        assembler = self.ingest.assembler
        try:
            state, damaged = read_state(path)
            sensors = assembler.restore(state, time.monotonic(), self.config.windowing.max_abs_value)
            refused = assembler.refused
            log.info("window_state_restored", path=str(path), sensors=sensors, samples=assembler.buffered_samples())
            if damaged or refused:
                log.warning(
                    "window_state_entries_discarded",
                    path=str(path),
                    damaged_lines=damaged,
                    refused_sensors=len(refused),
                    refused=refused[:10],
                )
        except (OSError, ValueError) as error:
            log.warning("window_state_discarded", path=str(path), error=str(error)[:300])
        else:
            self.ingest.restore_baselines(state.get("baselines"), str(path))
        try:
            path.unlink()  # taken once: after a crash the sensors' positions in it would be stale
        except OSError as error:
            log.warning("window_state_not_removed", path=str(path), error=str(error))

    def save_windows(self) -> None:
        """Write the partial windows for the next start (atomically); called once no message can arrive."""
        path = self.started_config.windowing.state_file
        if path is None:
            return
        state = {**self.ingest.assembler.snapshot(), **self.ingest.baselines_state()}
        try:
            write_state(path, state)
        except OSError as error:
            log.error("window_state_not_saved", path=str(path), error=str(error))
            return
        samples = self.ingest.assembler.buffered_samples()
        log.info("window_state_saved", path=str(path), sensors=len(state["sensors"]), samples=samples)

    def make_sink(self, config: Config) -> AlertSink:
        mqtt = config.mqtt
        shadow = None if self.shadow is None else ShadowComparison(self.shadow, self.metrics)
        observers = [stage for stage in (self.episodes, self.drift, shadow) if stage is not None]
        sources = config.input.sparkplug.alert_sources() if config.input.uses("sparkplug_b") else {}
        return AlertSink(
            self.connection,
            mqtt.alert_topic,
            mqtt.alert_qos,
            config.alerts,
            self.metrics,
            observers,
            sources,
            instance=config.instance_name,
            over_share=self.alerts_over_share,
            warnings=self.warnings,
        )

    def alerts_over_share(self, sensor_id: str) -> bool:
        """A sensor holding `mqtt.max_pending_alerts_per_sensor` unacknowledged alerts and more than twice its fair
        share of the alert queue (capacity / active sensors) loses its further alerts."""
        mqtt = self.config.mqtt
        fair_share = mqtt.max_queued_alerts / max(self.ingest.assembler.active_sensors, 1)
        return self.pending.alerts_over_share(sensor_id, mqtt.max_pending_alerts_per_sensor, fair_share)

    def make_drift(self, config: Config, engine: Engine) -> DriftWatch | None:
        """The drift stage for this engine, or None when off or when the artifact records no calibration scores."""
        watch = None
        if config.drift.enabled and engine.calibration is None:
            log.info("drift_unavailable", reason="the model records no calibration_scores", **engine.describe())
        elif config.drift.enabled and engine.calibration is not None:
            watch = DriftWatch(engine.calibration, config.drift, self.metrics, config.windowing.max_sensors)
        if watch is None:
            self.metrics.drift_psi.set(float("nan"))
            self.metrics.drift_psi_bound.set(float("nan"))
        return watch

    def init_episodes(self) -> None:
        """The episode stage, resumed from the retained states, before any input can arrive."""
        self.episodes: EpisodeSink | None = None
        config = self.config
        lifecycle = config.alerts.lifecycle
        if not lifecycle.enabled:
            return
        tracker = EpisodeTracker(lifecycle.policy(), config.windowing.max_sensors, tick=time.monotonic)
        self.episodes = EpisodeSink(
            tracker, self.connection, lifecycle, self.metrics, self.engine, top_channels=config.alerts.top_channels
        )
        if lifecycle.resume_timeout_seconds <= 0:
            return
        topic_filter = state_filter(lifecycle.state_topic)
        payloads = read_retained(config.mqtt, topic_filter, lifecycle.resume_timeout_seconds)
        if payloads is None:
            return
        partitions = config.partitions  # several instances: each takes back only its own sensors' episodes
        restored, unreadable = self.episodes.restore(
            payloads, lambda sensor_id: partitions is None or partitions.owns(sensor_id)
        )
        log.info(
            "episode_states_restored",
            topics=topic_filter,
            states=restored,
            unreadable=unreadable,
            open_episodes=len(tracker.open_episodes()),
        )

    def start_scoring(self) -> None:
        batching = self.config.batching
        self.batcher = MicroBatcher(
            self.queue,
            batching.max_batch,
            batching.max_wait_seconds,
            behind_share=batching.behind_share,
            behind_batch=batching.behind_batch,
        )
        self.connection = MqttConnection(
            self.config.mqtt, self.ingest.handle, self.metrics, self.acks, self.pending, self.config.partitions
        )
        sparkplug = self.ingest.formats.sparkplug if self.ingest.formats is not None else None
        if sparkplug is not None:
            sparkplug.publish = self.connection.send_command
        self.init_episodes()
        self.drift = self.make_drift(self.config, self.engine)
        self.worker = ScoringWorker(
            self.batcher, self.engine, self.make_sink(self.config), self.metrics, self.stop, self.pending
        )
        self.worker.start()

    def start_mqtt(self) -> None:
        self.connection.start()

    def handle_signals(self) -> None:
        while self.signals:
            received = self.signals.pop(0)
            log.info("signal_received", signal=signal.Signals(received).name)
            if received == signal.SIGHUP:
                self.reload()
            else:
                self.stop.set()

    def main_loop(self) -> None:
        """Signals, systemd readiness, housekeeping and the watchdog; returns when asked to stop."""
        ready_sent = False
        next_housekeeping = 0.0
        while not self.stop.wait(SIGNAL_POLL_SECONDS):
            self.handle_signals()
            self.connection.acknowledge()
            if not ready_sent and self.connection.subscribed.is_set():
                ready_sent = True
                systemd.ready()
                log.info("ready", subscriptions=self.started_config.mqtt.subscribe)
            now = time.monotonic()
            if now >= next_housekeeping:
                next_housekeeping = now + HOUSEKEEPING_SECONDS
                self.housekeeping(now)

    def housekeeping(self, now: float) -> None:
        """Evict idle sensors, refresh gauges, and feed the watchdog only while the scorer makes progress."""
        self.ingest.housekeeping(now)
        ended = self.ingest.take_ended_streams()
        if ended and self.episodes is not None:
            self.episodes.end_streams(ended)
        idle_seconds = self.started_config.windowing.idle_eviction_seconds
        for stage in (self.episodes, self.drift):
            if stage is not None:
                stage.housekeeping(idle_seconds)
        self.ingest.checkpoint_if_due(now)
        if not self.connection.network_thread_alive():
            log.error("network_thread_died")
            self.fail()
        if not self.worker.is_alive():
            log.error("scoring_thread_died")
            self.fail()
        elif self.worker.progressing(now, self.stall_seconds):
            if self.stalled:
                self.stalled = False
                log.info("scoring_resumed")
            systemd.watchdog_ping()
        elif not self.stalled:
            self.stalled = True
            log.error("scoring_stalled", seconds=round(now - self.worker.progress_at, 1), queued=self.queue.depth())
        elif not self.worker.progressing(now, self.config.health.stall_exit_seconds):
            log.error(
                "scoring_stalled_exit", seconds=round(now - self.worker.progress_at, 1), queued=self.queue.depth()
            )
            self.fail()
        status = self.health()
        if status != self.health_status:
            self.health_status = status
            systemd.status(status)

    def health(self) -> str:
        """What is wrong, for `systemctl status` ("healthy" when nothing is); each part has its metric and log line."""
        input_up, alerts_up = self.connection.connected()
        problems = (
            (not input_up, "input connection down"),
            (not alerts_up, "alert connection down"),
            (self.journal is not None and self.journal.failing, "journal failing: input not acknowledged"),
            (self.stalled, "scoring stalled"),
        )
        return "; ".join(text for wrong, text in problems if wrong) or "healthy"

    def fail(self) -> None:
        """Stop as after SIGTERM, but with exit code 1, so systemd restarts the daemon."""
        self.exit_code = 1
        self.stop.set()

    def reload(self) -> None:
        """Re-read config and model; apply the live settings, log the others by key; keep the old ones if broken."""
        systemd.reloading()
        try:
            config = load_config(self.config_path, check_model=artifact_problem) if self.config_path else self.config
            engine = self.load_engine(config.model)
            check_mode(self.started_config.windowing, engine, config.model.path, config.origin)
            if engine.segmentation != self.engine.segmentation:
                raise ConfigError("the new model cuts beats differently from the running one: restart the daemon")
            if (engine.window, engine.channels) != (self.engine.window, self.engine.channels):
                raise ConfigError(
                    f"the new model takes windows of {engine.window}x{engine.channels}, the running one "
                    f"{self.engine.window}x{self.engine.channels}: restart the daemon to change shape"
                )
            if engine.baseline[0] != self.engine.baseline[0]:
                raise ConfigError(
                    f"the new model was trained with baseline {engine.baseline[0]!r}, the running one with "
                    f"{self.engine.baseline[0]!r}: restart the daemon to change windowing.baseline"
                )
            if engine.baseline_follow_rate != self.engine.baseline_follow_rate:
                raise ConfigError(
                    f"the new model's sensor baselines follow drift at rate {engine.baseline_follow_rate}, the running "
                    f"one's at {self.engine.baseline_follow_rate}: restart the daemon to change it"
                )
            if (engine.score_scale, engine.score_scale and engine.identity) != (
                self.engine.score_scale,
                self.engine.score_scale and self.engine.identity,
            ):
                raise ConfigError(
                    "the sensors' score scales were measured by the running model: restart the daemon to change the "
                    "model (its sensors then start new warm-ups)"
                )
            shadow = load_shadow_engine(config.model, engine, self.load_engine)
        except MonitorError as error:
            self.metrics.model_reloads.labels("failure").inc()
            log.error("reload_failed", error=str(error), keeping_model=self.engine.model.version)
        else:
            self.shadow = shadow
            self.apply(config, engine)
            self.metrics.model_reloads.labels("success").inc()
            log.info("reloaded", **engine.describe())
        systemd.ready()

    def apply(self, config: Config, engine: Engine) -> None:
        """Put a reloaded config and engine into effect, as far as a running daemon can."""
        previous, previous_config = self.engine, self.config
        self.engine, self.config = engine, config
        drift_inputs = (engine.model, engine.calibration, config.drift)
        if drift_inputs != (previous.model, previous.calibration, previous_config.drift):
            self.drift = self.make_drift(config, engine)
        self.worker.swap(engine, self.make_sink(config))
        self.batcher.max_wait_seconds = config.batching.max_wait_seconds
        self.batcher.behind_share = config.batching.behind_share
        self.batcher.behind_batch = config.batching.behind_batch
        logging.getLogger().setLevel(config.logging.level.upper())
        if engine.threshold != previous.threshold:
            self.metrics.rebuild_error_buckets(engine.threshold)
        self._set_model_metrics()
        for key in changed_settings(self.started_config, config):
            if not applies_live(key):
                log.warning("reload_needs_restart", key=key)

    def drain(self) -> int:
        """Stop input, score the backlog, wait for alert acknowledgements, acknowledge the input, checkpoint the
        journal, disconnect; all within `health.stop_timeout_seconds`. Returns the exit code."""
        started = time.monotonic()
        deadline = started + self.started_config.health.stop_timeout_seconds - CLOSE_RESERVE_SECONDS
        systemd.stopping()
        log.info("draining", queued_windows=self.queue.depth())
        self.connection.stop_input()
        self.stop.set()
        self.worker.join(max(0.0, deadline - time.monotonic()))
        if self.episodes is not None:
            log.info("episode_states_published", sensors=self.episodes.publish_open_states())
        wait = min(self.started_config.mqtt.drain_timeout_seconds, max(0.0, deadline - time.monotonic()))
        if not self.connection.wait_for_acknowledgements(wait):
            log.warning("alerts_unacknowledged_at_exit", pending=self.connection.pending_alerts())
        if self.journal is not None:
            with self.ingest.lock:  # fsyncs: the last records are released too
                if not self.journal.close(self.ingest.snapshot()):
                    self.exit_code = 1  # the last run's file is kept: the next start replays it
        else:
            self.save_windows()
        self.connection.acknowledge()
        undecided, unacknowledged = len(self.pending), self.acks.unacknowledged()
        if undecided or unacknowledged or self.worker.is_alive():
            self.exit_code = 1
            log.error(
                "stop_incomplete",
                undecided_windows=undecided,
                unacknowledged_input=unacknowledged,
                pending_alerts=self.connection.pending_alerts(),
                scorer_running=self.worker.is_alive(),
                kept_by="the journal and the broker"
                if self.journal is not None
                else "the broker (unacknowledged input)",
            )
        self.connection.close()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        log.info("stopped", drain_seconds=round(time.monotonic() - started, 3), exit_code=self.exit_code)
        return self.exit_code


def instance_context(config: Config) -> dict[str, object]:
    """Fields every log line of this process carries: which instance, and which partitions it consumes."""
    context: dict[str, object] = {"instance": config.instance_name}
    if config.partitions is not None:
        context["partitions"] = config.consumed_partitions
    return context


def run(config_path: str | Path) -> int:
    config = load_config(config_path, check_model=artifact_problem)
    configure_logging(config.logging.level, config.logging.format, instance_context(config))
    return Daemon(config, config_path).run()
