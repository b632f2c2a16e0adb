"""Per-sensor score scales: decisions that do not depend on a sensor's score level, the same scale offline and in
the daemon's state, and the scale surviving the state file, the journal's pending windows and a model's identity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from monitor.alerts.sink import ThresholdDecision, build_alert
from monitor.ingest.journal import decode_windows, encode_windows
from monitor.ingest.state_file import read_state, write_state
from monitor.model.artifact import Normalisation
from monitor.model.autoencoder import LSTMAutoencoder
from monitor.model.baseline import SensorBaseline, SensorBaselines, score_scale
from monitor.model.calibration import calibrate
from monitor.model.engine import Engine, EngineScales, ModelIdentity
from monitor.model.scoring import Scorer
from monitor.training.recordings import warm_up_scale
from monitor.window import Window

WINDOW, CHANNELS, WARM_UP = 6, 3, 5


def test_a_sensor_whose_scores_are_twice_anothers_gets_the_same_decisions():
    """Two sensors with the same pattern of scores, one at twice the level: divided by their warm-ups' medians and
    compared with a threshold calibrated on scores divided so, each window gets the same decision on both. On the raw
    scores a threshold calibrated on both decides them apart."""
    rng = np.random.default_rng(0)
    quiet = np.abs(rng.normal(1.0, 0.2, 600))
    quiet[[200, 350, 480]] *= 4.0  # three faults
    loud = 2.0 * quiet
    warm, calibration, later = slice(0, 100), slice(100, 300), slice(300, 600)
    scales = [score_scale(scores[warm]) for scores in (quiet, loud)]
    assert scales[1] == pytest.approx(2.0 * scales[0])
    scaled = [scores / scale for scores, scale in zip((quiet, loud), scales, strict=True)]
    threshold = calibrate(np.concatenate([scores[calibration] for scores in scaled])).threshold
    decide = ThresholdDecision(threshold).anomalous
    np.testing.assert_array_equal(decide(scaled[0][later]), decide(scaled[1][later]))
    assert decide(scaled[0][later])[[50, 180]].all()  # the faults after calibration are caught on both
    raw_threshold = calibrate(np.concatenate([quiet[calibration], loud[calibration]])).threshold
    raw = ThresholdDecision(raw_threshold).anomalous
    assert raw(loud[later]).sum() > raw(quiet[later]).sum()  # the same windows, decided apart by level alone


@pytest.fixture()
def engine() -> Engine:
    """A real (untrained) model behind the engine the daemon scores with."""
    torch.manual_seed(0)
    model = LSTMAutoencoder(CHANNELS, 4)
    scorer = Scorer(model, Normalisation.identity(CHANNELS))
    identity = ModelIdentity("scaled", "1")
    return Engine(scorer, 0.5, WINDOW, CHANNELS, identity, "torch", "cpu", score_scale=True)


def sensor_windows(seed: int, gain: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (gain * rng.normal(5.0, 1.0 + seed, (WARM_UP + 3, WINDOW, CHANNELS))).astype(np.float32)


def test_the_daemon_measures_the_scale_offline_evaluation_measures(engine):
    """The scale `SensorBaselines` measures when a warm-up completes is the one training and `monitor evaluate` take
    for the same windows; a window after the warm-up carries it, and the alert says what the score was divided by."""
    windows = sensor_windows(1, 3.0)
    state = SensorBaselines(WARM_UP, WINDOW, CHANNELS, 0.0, EngineScales(lambda: engine))
    assert all(state.admit("s", window) is None for window in windows[:WARM_UP])
    offline = warm_up_scale(engine.scorer, SensorBaseline.fit(windows[:WARM_UP]).apply(windows[:WARM_UP]))
    assert state.scale_of("s") == offline and offline != 1.0
    assert state.scale_of("other") == 1.0
    admitted = state.admit("s", windows[WARM_UP])
    assert admitted is not None
    window = Window("s", 0, admitted[0], None, 0.0, state.scale_of("s"))
    scaled = engine.score_windows([window]).errors[0]
    assert scaled == pytest.approx(engine.score(admitted[0][None]).errors[0] / offline)
    alert = build_alert("s", 0, WINDOW, scaled, np.zeros(WINDOW), engine.threshold, engine.model, score_scale=offline)
    assert alert["score"] == scaled and alert["score_scale"] == offline
    assert alert["raw_score"] == pytest.approx(scaled * offline)


def test_scales_survive_the_state_file_and_the_journal_but_not_another_model(engine, tmp_path):
    scales = EngineScales(lambda: engine)
    state = SensorBaselines(WARM_UP, WINDOW, CHANNELS, 0.0, scales)
    for sensor, windows in (("a", sensor_windows(1, 1.0)), ("b", sensor_windows(2, 7.0))):
        for window in windows[:WARM_UP]:
            state.admit(sensor, window)
    state.admit("c", sensor_windows(3, 1.0)[0])  # still warming up
    path = tmp_path / "windows.json"
    write_state(path, {"sensors": [], "baselines": state.snapshot()})
    saved, damaged = read_state(path)
    assert damaged == 0
    again = SensorBaselines(WARM_UP, WINDOW, CHANNELS, 0.0, scales)
    assert again.restore(saved["baselines"], ["a", "b", "c"]) == 3
    assert [again.scale_of(s) for s in "abc"] == [state.scale_of("a"), state.scale_of("b"), 1.0]
    assert state.scale_of("a") != state.scale_of("b")

    retrained = Engine(engine.scorer, 0.7, WINDOW, CHANNELS, engine.model, "torch", "cpu", score_scale=True)
    other = SensorBaselines(WARM_UP, WINDOW, CHANNELS, 0.0, EngineScales(lambda: retrained))
    with pytest.raises(ValueError, match="measured by model"):
        other.restore(saved["baselines"], ["a"])
    unscaled = json.loads(json.dumps(SensorBaselines(WARM_UP, WINDOW, CHANNELS).snapshot()))
    assert SensorBaselines(WARM_UP, WINDOW, CHANNELS).restore(unscaled, []) == 0  # a model without scales: as before
    for bad in ({"score_scales": {"a": -1.0}}, {"score_scales": {"a": "x"}}, {"score_scales": {}}):
        with pytest.raises(ValueError):
            SensorBaselines(WARM_UP, WINDOW, CHANNELS, 0.0, scales).restore(saved["baselines"] | bad, ["a"])

    pending = [Window("a", 30, np.ones((WINDOW, CHANNELS), np.float32), None, 0.0, state.scale_of("a"))]
    pending.append(Window("z", 0, np.ones((WINDOW, CHANNELS), np.float32), 12.5, 0.0))
    replayed = decode_windows(json.loads(json.dumps(encode_windows(pending))), 1.0)
    assert [w.error_scale for w in replayed] == [state.scale_of("a"), 1.0]
    assert [w.beat for w in replayed] == [None, None]
