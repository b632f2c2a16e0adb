"""`monitor replay` and `monitor watch` without a broker: the labels a replay writes (windows, or the annotated beats
of a recording), how watch scores alerts against them (by beat within 150 ms), how it counts duplicates (by the
alert's identity, so a restarted stream's alerts are new ones), and the one-line refusals before any connection."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.cli import main
from monitor.errors import DataError
from monitor.tools.replay import load_plan, plan_ucr, sensor_names, write_labels
from monitor.tools.watch import AlertLog, BeatLabels, format_alert, read_labels, summary
from monitor.training.datasets import WindowSet
from tests.support import REPO, free_port

RECORD = REPO / "data" / "mitdb-dev" / "test" / "208_excerpt"


@pytest.fixture(autouse=True)
def unconfigured_logging(monkeypatch):
    """The commands run in this process would configure structlog for the whole session (its loggers cache that
    configuration), and later tests that capture log lines would see none."""
    monkeypatch.setattr("monitor.telemetry.log.configure_logging", lambda *args, **kwargs: None)


def alert(sensor: str, start: int, ts: float | None, beat: int | None = None, instance: str = "monitor-a") -> dict:
    record = {"sensor_id": sensor, "window_start_seq": start, "window_end_seq": start + 140, "score": 0.5}
    record |= {"threshold": 0.3, "instance": instance, "window_start_ts": ts}
    return record if beat is None else {**record, "beat_seq": beat}


def test_duplicates_are_counted_by_identity_and_a_restarted_stream_is_new():
    log = AlertLog()
    assert log.add(alert("s1", 140, 100.0))
    assert not log.add(alert("s1", 140, 100.0))  # redelivered: the same alert
    assert log.add(alert("s1", 140, 250.0))  # the stream restarted: the same window again, later
    assert log.add(alert("s1", 140, 100.0, instance="monitor-b"))  # another instance decided it too
    assert (log.received, log.duplicates, len(log.alerts)) == (4, 1, 3)
    assert log.flagged("window_start_seq") == {("s1", 140)}
    assert format_alert(alert("s1", 140, 1.0), new=False).endswith("(duplicate)")
    assert "beat 170" in format_alert(alert("s1", 140, 1.0, beat=170), new=True)


def test_window_labels_round_trip_and_summary(tmp_path):
    windows = np.zeros((4, 140, 1), np.float32)
    plan = plan_ucr(WindowSet(windows, np.array([1, 2, 1, 2]), "x", ""), sensor_names(2))
    write_labels(plan, tmp_path / "labels.jsonl", 250.0)
    labels = read_labels(tmp_path / "labels.jsonl")
    assert labels == {("sensor-0000", 0): 1, ("sensor-0001", 0): 2, ("sensor-0000", 140): 1, ("sensor-0001", 140): 2}
    log = AlertLog()
    for ts in (1.0, 1.0, 9.0):  # one redelivery, one restart
        log.add(alert("sensor-0001", 0, ts))
    text = summary(log, labels, 1, None)
    assert "alerts received    3  (duplicates 1, outside the labelled windows 0)" in text
    assert "confusion: tp 1  fp 0  fn 1  tn 2" in text


def test_an_annotated_recording_labels_its_beats_and_watch_scores_them_by_beat(tmp_path):
    plan = load_plan(RECORD.with_suffix(".npy"), 2, annotations=RECORD.with_suffix(".csv"))
    write_labels(plan, tmp_path / "beats.jsonl", 360.0)
    labels = read_labels(tmp_path / "beats.jsonl")
    assert isinstance(labels, BeatLabels)
    assert (labels.sample_rate_hz, labels.match_seconds, labels.samples) == (360.0, 0.15, 72000)
    positions, classes = labels.beats["sensor-0001"]
    assert set(classes) <= {"N", "S", "V", "F"} and (classes == "V").sum() > 50
    anomalous = positions[classes != "N"]
    normal = positions[classes == "N"]
    log = AlertLog()
    log.add(alert("sensor-0000", 0, 1.0, beat=int(anomalous[0]) + 50))  # within 150 ms (54 samples)
    log.add(alert("sensor-0000", 0, 1.0, beat=int(anomalous[0]) + 50))  # a duplicate
    log.add(alert("sensor-0000", 10, 1.0, beat=int(normal[0]) - 20))  # a false alarm
    log.add(alert("sensor-0000", 20, 1.0, beat=int(anomalous[1]) + 60))  # beyond 150 ms: matches nothing
    text = summary(log, labels, 1, None)
    total = 2 * len(positions)
    assert f"beats annotated    {total}  ({2 * len(anomalous)} anomalous" in text
    assert "alerts received    4  (duplicates 1, outside the annotated beats 1)" in text
    assert f"confusion: tp 1  fp 1  fn {2 * len(anomalous) - 1}  tn {2 * len(normal) - 1}" in text


def test_labels_out_without_labels_and_a_contradicted_rate_are_refused_before_connecting(tmp_path, capsys):
    plan = load_plan(RECORD.with_suffix(".npy"), 1)
    with pytest.raises(DataError, match="give its --annotations"):
        write_labels(plan, tmp_path / "none.jsonl", 360.0)
    assert not (tmp_path / "none.jsonl").exists()
    config = tmp_path / "beats.yaml"
    closed = free_port()  # nothing listens: a refusal must come before any connection
    config.write_text((REPO / "configs" / "monitor-beats.yaml").read_text())
    argv = ["replay", "--config", str(config), "--data", str(RECORD.with_suffix(".npy")), "--sensors", "1"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MONITOR_MQTT__PORT", str(closed))
        assert main([*argv, "--sample-rate-hz", "250"]) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"monitor: error: --sample-rate-hz 250: the daemon's windowing.sample_rate_hz is 360 (from {config}); "
            "replay at the rate the daemon expects, or configure the daemon for this recording's rate"
        ]
        assert main([*argv, "--labels-out", str(tmp_path / "none.jsonl")]) == 2
        assert "give its --annotations" in capsys.readouterr().err
        assert main(argv) == 2  # at the configured rate the replay goes ahead: to the closed port
        assert capsys.readouterr().err.splitlines() == [
            f"monitor: error: cannot reach the broker at 127.0.0.1:{closed} ([Errno 111] Connection refused)"
        ]
