"""`monitor run`: wires the stages together and runs the daemon's lifecycle.

Start: config -> logging -> model -> metrics -> pipeline -> scoring thread -> MQTT -> signals.
Stop (SIGTERM/SIGINT): stop taking input -> score what is queued -> wait (bounded) for the broker to
acknowledge queued alerts -> disconnect -> stop the metrics server -> exit 0.
Reload (SIGHUP): re-read the config and the model; a broken one is logged and the old one kept.
With `windowing.state_file`, the drain saves the sensors' partial windows and the next start takes them back.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import orjson
import structlog
import torch
from prometheus_client import CollectorRegistry

from monitor import systemd
from monitor.artifact import load_artifact
from monitor.batching import MicroBatcher, WindowQueue
from monitor.config import Config, ModelSettings, load_config
from monitor.errors import ConfigError, MonitorError
from monitor.log import configure_logging
from monitor.metrics import Metrics, serve_metrics
from monitor.payload import PayloadDecoder
from monitor.pipeline import AlertRoute, Engine, Ingest, ScoringWorker
from monitor.scoring import Scorer, resolve_device
from monitor.source import MqttConnection
from monitor.windowing import WindowAssembler

log = structlog.get_logger("monitor.daemon")

HOUSEKEEPING_SECONDS = 1.0
SIGNAL_POLL_SECONDS = 0.05
LIFECYCLE_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def build_engine(settings: ModelSettings) -> tuple[Engine, dict[str, str]]:
    """Load the artifact and make the scoring engine; raises a MonitorError for a broken model."""
    device = resolve_device(settings.device)
    if settings.threads and settings.threads != torch.get_num_threads():
        torch.set_num_threads(settings.threads)
    artifact = load_artifact(settings.path, device)
    if settings.backend == "onnx":
        from monitor.onnx_backend import OnnxScorer

        score = OnnxScorer(artifact, threads=settings.threads).score
    else:
        score = Scorer(artifact, device).score
    engine = Engine(score, artifact.threshold, artifact.window, artifact.name, artifact.version)
    info = {
        "name": artifact.name,
        "version": artifact.version,
        "backend": settings.backend,
        "device": str(device),
        "window": str(artifact.window),
        "channels": str(artifact.channels),
    }
    return engine, info


class Daemon:
    """The running monitor: one instance per process."""

    def __init__(self, config: Config, config_path: str | Path | None, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.registry = registry or CollectorRegistry()
        self.stop = threading.Event()
        self.signals: list[int] = []

    def run(self) -> int:
        """Run until SIGTERM/SIGINT, then drain; returns the exit code."""
        self.init_model()
        self.init_metrics()
        self.init_pipeline()
        self.start_scoring()
        self.start_mqtt()
        self.install_signal_handlers()
        self.main_loop()
        return self.drain()

    def init_model(self) -> None:
        self.engine, self.model_info = build_engine(self.config.model)
        log.info("model_loaded", path=str(self.config.model.path), threshold=self.engine.decision.threshold, **self.model_info)

    def init_metrics(self) -> None:
        self.metrics = Metrics(self.registry, self.config.batching.max_batch, self.engine.decision.threshold)
        self._set_model_metrics()
        self.metrics.queue_capacity.set(self.config.batching.queue_capacity)
        self.metrics_server = None
        if self.config.metrics.enabled:
            try:
                self.metrics_server, _ = serve_metrics(self.registry, self.config.metrics.host, self.config.metrics.port)
            except OSError as error:
                raise ConfigError(f"metrics: cannot listen on {self.config.metrics.host}:{self.config.metrics.port} ({error})") from None
            log.info("metrics_serving", host=self.config.metrics.host, port=self.metrics_server.server_port, path="/metrics")

    def _set_model_metrics(self) -> None:
        info = self.model_info
        self.metrics.set_model(info["name"], info["version"], info["backend"], info["device"], self.engine.decision.threshold)

    def init_pipeline(self) -> None:
        config = self.config
        window = self.engine.window
        channels = int(self.model_info["channels"])
        self.queue: WindowQueue = WindowQueue(config.batching.queue_capacity)
        self.ingest = Ingest(
            PayloadDecoder(channels, config.windowing.max_samples_per_message, config.windowing.max_payload_bytes),
            WindowAssembler(window, config.windowing.stride or window, channels, config.windowing.max_sensors, config.windowing.idle_eviction_seconds),
            self.queue,
            self.metrics,
            config.mqtt.sensor_id_level,
            config.shard,
            config.logging.warning_interval_seconds,
        )
        self.restore_windows()

    def restore_windows(self) -> None:
        """Take back the partial windows the last drain saved; a file that does not fit is logged and ignored."""
        path = self.config.windowing.state_file
        if path is None or not path.exists():
            return
        try:
            sensors = self.ingest.assembler.restore(orjson.loads(path.read_bytes()), time.monotonic())
            log.info("window_state_restored", path=str(path), sensors=sensors, samples=self.ingest.assembler.buffered_samples())
        except (OSError, ValueError) as error:
            log.warning("window_state_discarded", path=str(path), error=str(error)[:300])
        try:
            path.unlink()  # taken once: after a crash the sensors' positions in it would be stale
        except OSError as error:
            log.warning("window_state_not_removed", path=str(path), error=str(error))

    def save_windows(self) -> None:
        """Write the partial windows for the next start (atomically); called once no message can arrive."""
        path = self.config.windowing.state_file
        if path is None:
            return
        state = self.ingest.assembler.snapshot()
        temp = path.with_name(f".{path.name}.tmp")
        try:
            temp.write_bytes(orjson.dumps(state))
            os.replace(temp, path)
        except OSError as error:
            log.error("window_state_not_saved", path=str(path), error=str(error))
            return
        log.info("window_state_saved", path=str(path), sensors=len(state["sensors"]), samples=self.ingest.assembler.buffered_samples())

    def start_scoring(self) -> None:
        batcher = MicroBatcher(self.queue, self.config.batching.max_batch, self.config.batching.max_wait_seconds)
        self.connection = MqttConnection(self.config.mqtt, self.ingest.handle, self.metrics)
        route = AlertRoute(self.connection.publish_alert, self.config.mqtt.alert_topic, self.config.mqtt.alert_qos, self.config.alerts)
        self.worker = ScoringWorker(batcher, self.engine, route, self.metrics, self.stop)
        self.worker.start()

    def start_mqtt(self) -> None:
        self.connection.start()

    def install_signal_handlers(self) -> None:
        """Signals are only recorded here; the main loop acts on them.

        A handler runs in the main thread between bytecodes: one that set an Event while the main
        thread is inside `Event.wait` could deadlock on the Event's own lock.
        """
        for signum in LIFECYCLE_SIGNALS:
            signal.signal(signum, lambda received, frame: self.signals.append(received))

    def handle_signals(self) -> None:
        while self.signals:
            received = self.signals.pop(0)
            log.info("signal_received", signal=signal.Signals(received).name)
            if received == signal.SIGHUP:
                self.reload()
            else:
                self.stop.set()

    def main_loop(self) -> None:
        """Signals, systemd readiness and watchdog, housekeeping; returns when asked to stop."""
        ready_sent = False
        next_housekeeping = 0.0
        while not self.stop.wait(SIGNAL_POLL_SECONDS):
            self.handle_signals()
            if not ready_sent and self.connection.subscribed.is_set():
                ready_sent = True
                systemd.ready()
                log.info("ready", subscriptions=self.config.mqtt.subscribe)
            now = time.monotonic()
            if now < next_housekeeping:
                continue
            next_housekeeping = now + HOUSEKEEPING_SECONDS
            self.ingest.housekeeping(now)
            if self.worker.is_alive():
                systemd.watchdog_ping()
            else:
                log.error("scoring_thread_died")
                self.stop.set()

    def reload(self) -> None:
        """Re-read config and model; keep the running ones if either is broken."""
        systemd.reloading()
        try:
            new_config = load_config(self.config_path) if self.config_path else self.config
            engine, info = build_engine(new_config.model)
            if engine.window != self.engine.window or info["channels"] != self.model_info["channels"]:
                raise ConfigError(
                    f"the new model takes windows of {engine.window}x{info['channels']}, the running one "
                    f"{self.engine.window}x{self.model_info['channels']}: restart the daemon to change shape"
                )
        except MonitorError as error:
            self.metrics.model_reloads.labels("failure").inc()
            log.error("reload_failed", error=str(error), keeping_model=self.model_info["version"])
        else:
            self.worker.engine = self.engine = engine
            self.model_info = info
            self.worker.route.settings = new_config.alerts
            self.config = new_config
            self._set_model_metrics()
            self.metrics.model_reloads.labels("success").inc()
            log.info("reloaded", threshold=engine.decision.threshold, **info)
        systemd.ready()

    def drain(self) -> int:
        """Stop input, score the backlog, wait for alert acknowledgements, disconnect; exit code 0."""
        started = time.monotonic()
        systemd.stopping()
        log.info("draining", queued_windows=self.queue.depth())
        self.connection.stop_input()
        self.stop.set()
        self.worker.join()
        acknowledged = self.connection.wait_for_acknowledgements(self.config.mqtt.drain_timeout_seconds)
        if not acknowledged:
            log.warning("alerts_unacknowledged_at_exit", pending=self.connection.pending_alerts())
        self.connection.close()
        self.save_windows()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        log.info("stopped", drain_seconds=round(time.monotonic() - started, 3))
        return 0


def run(config_path: str | Path) -> int:
    config = load_config(config_path)
    configure_logging(config.logging.level, config.logging.format)
    return Daemon(config, config_path).run()
