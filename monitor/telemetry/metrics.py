"""Prometheus metrics of the daemon, built on an injected registry so tests get a fresh one, and their HTTP server.

Names follow Prometheus conventions (`monitor_` prefix, base units, `_total` for counters); label
sets are closed (never a sensor id) and pre-touched so every series starts at 0. Gauges of live state
(queue depth, sensors, buffered samples) are read by callbacks when scraped, so they are never stale.

The server (`MetricsServer`) holds at most `max_connections` connections, each for at most
`timeout_seconds` in all: connections beyond the cap are closed at once and counted, so clients that
open connections and never finish them cannot take the process's file descriptors or threads.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from monitor.alerts.episodes import EVENT_KINDS

# Outcomes the daemon itself gives a message; the stages add their own label values (payload rejections, beats
# found unscorable, ignored ts) with `declare`, so every label is exported from the start at 0.
MESSAGE_OUTCOMES = ("accepted", "duplicate", "retained", "sensor_limit", "sensor_share", "internal_error")
WINDOW_DROP_REASONS = ("seq_gap", "seq_restart", "queue_full", "sensor_share", "scoring_error", "non_finite_score")
PUBLISH_DROP_REASONS = ("queue_full", "publish_error")  # the transport refused the message
ALERT_DROP_REASONS = (*PUBLISH_DROP_REASONS, "sensor_share")  # or its sensor holds more than its share of the queue
RELOAD_OUTCOMES = ("success", "failure")
JOURNAL_OPERATIONS = ("write", "fsync", "checkpoint")
JOURNAL_DISCARD_REASONS = ("torn", "damaged", "unreadable")
EPISODE_STATES = ("open", "flapping")
DRIFT_SHARE_LEVELS = (0.5, 0.9, 0.99)  # calibration quantiles whose exceedance share is exported
SHADOW_DISAGREEMENTS = ("live_only", "shadow_only")  # which of the two models called the window anomalous
LATENCY_BUCKETS_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
AGE_BUCKETS_SECONDS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
INFERENCE_BUCKETS_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
ERROR_BUCKET_FACTORS = (0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)


def batch_size_buckets(max_batch: int) -> tuple[float, ...]:
    """Powers of two up to max_batch, and max_batch itself."""
    buckets, size = [], 1
    while size < max_batch:
        buckets.append(float(size))
        size *= 2
    return (*buckets, float(max_batch))


class Metrics:
    """Every metric the daemon exports."""

    def __init__(self, registry: CollectorRegistry, max_batch: int, threshold: float) -> None:
        self.registry = registry
        self.messages = Counter(
            "monitor_messages_received_total", "MQTT messages received, by outcome", ["outcome"], registry=registry
        )
        self.samples = Counter(
            "monitor_samples_received_total", "Samples accepted into sensor buffers", registry=registry
        )
        self.duplicate_samples = Counter(
            "monitor_duplicate_samples_total", "Samples ignored because their seq was already seen", registry=registry
        )
        self.seq_gaps = Counter("monitor_seq_gaps_total", "Gaps seen in sensors' seq numbering", registry=registry)
        self.seq_restarts = Counter(
            "monitor_seq_restarts_total",
            "Sensor streams restarted by a seq jump beyond windowing.seq_tolerance",
            registry=registry,
        )
        self.windows_scored = Counter("monitor_windows_scored_total", "Windows scored by the model", registry=registry)
        self.windows_dropped = Counter(
            "monitor_windows_dropped_total", "Windows dropped before scoring, by reason", ["reason"], registry=registry
        )
        self.anomalies = Counter(
            "monitor_anomalies_total", "Windows whose score exceeded the threshold", registry=registry
        )
        self.alerts_published = Counter(
            "monitor_alerts_published_total", "Alerts handed to the MQTT client", registry=registry
        )
        self.alerts_delivered = Counter(
            "monitor_alerts_delivered_total",
            "Alerts acknowledged by the broker (QoS 1/2) or sent (QoS 0)",
            registry=registry,
        )
        self.alerts_dropped = Counter(
            "monitor_alerts_dropped_total",
            "Alerts that could not be queued for publishing, by reason",
            ["reason"],
            registry=registry,
        )
        self.alerts_pending = Gauge(
            "monitor_alerts_pending", "Alerts published but not yet acknowledged by the broker", registry=registry
        )
        self.batch_size = Histogram(
            "monitor_inference_batch_size",
            "Windows per forward pass",
            buckets=batch_size_buckets(max_batch),
            registry=registry,
        )
        self.inference_seconds = Histogram(
            "monitor_inference_seconds",
            "Time of one batched forward pass",
            buckets=INFERENCE_BUCKETS_SECONDS,
            registry=registry,
        )
        self.latency_seconds = Histogram(
            "monitor_decision_latency_seconds",
            "From the arrival of a window's last sample to its decision",
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=registry,
        )
        self.window_age_seconds = Histogram(
            "monitor_window_age_seconds",
            "From a window's first sample (its ts, when the sensor sends one) to its decision, wall clock: includes "
            "the time its input waited at the broker",
            buckets=AGE_BUCKETS_SECONDS,
            registry=registry,
        )
        self.input_wait_seconds = Counter(
            "monitor_input_wait_seconds_total",
            "Time the input stage waited for room in the scoring queue (no input read meanwhile: it waits at the "
            "broker)",
            registry=registry,
        )
        self.ts_ignored = Counter(
            "monitor_ts_ignored_total",
            "Sensor ts values ignored (their samples kept), by reason: not a number, outside windowing.ts_range, or "
            "back by more than windowing.ts_tolerance_seconds",
            ["reason"],
            registry=registry,
        )
        self.input_waits = Counter(
            "monitor_input_waits_total", "Windows that waited for room in the scoring queue", registry=registry
        )
        self.reconstruction_error = self._error_histogram(threshold)
        # beat mode (windowing.mode: beats); in it, monitor_windows_scored_total counts the beats scored
        self.beats_found = Counter("monitor_beats_found_total", "Beats the R-peak detector found", registry=registry)
        self.beats_unscorable = Counter(
            "monitor_beats_unscorable_total", "Beats found but not scored, by reason", ["reason"], registry=registry
        )
        self.detector_resets = Counter(
            "monitor_detector_resets_total", "Sensors' beat detectors restarted by a seq gap", registry=registry
        )
        self.beats_noisy_stretch = Counter(
            "monitor_beats_noisy_stretch_total",
            "Beats scored in a noisy stretch: their error divided by a scale above 1 (the model's stretch limit)",
            registry=registry,
        )
        self.beat_relearns = Counter(
            "monitor_beat_relearns_total",
            "Sensors' dominant rhythm (beat template and RR reference) forgotten and learned again",
            registry=registry,
        )
        self.queue_depth = Gauge("monitor_queue_depth", "Windows waiting to be scored", registry=registry)
        self.queue_capacity = Gauge("monitor_queue_capacity", "Bound of the scoring queue", registry=registry)
        self.active_sensors = Gauge("monitor_active_sensors", "Sensors with a live buffer", registry=registry)
        self.windows_warming_up = Counter(
            "monitor_windows_warming_up_total",
            "Windows spent on sensors' warm-up (baseline: sensor), not scored",
            registry=registry,
        )
        self.sensors_warming_up = Gauge(
            "monitor_sensors_warming_up", "Sensors still in their warm-up (baseline: sensor)", registry=registry
        )
        self.baseline_clipped_share = Histogram(
            "monitor_baseline_clipped_share",
            "Per scored window (baseline: sensor), the share of its values at the baseline's clip",
            buckets=(0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=registry,
        )
        self.sensors_off_baseline = Gauge(
            "monitor_sensors_off_baseline",
            "Sensors whose last window had over a quarter of its values at the baseline's clip (baseline: sensor)",
            registry=registry,
        )
        self.sensors_evicted = Counter(
            "monitor_sensors_evicted_total", "Sensors evicted after being idle", registry=registry
        )
        self.buffered_samples = Gauge("monitor_buffered_samples", "Samples held in sensor buffers", registry=registry)
        self.input_unacknowledged = Gauge(
            "monitor_input_unacknowledged",
            "Input messages received and not yet acknowledged to the broker (journal fsync or window decision pending)",
            registry=registry,
        )
        self.input_beyond_receive_maximum = Counter(
            "monitor_input_beyond_receive_maximum_total",
            "QoS 1/2 input messages the broker sent while mqtt.receive_maximum it first sent on this connection were "
            "unacknowledged (MQTT 5): "
            "the broker ignores the daemon's Receive Maximum (Mosquitto 2.0 does once acknowledgements flow)",
            registry=registry,
        )
        self.windows_undecided = Gauge(
            "monitor_windows_undecided",
            "Windows cut and not yet decided (queued, being scored, or their alert awaiting the broker)",
            registry=registry,
        )
        self.broker_connected = Gauge(
            "monitor_broker_connected", "1 while connected to the MQTT broker", registry=registry
        )
        self.alert_connection_up = Gauge(
            "monitor_alert_connection_up",
            "1 while the connection that publishes alerts is up (input has its own: monitor_broker_connected)",
            registry=registry,
        )
        self.broker_connects = Counter(
            "monitor_broker_connections_total", "Successful connections to the broker", registry=registry
        )
        self.broker_disconnects = Counter(
            "monitor_broker_disconnections_total", "Connections to the broker lost", registry=registry
        )
        self.model_reloads = Counter(
            "monitor_model_reloads_total", "Model reloads on SIGHUP, by outcome", ["outcome"], registry=registry
        )
        self.threshold = Gauge("monitor_threshold", "The model's calibrated anomaly threshold", registry=registry)
        self.model_info = Info("monitor_model", "The model in use", registry=registry)
        self.metrics_refused = Counter(
            "monitor_metrics_connections_refused_total",
            "Metrics connections closed because metrics.max_connections were open",
            registry=registry,
        )
        self._journal_metrics(registry)
        self.instance_info = Info(
            "monitor_instance",
            "This instance: its name (the MQTT client id) and the broker partitions it consumes",
            registry=registry,
        )
        self.partition_consumed = Gauge(
            "monitor_partition_consumed",
            "1 for each broker partition this instance is subscribed to right now, 0 for the others (partitions only)",
            ["partition"],
            registry=registry,
        )
        self._partitions: list[int] = []
        for outcome in MESSAGE_OUTCOMES:
            self.messages.labels(outcome)
        for reason in WINDOW_DROP_REASONS:
            self.windows_dropped.labels(reason)
        self.declare(self.alerts_dropped, ALERT_DROP_REASONS)
        for outcome in RELOAD_OUTCOMES:
            self.model_reloads.labels(outcome)
        self.threshold.set(threshold)
        self._episode_metrics(registry)
        self._drift_metrics(registry)
        self._shadow_metrics(registry)

    @staticmethod
    def declare(metric: Counter | Gauge, values: Iterable[str]) -> None:
        """Creates the children of a one-label metric for `values`, so they are exported (at 0) before first use."""
        for value in values:
            metric.labels(value)

    def _journal_metrics(self, registry: CollectorRegistry) -> None:
        self.journal_bytes = Counter(
            "monitor_journal_bytes_total",
            "Bytes written to the input journal (records and checkpoints)",
            registry=registry,
        )
        self.journal_records = Counter(
            "monitor_journal_records_total",
            "Message and decided-window records written to the journal",
            registry=registry,
        )
        self.journal_errors = Counter(
            "monitor_journal_errors_total",
            "Journal writes, fsyncs and checkpoints that failed",
            ["operation"],
            registry=registry,
        )
        self.journal_checkpoints = Counter(
            "monitor_journal_checkpoints_total",
            "Journal checkpoints written (start, periodic, recovery, stop)",
            registry=registry,
        )
        self.journal_failing = Gauge(
            "monitor_journal_failing",
            "1 while journal writes fail: no input is acknowledged until a checkpoint can be written",
            registry=registry,
        )
        self.journal_replayed = Counter(
            "monitor_journal_replayed_messages_total", "Messages replayed from the journal at start", registry=registry
        )
        self.journal_discarded = Counter(
            "monitor_journal_discarded_bytes_total",
            "Journal bytes not replayed at start: a torn last record (never acknowledged), damaged records, or a file "
            "with no readable checkpoint",
            ["reason"],
            registry=registry,
        )
        self.declare(self.journal_errors, JOURNAL_OPERATIONS)
        self.declare(self.journal_discarded, JOURNAL_DISCARD_REASONS)

    def _episode_metrics(self, registry: CollectorRegistry) -> None:
        self.episode_events = Counter(
            "monitor_episode_events_total", "Episode events published, by event", ["event"], registry=registry
        )
        self.episode_messages_dropped = Counter(
            "monitor_episode_messages_dropped_total",
            "Episode events and states that could not be queued for publishing, by reason",
            ["reason"],
            registry=registry,
        )
        self.episodes_open = Gauge(
            "monitor_episodes_open", "Sensors with an episode, by state", ["state"], registry=registry
        )
        self.declare(self.episode_messages_dropped, PUBLISH_DROP_REASONS)
        self.declare(self.episodes_open, EPISODE_STATES)
        self.declare(self.episode_events, EVENT_KINDS)  # exported at 0 with episodes off too

    def _drift_metrics(self, registry: CollectorRegistry) -> None:
        self.drift_psi = Gauge(
            "monitor_drift_psi",
            "Population stability index of the recent scores against the calibration scores (NaN: too few yet)",
            registry=registry,
        )
        self.drift_psi_bound = Gauge(
            "monitor_drift_psi_bound", "drift.psi_bound: above it the model drifts", registry=registry
        )
        self.drift_windows = Gauge(
            "monitor_drift_windows", "Recent scores the drift statistic covers", registry=registry
        )
        self.drift_share_above = Gauge(
            "monitor_drift_share_above",
            "Share of the recent scores above the calibration scores' quantile",
            ["quantile"],
            registry=registry,
        )
        self.sensors_rate_high = Gauge(
            "monitor_sensors_anomaly_rate_high",
            "Sensors whose recent anomaly rate is far above the model's expected rate",
            registry=registry,
        )
        self.expected_anomaly_rate = Gauge(
            "monitor_expected_anomaly_rate",
            "Share of the model's calibration windows above its threshold",
            registry=registry,
        )
        for gauge in (self.drift_psi, self.drift_psi_bound, self.expected_anomaly_rate):
            gauge.set(float("nan"))
        for level in DRIFT_SHARE_LEVELS:
            self.drift_share_above.labels(str(level)).set(float("nan"))

    def _shadow_metrics(self, registry: CollectorRegistry) -> None:
        self.shadow_windows = Counter(
            "monitor_shadow_windows_scored_total",
            "Windows scored by both the live and the shadow model",
            registry=registry,
        )
        self.shadow_disagreements = Counter(
            "monitor_shadow_disagreements_total",
            "Windows the shadow model decides otherwise, by which model called them anomalous",
            ["decision"],
            registry=registry,
        )
        self.shadow_failures = Counter(
            "monitor_shadow_scoring_failures_total", "Batches the shadow model failed to score", registry=registry
        )
        self.shadow_threshold = Gauge("monitor_shadow_threshold", "The shadow model's threshold", registry=registry)
        self.shadow_model = Gauge(
            "monitor_shadow_model_info", "1 for the shadow model in use", ["name", "version"], registry=registry
        )
        for decision in SHADOW_DISAGREEMENTS:
            self.shadow_disagreements.labels(decision)
        self.shadow_threshold.set(float("nan"))

    def set_shadow(self, name: str | None, version: str | None, threshold: float | None) -> None:
        """The shadow model now in use, or none."""
        self.shadow_model.clear()
        if name is not None and version is not None and threshold is not None:
            self.shadow_model.labels(name, version).set(1)
        self.shadow_threshold.set(float("nan") if threshold is None else threshold)

    def _error_histogram(self, threshold: float) -> Histogram:
        return Histogram(
            "monitor_reconstruction_error",
            "Window scores (mean absolute reconstruction error, normalised units)",
            buckets=tuple(round(threshold * factor, 6) for factor in ERROR_BUCKET_FACTORS),
            registry=self.registry,
        )

    def rebuild_error_buckets(self, threshold: float) -> None:
        """Buckets around a new threshold; the histogram's counts start again from zero, as after a restart."""
        self.registry.unregister(self.reconstruction_error)
        self.reconstruction_error = self._error_histogram(threshold)

    def watch(
        self,
        queue_depth: Callable[[], float],
        active_sensors: Callable[[], float],
        buffered_samples: Callable[[], float],
        input_unacknowledged: Callable[[], float],
        windows_undecided: Callable[[], float],
    ) -> None:
        """Read these gauges from the live state at every scrape."""
        self.queue_depth.set_function(queue_depth)
        self.active_sensors.set_function(active_sensors)
        self.buffered_samples.set_function(buffered_samples)
        self.input_unacknowledged.set_function(input_unacknowledged)
        self.windows_undecided.set_function(windows_undecided)

    def set_instance(self, name: str, partitions: list[int], count: int | None) -> None:
        """Name the instance; with a partitioned broker, one `monitor_partition_consumed` series per partition, at 0."""
        self.instance_info.info({"instance_name": name, "partitions": ",".join(map(str, partitions)) or "all"})
        self._partitions = partitions
        for partition in range(count or 0):
            self.partition_consumed.labels(str(partition)).set(0)

    def set_consuming(self, consuming: bool) -> None:
        """Subscribed (SUBACK) or not (disconnected, draining): the consumed partitions' gauges follow."""
        for partition in self._partitions:
            self.partition_consumed.labels(str(partition)).set(int(consuming))

    def set_model(self, name: str, version: str, backend: str, device: str, threshold: float) -> None:
        self.model_info.info({"name": name, "version": version, "backend": backend, "device": device})
        self.threshold.set(threshold)


Request = socket.socket | tuple[bytes, socket.socket]  # what socketserver hands a request handler


class _MetricsHandler(BaseHTTPRequestHandler):
    server: MetricsServer

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.timeout_seconds)  # every read and write on the socket

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self.send_error(404)
            return
        body = generate_latest(self.server.registry)
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Scrapes are not logged (prometheus_client's server did not log them either)."""


class MetricsServer(ThreadingHTTPServer):
    """`/metrics` over HTTP/1.0 (one request per connection), bounded in connections and in time per connection."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        max_connections: int,
        timeout_seconds: float,
        refused: Counter,
    ) -> None:
        self.registry = registry
        self.timeout_seconds = timeout_seconds
        self.refused = refused
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__((host, port), _MetricsHandler)

    def process_request(self, request: Request, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused.inc()
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Request, client_address: Any) -> None:
        # The socket timeout bounds each read; this bounds the whole connection (a client dripping bytes).
        deadline = threading.Timer(self.timeout_seconds, _abort, (request,))
        deadline.daemon = True  # never holds up the process' exit
        deadline.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            deadline.cancel()
            self._slots.release()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def _abort(request: Request) -> None:
    with contextlib.suppress(OSError):  # already closed
        (request if isinstance(request, socket.socket) else request[1]).shutdown(socket.SHUT_RDWR)


def serve_metrics(
    registry: CollectorRegistry, host: str, port: int, max_connections: int, timeout_seconds: float, refused: Counter
) -> MetricsServer:
    """Serve `/metrics` on host:port from a daemon thread; returns the server (`stop()` ends it)."""
    server = MetricsServer(registry, host, port, max_connections, timeout_seconds, refused)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
