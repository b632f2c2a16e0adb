"""The daemon in beat mode, end to end: a vendored MIT-BIH recording replayed through a real Mosquitto into
`monitor run` flags exactly the beats offline scoring flags; the state survives a SIGTERM restart; a bad
`sample_rate_hz` and a model of the other mode are one line each."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.ecg.beats import beat_spec, cut_beats
from monitor.model.artifact import load_artifact
from monitor.model.scoring import Scorer
from monitor.training.beat_data import read_recording
from tests.support import DEFAULT_MODEL, REPO, daemon_config, metric, replay_args, run_cli, wait_until

pytestmark = pytest.mark.slow

BEAT_MODEL = REPO / "models" / "mitdb-beats"
RECORD = REPO / "data" / "mitdb-dev" / "test" / "208_excerpt.npy"
TRAIN_PART = REPO / "data" / "mitdb-dev" / "train" / "208_excerpt.npy"  # the 100 s before RECORD
FS = 360.0
SENSORS = 2
CHUNK = 90


def offline(signal: np.ndarray) -> tuple[int, int, dict[int, float], float, int, int]:
    """(beats found, beats scored, the flagged beats' scores by R peak, threshold, beats scored in a noisy stretch,
    beats flagged by their timing score) as `monitor evaluate` cuts and scores them."""
    artifact = load_artifact(BEAT_MODEL)
    spec = beat_spec(artifact.metadata, BEAT_MODEL)
    assert spec is not None and spec.stretch_limit is not None  # the bundled model scales scores in noisy stretches
    beats = cut_beats(signal, FS, spec)
    scorable = [beat for beat in beats if beat.scorable]
    errors = Scorer.from_artifact(artifact).score_all(np.stack([beat.window for beat in scorable])).errors
    stretch = np.array([beat.stretch for beat in scorable])
    correlation = np.array([beat.qrs_correlation for beat in scorable])
    assert spec.qrs_correlation is not None and (correlation > spec.qrs_correlation).any()  # its QRS scale acts
    earliness = np.array([beat.earliness for beat in scorable])
    assert (earliness < np.array([beat.prematurity for beat in scorable])).any()  # the timing saw the next beat
    rr_spread = np.array([beat.rr_spread for beat in scorable])
    scores = spec.beat_scores(errors, stretch, correlation, earliness, rr_spread)
    flagged = {
        beat.r_seq: float(score) for beat, score in zip(scorable, scores, strict=True) if score > artifact.threshold
    }
    by_timing = spec.timing_score(earliness, rr_spread) > errors / spec.error_scale(stretch, correlation)
    return (
        len(beats), len(scorable), flagged, artifact.threshold, int((spec.stretch_scale(stretch) > 1).sum()),
        int((by_timing & (scores > artifact.threshold)).sum()),
    )  # fmt: skip


def replay(config, recording, sensors: int) -> None:
    result = run_cli(*replay_args(config, recording, sensors, "--chunk", str(CHUNK), "--sample-rate-hz", str(FS)))
    assert result.returncode == 0, result.stderr


def beat_config(tmp_path, port: int, **windowing):
    return daemon_config(
        tmp_path / "monitor.yaml",
        port,
        model=BEAT_MODEL,
        windowing={"mode": "beats", "sample_rate_hz": FS, **windowing},
        batching={"max_batch": 64, "max_wait_seconds": 0.05},
    )


def test_replayed_recording_alerts_exactly_the_beats_offline_scoring_flags(
    broker, capture_factory, daemon_factory, tmp_path
):
    # the whole excerpt as one stream (its train part, then RECORD): bigeminy, couplets, noisy stretches
    signal = np.concatenate([read_recording(path, FS).signal for path in (TRAIN_PART, RECORD)])
    whole = tmp_path / "whole.npy"
    np.save(whole, signal.astype(np.float32))
    found, scored, flagged, threshold, noisy_stretch, by_timing = offline(signal)
    assert flagged and scored > 200 and noisy_stretch > 0
    assert by_timing > 0  # some alerts' scores are their timing scores
    config = beat_config(tmp_path, broker.port)
    daemon = daemon_factory(config)
    alerts = capture_factory(broker.port, ["alerts/#"])
    replay(config, whole, SENSORS)
    wait_until(
        lambda: metric(daemon.scrape(), "monitor_windows_scored_total") >= SENSORS * scored,
        120,
        what="every beat scored",
    )
    alerts.wait_for(lambda c: len(c.payloads("alerts/")) >= SENSORS * len(flagged), 60, what="every alert")
    samples = daemon.scrape()
    assert metric(samples, "monitor_beats_found_total") == SENSORS * found
    assert metric(samples, "monitor_windows_scored_total") == SENSORS * scored
    unscorable = sum(value for (name, _), value in samples.items() if name == "monitor_beats_unscorable_total")
    assert unscorable == SENSORS * (found - scored)
    assert metric(samples, "monitor_detector_resets_total") == 0
    assert metric(samples, "monitor_beats_noisy_stretch_total") == SENSORS * noisy_stretch
    payloads = alerts.payloads("alerts/")
    got = {(alert["sensor_id"], alert["beat_seq"]) for alert in payloads}
    assert len(got) == len(payloads), "a beat was alerted twice"
    assert got == {(f"sensor-{index:04d}", r) for index in range(SENSORS) for r in flagged}
    for alert in payloads:
        assert alert["score"] == pytest.approx(flagged[alert["beat_seq"]], rel=1e-5)  # timing counted as offline
        assert alert["window_start_seq"] < alert["beat_seq"] < alert["window_end_seq"]
        assert alert["rr_seconds"] is None or alert["rr_seconds"] > 0.2
        assert alert["score"] > alert["threshold"] == pytest.approx(threshold)
        assert alert["model"]["name"] == "mitdb-beats"
    assert daemon.stop() == 0


def test_detector_state_survives_a_sigterm_restart(broker, capture_factory, daemon_factory, tmp_path):
    signal = read_recording(RECORD, FS).signal[: int(60 * FS)]
    found, scored, flagged, *_ = offline(signal)
    # The second replay resends from seq 0: with the default tolerance (1024) that is a sensor rebooting (a new
    # stream, test_beatwindowing.py); a tolerance above the first half's 10,800 samples makes it the resend it is.
    config = beat_config(tmp_path, broker.port, state_file=str(tmp_path / "state.json"), seq_tolerance=len(signal))
    half = tmp_path / "first.npy"
    np.save(half, signal[: len(signal) // 2].astype(np.float32))
    daemon = daemon_factory(config)
    alerts = capture_factory(broker.port, ["alerts/#"])
    replay(config, half, 1)
    wait_until(
        lambda: metric(daemon.scrape(), "monitor_samples_received_total") >= len(signal) // 2,
        60,
        what="first half received",
    )
    first = metric(daemon.scrape(), "monitor_beats_found_total")
    assert daemon.stop() == 0
    daemon = daemon_factory(config)
    # the second half continues the same stream: seq carries on where the first half stopped
    rest = tmp_path / "whole.npy"
    np.save(rest, signal.astype(np.float32))
    replay(config, rest, 1)  # the first half again: duplicates, trimmed
    wait_until(
        lambda: first + metric(daemon.scrape(), "monitor_beats_found_total") >= found, 60, what="every beat found"
    )
    assert first + metric(daemon.scrape(), "monitor_beats_found_total") == found
    assert metric(daemon.scrape(), "monitor_detector_resets_total") == 0
    alerts.wait_for(lambda c: len(c.payloads("alerts/")) >= len(flagged), 60, what="every alert")
    assert {alert["beat_seq"] for alert in alerts.payloads("alerts/")} == set(flagged)
    assert daemon.stop() == 0


@pytest.mark.parametrize(
    ("model", "windowing", "fragments"),
    [
        (
            BEAT_MODEL,
            {"mode": "beats", "sample_rate_hz": 10},
            ("windowing.sample_rate_hz: ", "between 50 and 10000 Hz"),
        ),
        (
            DEFAULT_MODEL,
            {"mode": "beats", "sample_rate_hz": 250},
            ("windowing.mode beats (from ", "monitor.yaml) does not fit", "fixed-window model"),
        ),
        (BEAT_MODEL, {}, ("windowing.mode fixed (from ", "monitor.yaml) does not fit", "beat-mode model")),
    ],
)
def test_bad_sample_rate_and_model_of_the_other_mode_are_one_line(broker, tmp_path, model, windowing, fragments):
    config = daemon_config(tmp_path / "monitor.yaml", broker.port, model=model, windowing=windowing)
    result = run_cli("check-config", str(config))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and all(fragment in lines[0] for fragment in fragments), lines
