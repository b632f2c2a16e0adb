"""End to end: the real daemon process, a real Mosquitto, the real replay of splits/test.txt."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from monitor.model.artifact import load_artifact
from monitor.model.engine import native_bfloat16
from monitor.model.scoring import Scorer
from monitor.training.datasets import read_ucr
from tests.support import DEFAULT_MODEL, SPLITS, daemon_config, metric, replay_args, run_cli, wait_until

pytestmark = pytest.mark.slow

SENSORS = 20
CHUNK = 35
DOCUMENTED_METRICS = [
    "monitor_messages_received_total",
    "monitor_samples_received_total",
    "monitor_windows_scored_total",
    "monitor_alerts_published_total",
    "monitor_windows_dropped_total",
    "monitor_inference_batch_size_bucket",
    "monitor_inference_seconds_bucket",
    "monitor_decision_latency_seconds_bucket",
    "monitor_reconstruction_error_bucket",
    "monitor_queue_depth",
    "monitor_active_sensors",
    "monitor_broker_connected",
    "monitor_model_info",
    "monitor_threshold",
]


@functools.cache
def flagged_beats(path: Path, dtype: str = "float32") -> tuple[np.ndarray, float, int]:
    """The beats the default model flags, its threshold and window; scored once a session (tests/e2e/test_partitions.py
    replays the same split over another number of sensors)."""
    artifact = load_artifact(DEFAULT_MODEL)
    scorer = Scorer.from_artifact(artifact, dtype=getattr(torch, dtype))
    errors = scorer.score_all(read_ucr(path).windows).errors
    return np.flatnonzero(errors > artifact.threshold), artifact.threshold, artifact.window


def expected_alerts(path: Path, sensors: int, dtype: str = "float32") -> tuple[set[tuple[str, int]], float, int]:
    """What `monitor evaluate` flags on the same beats, as (sensor id, window start seq) pairs."""
    flagged, threshold, window = flagged_beats(path, dtype)
    pairs = {(f"sensor-{index % sensors:04d}", (index // sensors) * window) for index in flagged}
    return pairs, threshold, window


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_replayed_test_split_alerts_exactly_what_evaluate_flags(
    broker, capture_factory, daemon_factory, tmp_path, dtype
):
    """With either `model.dtype`, the daemon alerts on exactly the windows `monitor evaluate --dtype` flags."""
    if dtype == "bfloat16" and not native_bfloat16():
        pytest.skip("this CPU has no native bfloat16")
    config = daemon_config(tmp_path / "monitor.yaml", broker.port, batching={"max_batch": 64, "max_wait_seconds": 0.05})
    settings = yaml.safe_load(config.read_text())
    settings["model"]["dtype"] = dtype
    config.write_text(yaml.safe_dump(settings))
    daemon = daemon_factory(config)
    alerts = capture_factory(broker.port, ["alerts/#"])
    expected, threshold, window = expected_alerts(SPLITS / "test.txt.xz", SENSORS, dtype)
    total_windows = 3103
    evaluated = run_cli(
        "evaluate", "--model", str(DEFAULT_MODEL), "--data", str(SPLITS / "test.txt.xz"), "--dtype", dtype, "--json"
    )
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout)
    assert report["tp"] + report["fp"] == len(expected)

    result = run_cli(
        *replay_args(
            config,
            SPLITS / "test.txt.xz",
            SENSORS,
            "--chunk",
            str(CHUNK),
            "--labels-out",
            str(tmp_path / "labels.jsonl"),
        )
    )
    assert result.returncode == 0, result.stderr
    assert f"from {SENSORS} sensors" in result.stdout

    wait_until(
        lambda: metric(daemon.scrape(), "monitor_windows_scored_total") >= total_windows, 120, what="all windows scored"
    )
    capture_expected = len(expected)
    alerts.wait_for(lambda c: len(c.payloads("alerts/")) >= capture_expected, 60, what="all alerts")
    samples = daemon.scrape()
    assert metric(samples, "monitor_windows_scored_total") == total_windows  # every window once, none twice
    assert metric(samples, "monitor_messages_received_total", outcome="accepted") == total_windows * window / CHUNK
    assert metric(samples, "monitor_samples_received_total") == total_windows * window
    assert metric(samples, "monitor_windows_dropped_total", reason="queue_full") == 0
    assert metric(samples, "monitor_alerts_published_total") == len(expected)

    payloads = alerts.payloads("alerts/")
    got = {(alert["sensor_id"], alert["window_start_seq"]) for alert in payloads}
    assert len(payloads) == len(got), "an alert was published twice"
    assert got == expected
    for alert in payloads:
        assert alert["window_end_seq"] == alert["window_start_seq"] + window
        assert alert["score"] > alert["threshold"] == pytest.approx(threshold)
        assert alert["model"] == {"name": "ecg5000", "version": "1.0.0"}
        assert isinstance(alert["detected_at"], float) and isinstance(alert["window_start_ts"], float)
        assert len(alert["top_timesteps"]) == 5 and all(0 <= t["offset"] < window for t in alert["top_timesteps"])

    assert daemon.stop() == 0
    stopped = daemon.events("stopped")
    assert stopped and stopped[0]["drain_seconds"] < 5


def test_metrics_endpoint_has_the_documented_names(broker, daemon_factory, tmp_path):
    daemon = daemon_factory(daemon_config(tmp_path / "monitor.yaml", broker.port))
    samples = daemon.scrape()
    names = {name for name, _ in samples}
    missing = [name for name in DOCUMENTED_METRICS if name not in names]
    assert not missing, f"metrics missing from /metrics: {missing}"
    assert metric(samples, "monitor_broker_connected") == 1
    assert metric(samples, "monitor_threshold") == pytest.approx(load_artifact(DEFAULT_MODEL).threshold)
    info = [labels for name, labels in samples if name == "monitor_model_info"]
    assert dict(info[0])["name"] == "ecg5000"
    # closed label sets, pre-touched: drop reasons exist at 0 before anything happened
    assert ("monitor_windows_dropped_total", (("reason", "queue_full"),)) in samples
    assert daemon.stop() == 0
