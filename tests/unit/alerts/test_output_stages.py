"""The output half in-process, stage by stage, each with a fresh `CollectorRegistry`: the alert sink with a fake
publisher, the scoring worker and its swap and heartbeat, the rate limiter, the histogram
quantile, and `load_config` with environment overrides. The model is the committed default one."""

from __future__ import annotations

import dataclasses
import ssl
import threading
import time
from collections import Counter
from typing import get_args

import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from monitor.alerts.sink import AlertSink
from monitor.config.schema import AlertSettings, ModelSettings, load_config
from monitor.errors import ConfigError
from monitor.ingest.acks import InOrderAcks, PendingWindows
from monitor.ingest.batching import MicroBatcher, WindowQueue
from monitor.model.engine import Engine, load_engine
from monitor.mqtt.publisher import DROP_REASONS, DropReason, PublishRefused
from monitor.runtime.worker import ScoringWorker
from monitor.telemetry.log import RateLimiter
from monitor.telemetry.metrics import ALERT_DROP_REASONS, PUBLISH_DROP_REASONS, Metrics
from monitor.telemetry.scrape import histogram_quantile
from monitor.training.datasets import read_ucr
from monitor.window import Window
from tests.support import DEFAULT_MODEL, SPLITS, BlockingScorer, wait_until


class FakePublisher:
    """Records what it is given; raises `error` instead when one is set."""

    def __init__(self, error: Exception | None = None) -> None:
        self.sent: list[tuple[str, dict, int]] = []
        self.error = error

    def publish(self, topic: str, payload: bytes, qos: int) -> int:
        if self.error is not None:
            raise self.error
        self.sent.append((topic, orjson.loads(payload), qos))
        return len(self.sent)  # the packet id


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
def engine() -> Engine:
    return load_engine(ModelSettings(path=DEFAULT_MODEL, device="cpu", threads=1))


@pytest.fixture(scope="module")
def beats(engine) -> tuple[np.ndarray, np.ndarray]:
    """Test-split windows the shipped model passes and flags: (normal [8], anomalous [8])."""
    windows = read_ucr(SPLITS / "test.txt.xz").windows[:400]
    errors = engine.score(windows).errors
    return windows[errors <= engine.threshold][:8], windows[errors > engine.threshold][:8]


def make_windows(samples: np.ndarray, sensor: str = "s") -> list[Window]:
    return [Window(f"{sensor}{i}", 140 * i, sample, 1000.0 + i, time.monotonic()) for i, sample in enumerate(samples)]


def make_sink(publisher: FakePublisher, registry: CollectorRegistry, **settings) -> AlertSink:
    metrics = Metrics(registry, 64, 1.0)
    return AlertSink(publisher, "alerts/{sensor_id}", 1, AlertSettings(**settings), metrics)


def test_the_sink_publishes_one_alert_per_anomalous_window(engine, beats):
    normal, anomalous = beats
    registry, publisher = CollectorRegistry(), FakePublisher()
    sink = make_sink(publisher, registry, top_timesteps=3)
    batch = make_windows(np.concatenate([normal[:4], anomalous[:3]]))
    scores = engine.score(np.stack([window.samples for window in batch]))
    assert len(sink.handle(batch, scores, engine)) == 3
    assert [topic for topic, _, _ in publisher.sent] == ["alerts/s4", "alerts/s5", "alerts/s6"]
    topic, alert, qos = publisher.sent[0]
    assert qos == 1 and alert["sensor_id"] == "s4" and alert["window_start_seq"] == 560
    assert alert["window_end_seq"] == 700 and alert["window_start_ts"] == 1004.0
    assert alert["model"] == {"name": engine.model.name, "version": engine.model.version}
    assert alert["score"] == pytest.approx(float(scores.errors[4])) and alert["score"] > alert["threshold"]
    assert len(alert["top_timesteps"]) == 3 and "error_profile" not in alert
    assert value(registry, "monitor_anomalies_total") == 3
    assert value(registry, "monitor_alerts_published_total") == 3


def ssl_error_with_reason() -> ssl.SSLError:
    error = ssl.SSLError(1, "record layer failure")
    error.reason = "RECORD_LAYER_FAILURE"  # as OpenSSL's errors carry one
    return error


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (PublishRefused("queue_full", "paho's queue is full"), "queue_full"),
        (PublishRefused("publish_error"), "publish_error"),
        (ssl_error_with_reason(), "publish_error"),  # its own `reason` must not become a label value
        (RuntimeError("anything else"), "publish_error"),
    ],
)
def test_a_refused_alert_is_counted_under_a_closed_reason(engine, beats, error, reason):
    registry = CollectorRegistry()
    sink = make_sink(FakePublisher(error), registry)
    batch = make_windows(beats[1][:2])
    assert sink.handle(batch, engine.score(np.stack([w.samples for w in batch])), engine) == {}
    assert value(registry, "monitor_alerts_dropped_total", reason=reason) == 2
    assert value(registry, "monitor_alerts_published_total") == 0
    labels = {
        sample.labels["reason"]
        for sample in registry.collect()
        for sample in sample.samples
        if sample.name == "monitor_alerts_dropped_total"
    }
    assert labels == set(ALERT_DROP_REASONS)


def test_the_drop_reasons_are_the_metric_labels():
    assert DROP_REASONS == get_args(DropReason) == PUBLISH_DROP_REASONS
    assert (*DROP_REASONS, "sensor_share") == ALERT_DROP_REASONS


def test_a_sensor_holding_more_than_its_share_of_unacknowledged_alerts_loses_only_its_own(engine, beats):
    """The broker acknowledges nothing (offline, or slow): one sensor's anomalous windows stop at its share of the
    alerts waiting, logged once by its name, while another sensor's alerts still go out."""
    registry, publisher = CollectorRegistry(), FakePublisher()
    metrics = Metrics(registry, 64, engine.threshold)
    pending = PendingWindows(InOrderAcks())
    sink = AlertSink(
        publisher,
        "alerts/{sensor_id}",
        1,
        AlertSettings(),
        metrics,
        over_share=lambda sensor_id: pending.alerts_over_share(sensor_id, 5, fair_share=1.0),
    )
    worker = ScoringWorker(MicroBatcher(WindowQueue(100), 64, 0.0), engine, sink, metrics, threading.Event(), pending)
    flood = [Window("flood", 140 * i, beats[1][i % 8], None, time.monotonic()) for i in range(40)]
    calm = [Window(f"calm{i}", 0, beats[1][i], None, time.monotonic()) for i in range(5)]
    with capture_logs() as logs:
        for batch in (calm[:4], flood[:8], flood[8:], calm[4:]):
            worker.process(batch)
    lines = [(entry["sensor_id"], entry["alerts_dropped"]) for entry in logs if entry["event"] == "alerts_over_share"]
    assert lines == [("flood", 1)]  # then rate-limited
    by_sensor = Counter(alert["sensor_id"] for _, alert, _ in publisher.sent)
    # the flooder's first batch went out before any of it was counted
    assert by_sensor == {"flood": 8, **{f"calm{i}": 1 for i in range(5)}}
    assert value(registry, "monitor_alerts_dropped_total", reason="sensor_share") == 32
    for mid in range(5, 13):  # the broker acknowledges the flooder's alerts: it gets its share back
        pending.alert_acknowledged(mid)
    worker.process(flood[:1])
    assert Counter(alert["sensor_id"] for _, alert, _ in publisher.sent)["flood"] == 9


def make_worker(engine: Engine, publisher: FakePublisher, registry: CollectorRegistry):
    queue: WindowQueue[Window] = WindowQueue(100)
    metrics = Metrics(registry, 64, engine.threshold)
    sink = AlertSink(publisher, "alerts/{sensor_id}", 1, AlertSettings(), metrics)
    stop = threading.Event()
    worker = ScoringWorker(MicroBatcher(queue, 64, 0.0), engine, sink, metrics, stop, PendingWindows(InOrderAcks()))
    return worker, queue, stop, metrics


def test_the_worker_scores_alerts_and_drains_before_stopping(engine, beats):
    registry, publisher = CollectorRegistry(), FakePublisher()
    worker, queue, stop, _ = make_worker(engine, publisher, registry)
    for window in make_windows(np.concatenate([beats[0][:5], beats[1][:4]])):
        assert queue.offer(window)
    stop.set()  # already stopping: the worker still scores everything queued, then ends
    worker.start()
    worker.join(60)
    assert not worker.is_alive()
    assert value(registry, "monitor_windows_scored_total") == 9
    assert len(publisher.sent) == 4 and value(registry, "monitor_alerts_published_total") == 4
    assert value(registry, "monitor_inference_batch_size_count") >= 1


def test_swap_takes_effect_from_the_next_batch(engine, beats):
    registry = CollectorRegistry()
    first, second = FakePublisher(), FakePublisher()
    worker, _, _, metrics = make_worker(engine, first, registry)
    batch = make_windows(beats[1][:2])
    worker.process(batch)
    strict = dataclasses.replace(engine, threshold=float("inf"))  # flags nothing
    worker.swap(strict, AlertSink(second, "other/{sensor_id}", 0, AlertSettings(), metrics))
    worker.process(batch)
    lenient = dataclasses.replace(engine, threshold=0.0)
    worker.swap(lenient, AlertSink(second, "other/{sensor_id}", 0, AlertSettings(), metrics))
    worker.process(batch)
    assert len(first.sent) == 2
    assert [(topic, qos) for topic, _, qos in second.sent] == [("other/s0", 0), ("other/s1", 0)]
    assert worker.engine is lenient


def test_a_scoring_error_drops_the_batch_and_the_worker_goes_on(engine, beats):
    registry = CollectorRegistry()
    broken = dataclasses.replace(engine, scorer=None)  # score() raises AttributeError
    worker, _, _, _ = make_worker(broken, FakePublisher(), registry)
    worker.process(make_windows(beats[1][:3]))
    assert value(registry, "monitor_windows_dropped_total", reason="scoring_error") == 3
    worker.swap(engine, worker.sink)
    worker.process(make_windows(beats[1][:3]))
    assert value(registry, "monitor_windows_scored_total") == 3


def test_the_heartbeat_stops_while_a_forward_pass_hangs(engine, beats):
    blocking = BlockingScorer(engine)
    worker, queue, stop, _ = make_worker(
        dataclasses.replace(engine, scorer=blocking), FakePublisher(), CollectorRegistry()
    )
    worker.start()
    try:
        wait_until(lambda: worker.progressing(time.monotonic(), 0.3), 10, what="an idle worker to beat")
        queue.offer(make_windows(beats[0][:1])[0])
        assert blocking.entered.wait(10)
        wait_until(lambda: not worker.progressing(time.monotonic(), 0.3), 10, what="the heartbeat to stop")
        assert not worker.progressing(time.monotonic(), 0.3)  # still hung: no beat from inside the pass
    finally:
        blocking.release.set()
        stop.set()
        worker.join(30)
    assert not worker.is_alive()


def test_rate_limiter_allows_a_key_once_per_interval():
    limiter = RateLimiter(10.0, max_keys=3)
    assert limiter.allow("a", 0.0) and limiter.allow("b", 0.0)
    assert not limiter.allow("a", 9.9)
    assert limiter.allow("a", 10.0)
    assert limiter.allow("c", 10.0)
    assert limiter.allow("d", 10.0)  # a fourth key clears the table instead of growing it
    assert limiter.allow("b", 10.5)  # forgotten with the rest: allowed again


def test_histogram_quantile_as_prometheus_computes_it():
    assert histogram_quantile(0.5, {}) is None
    assert histogram_quantile(0.5, {1.0: 0.0, float("inf"): 0.0}) is None
    buckets = {0.1: 10.0, 0.2: 30.0, 0.5: 40.0, float("inf"): 40.0}
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.15)  # rank 20: halfway through (0.1, 0.2]
    assert histogram_quantile(0.875, buckets) == pytest.approx(0.35)
    assert histogram_quantile(0.99, {0.1: 1.0, float("inf"): 10.0}) == 0.1  # beyond the last finite bound


def test_load_config_applies_environment_overrides(tmp_path):
    path = tmp_path / "monitor.yaml"
    path.write_text("mqtt:\n  port: 1883\n  client_id: from-file\nbatching:\n  max_batch: 32\n")
    environ = {
        "MONITOR_MQTT__PORT": "1884",
        "MONITOR_MQTT__PASSWORD": "123",  # stays a string, never a number
        "MONITOR_BATCHING__MAX_WAIT_SECONDS": "0.02",
        "MONITOR_LOGGING__LEVEL": "debug",
        "UNRELATED": "x",
    }
    config = load_config(path, environ)
    assert config.mqtt.port == 1884 and config.mqtt.client_id == "from-file"
    assert config.mqtt.resolve_password() == "123"
    assert config.batching.max_batch == 32 and config.batching.max_wait_seconds == 0.02
    assert config.logging.level == "debug"
    with pytest.raises(ConfigError, match="mqtt.port"):
        load_config(path, {"MONITOR_MQTT__PORT": "many"})
    with pytest.raises(ConfigError, match="mqtt.colour"):
        load_config(path, {"MONITOR_MQTT__COLOUR": "blue"})
