"""Prometheus metrics of the daemon, built on an injected registry so tests get a fresh one.

Names follow Prometheus conventions (`monitor_` prefix, base units, `_total` for counters); label
sets are closed (never a sensor id) and pre-touched so every series starts at 0.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from monitor.payload import REJECT_REASONS

MESSAGE_OUTCOMES = ("accepted", "duplicate", "sensor_limit", "other_shard", "internal_error", *REJECT_REASONS)
WINDOW_DROP_REASONS = ("seq_gap", "queue_full", "scoring_error")
ALERT_DROP_REASONS = ("queue_full", "publish_error")
RELOAD_OUTCOMES = ("success", "failure")
LATENCY_BUCKETS_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
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
        self.messages = Counter("monitor_messages_received_total", "MQTT messages received, by outcome", ["outcome"], registry=registry)
        self.samples = Counter("monitor_samples_received_total", "Samples accepted into sensor buffers", registry=registry)
        self.duplicate_samples = Counter("monitor_duplicate_samples_total", "Samples ignored because their seq was already seen", registry=registry)
        self.seq_gaps = Counter("monitor_seq_gaps_total", "Gaps seen in sensors' seq numbering", registry=registry)
        self.windows_scored = Counter("monitor_windows_scored_total", "Windows scored by the model", registry=registry)
        self.windows_dropped = Counter("monitor_windows_dropped_total", "Windows dropped before scoring, by reason", ["reason"], registry=registry)
        self.anomalies = Counter("monitor_anomalies_total", "Windows whose score exceeded the threshold", registry=registry)
        self.alerts_published = Counter("monitor_alerts_published_total", "Alerts handed to the MQTT client", registry=registry)
        self.alerts_delivered = Counter("monitor_alerts_delivered_total", "Alerts acknowledged by the broker (QoS 1/2) or sent (QoS 0)", registry=registry)
        self.alerts_dropped = Counter(
            "monitor_alerts_dropped_total", "Alerts that could not be queued for publishing, by reason", ["reason"], registry=registry
        )
        self.alerts_pending = Gauge("monitor_alerts_pending", "Alerts published but not yet acknowledged by the broker", registry=registry)
        self.batch_size = Histogram("monitor_inference_batch_size", "Windows per forward pass", buckets=batch_size_buckets(max_batch), registry=registry)
        self.inference_seconds = Histogram(
            "monitor_inference_seconds", "Time of one batched forward pass", buckets=INFERENCE_BUCKETS_SECONDS, registry=registry
        )
        self.latency_seconds = Histogram(
            "monitor_decision_latency_seconds",
            "From the arrival of a window's last sample to its decision",
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=registry,
        )
        self.reconstruction_error = self._error_histogram(threshold)
        self.queue_depth = Gauge("monitor_queue_depth", "Windows waiting to be scored", registry=registry)
        self.queue_capacity = Gauge("monitor_queue_capacity", "Bound of the scoring queue", registry=registry)
        self.active_sensors = Gauge("monitor_active_sensors", "Sensors with a live buffer", registry=registry)
        self.sensors_evicted = Counter("monitor_sensors_evicted_total", "Sensors evicted after being idle", registry=registry)
        self.buffered_samples = Gauge("monitor_buffered_samples", "Samples held in sensor buffers", registry=registry)
        self.broker_connected = Gauge("monitor_broker_connected", "1 while connected to the MQTT broker", registry=registry)
        self.broker_connects = Counter("monitor_broker_connections_total", "Successful connections to the broker", registry=registry)
        self.broker_disconnects = Counter("monitor_broker_disconnections_total", "Connections to the broker lost", registry=registry)
        self.model_reloads = Counter("monitor_model_reloads_total", "Model reloads on SIGHUP, by outcome", ["outcome"], registry=registry)
        self.threshold = Gauge("monitor_threshold", "The model's calibrated anomaly threshold", registry=registry)
        self.model_info = Info("monitor_model", "The model in use", registry=registry)
        for outcome in MESSAGE_OUTCOMES:
            self.messages.labels(outcome)
        for reason in WINDOW_DROP_REASONS:
            self.windows_dropped.labels(reason)
        for reason in ALERT_DROP_REASONS:
            self.alerts_dropped.labels(reason)
        for outcome in RELOAD_OUTCOMES:
            self.model_reloads.labels(outcome)
        self.threshold.set(threshold)

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

    def set_model(self, name: str, version: str, backend: str, device: str, threshold: float) -> None:
        self.model_info.info({"name": name, "version": version, "backend": backend, "device": device})
        self.threshold.set(threshold)


def serve_metrics(registry: CollectorRegistry, host: str, port: int):
    """Serve `/metrics` on host:port in a daemon thread; returns (server, thread)."""
    return start_http_server(port, addr=host, registry=registry)
