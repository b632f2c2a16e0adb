"""Per-sensor baselines and labelled recordings: the estimator, window labels, segments,
training on several labelled recordings and `monitor evaluate --labels` against figures computed by hand."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry

from monitor.config.loading import validate
from monitor.errors import ConfigError, DataError
from monitor.ingest.batching import WindowQueue
from monitor.ingest.payload import Message, PayloadDecoder
from monitor.ingest.stage import Ingest
from monitor.ingest.windowing import WindowAssembler
from monitor.model.artifact import load_artifact
from monitor.model.baseline import (
    ABSOLUTE_FLOOR,
    CLIP,
    RELATIVE_FLOOR,
    SensorBaseline,
    SensorBaselines,
    resolve_baseline,
    trained_baseline,
)
from monitor.model.scoring import Scorer
from monitor.telemetry.metrics import Metrics
from monitor.training.datasets import read_labelled_recording
from monitor.training.recordings import segment_figures, segments
from monitor.training.trainer import TrainSettings, train
from monitor.window import Window
from tests.support import REPO, run_cli

EXCERPT = REPO / "data" / "smd-excerpt"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


# --- the estimator ------------------------------------------------------------------------------------


def test_baseline_median_mad_with_a_constant_channel():
    rng = np.random.default_rng(0)
    values = np.stack([rng.normal(5.0, 2.0, 4000), np.zeros(4000), np.full(4000, 300.0)], axis=1).astype(np.float32)
    baseline = SensorBaseline.fit(values.reshape(100, 40, 3))
    assert abs(baseline.centre[0] - 5.0) < 0.15 and abs(baseline.scale[0] - 2.0) < 0.15  # MAD x 1.4826 ~ sigma
    assert baseline.scale[1] == np.float32(ABSOLUTE_FLOOR)  # constant 0: the absolute floor, not a division by zero
    assert baseline.scale[2] == np.float32(RELATIVE_FLOOR * 300.0)  # constant 300: the floor relative to its level
    later = np.array([[5.0, 0.0, 300.0], [5.0, 1.0, 303.0]], np.float32)
    normalised = baseline.apply(later)
    assert np.isfinite(normalised).all()
    assert normalised[0, 1] == 0.0 and normalised[0, 2] == 0.0
    assert normalised[1, 1] == CLIP  # 1.0 / 1e-6 clipped
    assert normalised[1, 2] == pytest.approx(1.0)


def test_baseline_channel_mostly_at_one_value():
    values = np.zeros((100, 40, 1), np.float32)
    values[::5, :10, 0] = 1.0  # excursions in 5 % of the samples: the MAD is 0, the channel is not constant
    baseline = SensorBaseline.fit(values)
    flat = values.reshape(-1).astype(np.float64)
    assert baseline.centre[0] == 0.0
    assert baseline.scale[0] == pytest.approx(0.5 * flat.std())  # nothing beyond the 1st/99th percentile to cut
    assert baseline.apply(np.ones((1, 1), np.float32))[0, 0] == pytest.approx(1.0 / (0.5 * flat.std()))  # < CLIP


def test_baseline_ignores_an_outlier_or_two():
    rng = np.random.default_rng(1)
    clean = rng.normal(0.0, 1.0, (200, 20, 2)).astype(np.float32)
    spoilt = clean.copy()
    spoilt[3, 5, 0] = 1e6
    spoilt[150, 7, 0] = -1e6
    spoilt[40, :, 1] = -1e4  # a whole outlying window in the other channel: 0.5 % of its samples
    a, b = SensorBaseline.fit(clean), SensorBaseline.fit(spoilt)
    np.testing.assert_allclose(a.centre, b.centre, atol=0.05)
    np.testing.assert_allclose(a.scale, b.scale, rtol=0.05)


def test_baseline_round_trip_and_refusals():
    baseline = SensorBaseline.fit(np.random.default_rng(2).normal(size=(10, 8, 3)).astype(np.float32))
    restored = SensorBaseline.from_dict(json.loads(json.dumps(baseline.to_dict())), 3)
    np.testing.assert_array_equal(restored.centre, baseline.centre)
    np.testing.assert_array_equal(restored.scale, baseline.scale)
    for bad in (
        {"centre": [0.0]},
        {"centre": [0.0] * 3, "scale": [1.0, 0.0, 1.0]},
        {"centre": [0.0] * 2, "scale": [1.0] * 2},
        None,
    ):
        with pytest.raises(ValueError):
            SensorBaseline.from_dict(bad, 3)


def test_resolve_baseline_checks_the_models_training():
    sensor = trained_baseline({"baseline": {"type": "sensor", "windows": 20}})
    assert sensor == ("sensor", 20) and trained_baseline({}) == ("model", None)
    assert resolve_baseline(sensor, None, None, "x") == 20
    assert resolve_baseline(sensor, "sensor", 7, "x") == 7
    assert resolve_baseline(("model", None), None, None, "x") is None
    with pytest.raises(ConfigError, match="trained with baseline 'sensor'"):
        resolve_baseline(sensor, "model", None, "x")
    with pytest.raises(ConfigError, match="trained with baseline 'model'"):
        resolve_baseline(("model", None), "sensor", 5, "x")


# --- windows, labels, segments -----------------------------------------------------------------------


def test_window_labels_and_segments_by_hand(tmp_path):
    np.save(tmp_path / "rec.npy", np.arange(40, dtype=np.float32).reshape(20, 2))
    labels = np.zeros(20, int)
    labels[7] = 1
    labels[16:18] = 1
    (tmp_path / "labels.txt").write_text("".join(f"{v}\n" for v in labels))
    recording = read_labelled_recording(tmp_path / "rec.npy", tmp_path / "labels.txt")
    # window 5, stride 3: starts 0, 3, 6, 9, 12, 15; [3, 8) and [6, 11) hold sample 7, [12, 17) and [15, 20) hold 16-17
    assert recording.window_starts(5, 3).tolist() == [0, 3, 6, 9, 12, 15]
    assert recording.window_anomalous(5, 3).tolist() == [False, True, True, False, True, True]
    assert segments(recording.labels) == [(7, 8), (16, 18)]
    flagged = np.array([False, False, True, False, False, True])
    found = segment_figures(recording.labels, recording.window_starts(5, 3), 5, flagged)
    # segment 7: first flagged overlapping window [6, 11) ends at 10, delay 11 - 7 = 4; segment 16: [15, 20), 20 - 16
    assert found == {"segments": 2, "segments_caught": 2, "delays_samples": [4, 4], "median_delay_samples": 4.0}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("0\n1\n", r"\[2\] labels for a recording of 20"),
        ("0\n" * 19 + "2\n", r"must be 0 \(normal\) or 1"),
        ("x\n" * 20, "not one 0/1 label"),
    ],
)
def test_bad_labels_refused(tmp_path, content, message):
    np.save(tmp_path / "rec.npy", np.zeros((20, 2), np.float32))
    (tmp_path / "labels.txt").write_text(content)
    with pytest.raises(DataError, match=message):
        read_labelled_recording(tmp_path / "rec.npy", tmp_path / "labels.txt")


def test_train_settings_refusals():
    with pytest.raises(ConfigError, match="baseline_windows: required"):
        validate(TrainSettings, {"train_data": ["a.npy"], "baseline": "sensor"}, "flags")
    with pytest.raises(ConfigError, match="2 label files for 1 recordings"):
        validate(TrainSettings, {"train_data": "a.npy", "train_labels": ["a", "b"]}, "flags")
    with pytest.raises(ConfigError, match="not with recordings"):
        validate(TrainSettings, {"train_data": ["a.npy", "b.npy"], "evaluate_data": "c.txt"}, "flags")


# --- training and evaluate on a 2-channel labelled recording -------------------------------------------


@pytest.fixture(scope="module")
def two_channel(tmp_path_factory):
    """Two real SMD channels (0 and 1 of machine-1-3) as 2-channel recordings; a tiny sensor-baseline model."""
    root = tmp_path_factory.mktemp("two-channel")
    train_rows = np.load(EXCERPT / "machine-1-3_train.npy")[:, :2]
    test_rows = np.load(EXCERPT / "machine-1-3_test.npy")[:, :2]
    labels = np.load(EXCERPT / "machine-1-3_test_labels.npy")
    np.savetxt(root / "train.csv", train_rows, delimiter=",", fmt="%.6f")
    train_labels = np.zeros(len(train_rows), int)
    train_labels[100:130] = 1  # left out of training: windows touching rows 100-129
    np.save(root / "train_labels.npy", train_labels)
    np.savetxt(root / "test.csv", test_rows, delimiter=",", fmt="%.6f")
    (root / "test_labels.txt").write_text("".join(f"{v}\n" for v in labels))
    result = train(
        TrainSettings(
            train_data=[root / "train.csv"],
            train_labels=[root / "train_labels.npy"],
            window=10,
            stride=5,
            baseline="sensor",
            baseline_windows=20,
            baseline_follow_rate=0.0,  # the fixed baseline, computed by hand below
            level_dim=0,  # and the plain model's scores, unscaled
            score_scale="none",
            output=root / "model",
            embedding_dim=4,
            epochs=2,
            seed=0,
            threads=1,
            report=False,
        )
    )
    return root, result


def test_training_leaves_labelled_windows_out(two_channel):
    _, result = two_channel
    meta = result.artifact.metadata
    recording = meta["training"]["recordings"][0]
    # windows of 10 every 5 over 1500 rows: 299; those touching rows 100-129: starts 95 to 125, 7 windows
    assert recording["windows"] == 299 and recording["anomalous_windows_left_out"] == 7
    assert meta["baseline"]["type"] == "sensor" and meta["baseline"]["windows"] == 20
    assert meta["normalisation"]["mean"] == [0.0, 0.0] and meta["normalisation"]["std"] == [1.0, 1.0]


def test_evaluate_two_channel_recording_against_hand_figures(two_channel):
    root, _ = two_channel
    stride, warm_up = 7, 20
    recording = ["--data", str(root / "test.csv"), "--labels", str(root / "test_labels.txt")]
    done = run_cli(
        "evaluate", "--model", str(root / "model"), *recording, "--stride", str(stride), "--json", env=ONE_THREAD
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    # By hand: cut, fit median / 1.4826 MAD on the first 20 windows, normalise, score the rest, count.
    artifact = load_artifact(root / "model")
    rows = np.loadtxt(root / "test.csv", delimiter=",", dtype=np.float32)
    labels = np.loadtxt(root / "test_labels.txt", dtype=int)
    starts = list(range(0, len(rows) - 10 + 1, stride))
    windows = np.stack([rows[s : s + 10] for s in starts])
    warm = windows[:warm_up].reshape(-1, 2).astype(np.float64)
    centre = np.median(warm, axis=0)
    low, high = np.percentile(warm, [1, 99], axis=0)
    spread = np.maximum(1.4826 * np.median(np.abs(warm - centre), axis=0), 0.5 * np.clip(warm, low, high).std(axis=0))
    scale = np.maximum(spread, np.maximum(0.01 * np.abs(centre), 1e-6))
    normalised = np.clip((windows[warm_up:] - centre.astype(np.float32)) / scale.astype(np.float32), -10, 10)
    scores = Scorer.from_artifact(artifact).score_all(normalised.astype(np.float32)).errors
    anomalous = np.array([labels[s : s + 10].any() for s in starts[warm_up:]])
    flagged = scores > artifact.threshold
    tp, fp = int((flagged & anomalous).sum()), int((flagged & ~anomalous).sum())
    fn, tn = int((~flagged & anomalous).sum()), int((~flagged & ~anomalous).sum())
    assert (report["tp"], report["fp"], report["fn"], report["tn"]) == (tp, fp, fn, tn)
    assert report["n_windows"] == len(starts) - warm_up and report["n_anomalies"] == int(anomalous.sum()) > 0
    assert report["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    positives, negatives = scores[anomalous], scores[~anomalous]
    auc = ((positives[:, None] > negatives[None, :]).sum() + 0.5 * (positives[:, None] == negatives[None, :]).sum()) / (
        len(positives) * len(negatives)
    )
    assert report["auc"] == pytest.approx(auc)
    caught = sum(
        any(flagged[i] and s < end and s + 10 > begin for i, s in enumerate(starts[warm_up:]))
        for begin, end in [(392, 416), (1257, 1268)]
    )
    assert (report["segments"], report["segments_caught"]) == (2, caught)
    only = report["recordings"][0]
    assert only["flagged_window_starts"] == [s for i, s in enumerate(starts[warm_up:]) if flagged[i]]
    assert (report["baseline"], report["baseline_windows"], report["stride"]) == ("sensor", warm_up, stride)


def test_evaluate_refusals(two_channel):
    root, _ = two_channel
    base = ["evaluate", "--model", str(root / "model"), "--data", str(root / "test.csv")]
    for extra, message in (
        (
            ["--labels", str(root / "test_labels.txt"), str(root / "test_labels.txt")],
            "2 label files for 1 recordings (one each)",
        ),
        (["--labels", str(root / "test_labels.txt"), "--baseline", "model"], "trained with baseline 'sensor'"),
        (["--labels", str(root / "test_labels.txt"), "--window", "12"], "takes windows of 10"),
        (["--labels", str(root / "test_labels.txt"), "--baseline-windows", "400"], "not more than the 400 baseline"),
    ):
        done = run_cli(*base, *extra, env=ONE_THREAD)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


# --- the daemon's per-sensor state ---------------------------------------------------------------------


def test_sensor_baselines_warm_up_then_normalise_and_forget():
    rng = np.random.default_rng(3)
    windows = rng.normal(4.0, 2.0, (6, 5, 2)).astype(np.float32)
    state = SensorBaselines(3, 5, 2)
    assert [state.admit("a", w) for w in windows[:3]] == [None, None, None]
    assert state.sensors_warming_up == 0
    expected = SensorBaseline.fit(windows[:3])
    np.testing.assert_array_equal(state.admit("a", windows[3])[0], expected.apply(windows[3]))
    assert state.admit("b", windows[0]) is None and state.sensors_warming_up == 1
    state.forget("a")
    assert state.admit("a", windows[4]) is None  # back after eviction: a new warm-up


def test_sensor_baselines_snapshot_restore():
    rng = np.random.default_rng(4)
    windows = rng.normal(size=(8, 5, 2)).astype(np.float32)
    state = SensorBaselines(3, 5, 2)
    for w in windows[:4]:
        state.admit("fitted", w)
    state.admit("warming", windows[5])
    saved = json.loads(json.dumps(state.snapshot()))
    again = SensorBaselines(3, 5, 2)
    assert again.restore(saved, ["fitted", "warming", "other"]) == 2
    np.testing.assert_array_equal(again.admit("fitted", windows[6])[0], state.admit("fitted", windows[6])[0])
    assert again.admit("warming", windows[6]) is None and again.admit("warming", windows[7]) is None
    np.testing.assert_array_equal(
        again.admit("warming", windows[0])[0], SensorBaseline.fit(windows[[5, 6, 7]]).apply(windows[0])
    )
    assert SensorBaselines(3, 5, 2).restore(saved, ["warming"]) == 1  # only the sensors whose windows came back
    shorter = SensorBaselines(1, 5, 2)
    shorter.restore(saved, ["warming"])  # a warm-up already as long as the new one fits at once
    assert shorter.sensors_warming_up == 0
    for bad in (
        saved | {"window": 6},
        saved | {"fitted": {"fitted": {"centre": [0.0]}}},
        saved | {"warming": {"warming": "%%"}},
        [],
    ):
        with pytest.raises(ValueError):
            SensorBaselines(3, 5, 2).restore(bad, ["fitted", "warming"])


def test_assembler_eviction_forgets_the_baseline():
    state = SensorBaselines(1, 2, 1)
    assembler = WindowAssembler(2, 2, 1, max_sensors=10, idle_seconds=5.0, on_evict=state.forget)
    result = assembler.feed("s", Message(np.ones((2, 1), np.float32), 0, None), now=0.0)
    assert state.admit("s", result.windows[0].samples) is None  # warm-up of one window: fitted
    assert state.admit("s", result.windows[0].samples) is not None
    assert assembler.evict_idle(now=10.0) == 1
    assert state.admit("s", result.windows[0].samples) is None  # forgotten with the sensor


def test_ingest_warm_up_counted_and_a_sensor_back_after_eviction_warms_up_again():
    """The ingest stage in-process with a real metrics registry: warm-up windows are counted and never queued,
    later ones are queued normalised, and a sensor evicted for idleness starts a new warm-up when it returns."""
    registry = CollectorRegistry()
    metrics = Metrics(registry, 64, 1.0)
    queue: WindowQueue[Window] = WindowQueue(100)
    baselines = SensorBaselines(2, 4, 2)
    assembler = WindowAssembler(4, 4, 2, max_sensors=10, idle_seconds=5.0, on_evict=baselines.forget)
    ingest = Ingest(PayloadDecoder(2), assembler, queue, metrics, 1, baselines=baselines)
    samples = np.random.default_rng(5).normal(3.0, 1.0, (20, 2))

    def send(start: int, end: int, now: float) -> None:
        payload = orjson.dumps({"samples": samples[start:end].tolist(), "seq": start})
        ingest.handle("sensors/s1/ecg", payload, now)

    def counted(name: str) -> float:
        return registry.get_sample_value(name) or 0.0

    send(0, 12, now=0.0)  # windows at 0, 4, 8: two warm up, the third is queued
    ingest.housekeeping(now=0.5)
    assert counted("monitor_windows_warming_up_total") == 2 and queue.depth() == 1
    assert counted("monitor_sensors_warming_up") == 0
    expected = SensorBaseline.fit(np.stack([samples[0:4], samples[4:8]]).astype(np.float32)).apply(samples[8:12])
    np.testing.assert_array_equal(queue.get(0.1).samples, expected)

    ingest.housekeeping(now=10.0)  # idle for 10 s > 5: evicted, with its baseline
    assert counted("monitor_sensors_evicted_total") == 1
    send(12, 16, now=11.0)  # back: the window at 12 starts a new warm-up
    ingest.housekeeping(now=11.5)
    assert counted("monitor_windows_warming_up_total") == 3 and counted("monitor_sensors_warming_up") == 1
    send(16, 20, now=12.0)  # and the window at 16 completes it
    ingest.housekeeping(now=12.5)
    assert counted("monitor_windows_warming_up_total") == 4 and counted("monitor_sensors_warming_up") == 0
    assert queue.depth() == 0
