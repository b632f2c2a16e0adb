"""The daemon's lifecycle pieces run in the test's own process, against a real broker (so marked slow): the
watchdog fed only while the scorer makes progress (with a real notify socket), and SIGHUP's reload, one test for
each kind of change: applied live, or logged by key as needing a restart."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from monitor.config.schema import ModelSettings, load_config
from monitor.model.engine import load_engine
from monitor.runtime.daemon import Daemon
from monitor.telemetry.metrics import ERROR_BUCKET_FACTORS
from monitor.training.datasets import read_ucr
from tests.support import DEFAULT_MODEL, SPLITS, BlockingScorer, NotifySocket, daemon_config, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def notify(tmp_path, monkeypatch):
    """A datagram socket standing in for systemd; yields a function returning the datagrams received since."""
    notify_socket = NotifySocket(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_socket.path))
    yield notify_socket.received
    notify_socket.close()


def started(daemon: Daemon, mqtt: bool = False) -> Daemon:
    """`Daemon.run`'s start steps, without signal handlers or the main loop."""
    daemon.init_model()
    daemon.init_metrics()
    daemon.init_ingest()
    daemon.start_scoring()
    if mqtt:
        daemon.start_mqtt()
    return daemon


def test_the_watchdog_is_fed_only_while_the_scorer_makes_progress_and_the_status_says_what_is_wrong(
    broker, notify, tmp_path
):
    real = load_engine(ModelSettings(path=DEFAULT_MODEL, device="cpu", threads=1))
    blocking = BlockingScorer(real)
    path = daemon_config(tmp_path / "monitor.yaml", broker.port, metrics={"enabled": False})
    daemon = Daemon(
        load_config(path), path, CollectorRegistry(), lambda settings: dataclasses.replace(real, scorer=blocking)
    )
    daemon.stall_seconds = 0.5
    try:
        started(daemon, mqtt=True)
        wait_until(daemon.connection.subscribed.is_set, 20, what="the subscription")
        wait_until(lambda: daemon.worker.progressing(time.monotonic(), 0.5), 10, what="the idle scorer's beat")
        wait_until(lambda: daemon.connection.connected() == (True, True), 20, what="both connections")
        daemon.housekeeping(time.monotonic())
        assert notify() == ["WATCHDOG=1", "STATUS=healthy"]  # idle, queue empty: alive
        beat = read_ucr(SPLITS / "test.txt.xz").windows[0, :, 0]
        body = orjson.dumps({"seq": 0, "samples": beat.tolist()})
        daemon.connection.client.publish("sensors/stalled/ecg", body, qos=1)
        assert blocking.entered.wait(20), "the window never reached the scorer"
        wait_until(lambda: not daemon.worker.progressing(time.monotonic(), 0.5), 10, what="the scorer to stall")
        with capture_logs() as logs:
            daemon.housekeeping(time.monotonic())
            daemon.housekeeping(time.monotonic())
        # hung inside a forward pass: no ping, systemd's watchdog will act; `systemctl status` says why
        assert notify() == ["STATUS=scoring stalled"]
        assert [entry["event"] for entry in logs].count("scoring_stalled") == 1
        blocking.release.set()
        wait_until(lambda: daemon.worker.progressing(time.monotonic(), 0.5), 10, what="the scorer to resume")
        daemon.housekeeping(time.monotonic())
        assert notify() == ["WATCHDOG=1", "STATUS=healthy"]
        daemon.connection.output.disconnect()
        wait_until(lambda: daemon.connection.connected() == (True, False), 20, what="the alert connection closed")
        daemon.housekeeping(time.monotonic())
        daemon.housekeeping(time.monotonic())
        assert notify() == ["WATCHDOG=1", "STATUS=alert connection down", "WATCHDOG=1"]  # sent when it changes
    finally:
        blocking.release.set()
        daemon.drain()


@pytest.fixture
def model_copy(tmp_path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL, target)
    return target


def reload_with(daemon: Daemon, path: Path, **sections) -> list[dict]:
    """Rewrite the config with `sections` changed, reload as SIGHUP does, and return the log entries."""
    config = json.loads(json.dumps(load_config(path).model_dump(mode="json")))
    for section, values in sections.items():
        config[section] = {**(config[section] or {}), **values}
    config["mqtt"].pop("password", None)
    if config["partitions"] is not None:  # they set these two themselves
        for key in ("subscribe", "sensor_id_level"):
            config["mqtt"].pop(key)
    path.write_text(json.dumps(config))  # YAML is a superset of JSON
    with capture_logs() as logs:
        daemon.reload()
    return logs


@pytest.fixture
def daemon(tmp_path, model_copy, notify):
    path = daemon_config(tmp_path / "monitor.yaml", 1883, model=model_copy, metrics={"enabled": False})
    running = started(Daemon(load_config(path), path, CollectorRegistry()))
    try:
        yield running
    finally:
        running.stop.set()
        running.worker.join(30)


def error_bucket_bounds(registry: CollectorRegistry) -> list[float]:
    return [
        float(sample.labels["le"])
        for family in registry.collect()
        for sample in family.samples
        if sample.name == "monitor_reconstruction_error_bucket" and sample.labels["le"] != "+Inf"
    ]


def test_reload_swaps_the_model_and_rebuilds_the_error_buckets_around_its_threshold(daemon, model_copy):
    meta_path = model_copy / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["threshold"]["value"] = new_threshold = round(meta["threshold"]["value"] * 2, 6)
    meta["version"] = "doubled"
    meta_path.write_text(json.dumps(meta))
    old_engine = daemon.worker.engine
    logs = reload_with(daemon, daemon.config_path)
    assert daemon.worker.engine is not old_engine and daemon.worker.engine.threshold == new_threshold
    assert daemon.worker.engine.model.version == "doubled"
    assert error_bucket_bounds(daemon.registry) == [round(new_threshold * factor, 6) for factor in ERROR_BUCKET_FACTORS]
    assert daemon.registry.get_sample_value("monitor_threshold") == new_threshold
    assert daemon.registry.get_sample_value("monitor_model_reloads_total", {"outcome": "success"}) == 1
    assert not [entry for entry in logs if entry["event"] == "reload_needs_restart"]


def test_reload_to_a_model_that_scales_its_sensors_scores_is_refused_and_the_old_model_kept(daemon):
    """The running model measured no score scales: a model that divides by them could not be served."""
    old_engine = daemon.worker.engine
    daemon.load_engine = lambda model: dataclasses.replace(load_engine(model), score_scale=True)
    logs = reload_with(daemon, daemon.config_path)
    assert daemon.worker.engine is old_engine
    assert daemon.registry.get_sample_value("monitor_model_reloads_total", {"outcome": "failure"}) == 1
    failed = [entry for entry in logs if entry["event"] == "reload_failed"]
    assert failed and "score scales were measured by the running model" in failed[0]["error"]


def test_reload_applies_alert_settings_and_topic_live(daemon):
    logs = reload_with(
        daemon,
        daemon.config_path,
        alerts={"top_timesteps": 2, "include_profile": True},
        mqtt={"alert_topic": "anomalies/{sensor_id}", "alert_qos": 0},
    )
    sink = daemon.worker.sink
    assert sink.settings.top_timesteps == 2 and sink.settings.include_profile
    assert sink.topic_template == "anomalies/{sensor_id}" and sink.qos == 0
    assert not [entry for entry in logs if entry["event"] == "reload_needs_restart"]


def test_reload_applies_the_batching_wait_and_the_log_level_live(daemon):
    root = logging.getLogger()
    level = root.level
    try:
        logs = reload_with(
            daemon,
            daemon.config_path,
            batching={"max_wait_seconds": 0.2, "behind_share": 0.5, "behind_batch": 4},
            logging={"level": "error"},
        )
        batcher = daemon.batcher
        assert (batcher.max_wait_seconds, batcher.behind_share, batcher.behind_batch) == (0.2, 0.5, 4)
        assert root.level == logging.ERROR
    finally:
        root.setLevel(level)
    assert not [entry for entry in logs if entry["event"] == "reload_needs_restart"]


def test_reload_applies_drift_settings_live(daemon):
    old = daemon.drift
    logs = reload_with(daemon, daemon.config_path, drift={"psi_bound": 0.5, "window_count": 300})
    assert daemon.drift is not old and daemon.drift.settings.psi_bound == 0.5 and daemon.drift.monitor.window == 300
    assert daemon.worker.sink.observers == (daemon.drift,)
    assert daemon.registry.get_sample_value("monitor_drift_psi_bound") == 0.5
    assert not [entry for entry in logs if entry["event"] == "reload_needs_restart"]


@pytest.mark.parametrize(
    ("sections", "keys"),
    [
        ({"mqtt": {"host": "broker.example"}}, ["mqtt.host"]),
        ({"batching": {"queue_capacity": 77, "max_batch": 8}}, ["batching.max_batch", "batching.queue_capacity"]),
        ({"windowing": {"stride": 70}}, ["windowing.stride"]),
        ({"metrics": {"port": 9999}}, ["metrics.port"]),
        (
            {"partitions": {"count": 2, "consume": [1]}},
            ["mqtt.sensor_id_level", "mqtt.subscribe", "partitions.consume", "partitions.count", "partitions.topic"],
        ),
        ({"alerts": {"lifecycle": {"enabled": True}}}, ["alerts.lifecycle.enabled"]),
        (
            {"logging": {"format": "console", "warning_interval_seconds": 5}},
            ["logging.format", "logging.warning_interval_seconds"],
        ),
    ],
)
def test_reload_names_each_setting_that_needs_a_restart(daemon, sections, keys):
    before = daemon.queue.capacity, daemon.ingest.assembler, daemon.ingest.sensor_id_level
    logs = reload_with(daemon, daemon.config_path, **sections)
    assert [entry["key"] for entry in logs if entry["event"] == "reload_needs_restart"] == keys
    assert (daemon.queue.capacity, daemon.ingest.assembler, daemon.ingest.sensor_id_level) == before  # not half-applied
    assert daemon.registry.get_sample_value("monitor_model_reloads_total", {"outcome": "success"}) == 1
