"""The drift statistic and the count of sensors far above the expected anomaly rate, in process on real scores."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from scipy.stats import binom

from monitor.alerts.drift import AnomalyRates, DriftMonitor, critical_counts
from monitor.config.schema import ModelSettings
from monitor.errors import ArtifactError
from monitor.model.artifact import load_artifact
from monitor.model.calibration import CalibrationScores
from monitor.model.engine import load_engine
from monitor.model.scoring import Scorer
from monitor.training.datasets import read_ucr
from tests.support import DEFAULT_MODEL, SPLITS

PSI_BOUND = 0.25
GAIN = 1.5


@pytest.fixture(scope="module")
def shipped():
    torch.set_num_threads(1)
    artifact = load_artifact(DEFAULT_MODEL)
    return artifact, Scorer.from_artifact(artifact), CalibrationScores.from_metadata(artifact.metadata)


def test_the_shipped_model_records_its_calibration_scores_reproducibly(shipped):
    artifact, scorer, recorded = shipped
    calibration = read_ucr(SPLITS / "calibration_normal.txt.xz")
    assert calibration.sha256 == artifact.metadata["training"]["calibration_sha256"]
    recomputed = CalibrationScores.from_errors(scorer.score_all(calibration.windows).errors, artifact.threshold)
    assert recorded.n_windows == recomputed.n_windows == 438
    assert recorded.levels == recomputed.levels
    assert recorded.quantiles == pytest.approx(recomputed.quantiles, rel=1e-6)
    assert recorded.above_threshold == recomputed.above_threshold == pytest.approx(5 / 438)
    # the threshold was calibrated as the 0.99 quantile of these very scores
    assert recorded.quantiles[recorded.levels.index(0.99)] == pytest.approx(artifact.threshold, rel=1e-6)


def test_calibration_scores_round_trip_and_old_artifacts_have_none():
    scores = CalibrationScores.from_errors(np.linspace(0.0, 1.0, 1001), threshold=0.95)
    assert scores.quantiles[4] == pytest.approx(0.5) and scores.above_threshold == pytest.approx(0.05, abs=1e-3)
    assert CalibrationScores.from_metadata({"calibration_scores": scores.to_dict()}) == scores
    assert CalibrationScores.from_metadata({}) is None
    assert scores.bin_shares() == pytest.approx([0.1] * 9 + [0.09, 0.01])
    for broken in [
        {"levels": [0.5]},
        {**scores.to_dict(), "quantiles": [1.0] * 9},
        {**scores.to_dict(), "levels": [0.9, *scores.levels[1:]]},
        {**scores.to_dict(), "above_threshold": 2},
    ]:
        with pytest.raises(ValueError):
            CalibrationScores.from_metadata({"calibration_scores": broken})


def test_the_ring_counts_exactly_the_last_window_scores():
    reference = CalibrationScores.from_errors(np.linspace(0.0, 1.0, 101), threshold=0.99)
    monitor = DriftMonitor(reference, window=50, min_windows=10)
    scores = np.random.default_rng(0).uniform(-0.1, 1.1, size=173)
    for start in range(0, len(scores), 17):
        monitor.observe(scores[start : start + 17])
    bins = np.searchsorted(np.asarray(reference.quantiles), scores[-50:], side="right")
    assert monitor.windows == 50
    assert monitor.shares() == pytest.approx(np.bincount(bins, minlength=11) / 50)
    assert monitor.share_above(0.5) == pytest.approx(np.mean(scores[-50:] > reference.quantiles[4]))


def test_psi_is_nan_until_enough_windows_and_zero_on_the_reference_itself():
    reference = CalibrationScores.from_errors(np.linspace(0.0, 1.0, 1001), threshold=0.99)
    monitor = DriftMonitor(reference, window=1000, min_windows=200)
    monitor.observe(np.linspace(0.0, 1.0, 199))
    assert math.isnan(monitor.psi()) and monitor.crossing(PSI_BOUND) is None
    monitor.observe(np.linspace(0.0, 1.0, 801))
    assert monitor.psi() < 0.01


def psi_trace(scorer: Scorer, reference: CalibrationScores, windows: np.ndarray, step: int = 50):
    """Stream the windows in batches of `step`; the PSI after each batch, and the crossings with their position."""
    monitor = DriftMonitor(reference, window=400, min_windows=200)
    trace, crossings = [], []
    for start in range(0, len(windows), step):
        monitor.observe(scorer.score(windows[start : start + step]).errors)
        trace.append((start + step, monitor.psi()))
        change = monitor.crossing(PSI_BOUND)
        if change:
            crossings.append((change, start + step))
    return [(position, value) for position, value in trace if not math.isnan(value)], crossings


def test_psi_stays_flat_on_normal_beats_and_moves_when_the_gain_changes_half_way(shipped):
    """The test split's normal beats (never trained on) in their order; then the same with gain x1.5 from half-way."""
    _, scorer, reference = shipped
    test = read_ucr(SPLITS / "test.txt.xz")
    normal = test.windows[~test.is_anomaly(1)]
    half = len(normal) // 2
    flat, crossings = psi_trace(scorer, reference, normal)
    assert max(value for _, value in flat) < 0.1 and crossings == []
    shifted = normal.copy()
    shifted[half:] *= GAIN
    moving, crossings = psi_trace(scorer, reference, shifted)
    before = [value for position, value in moving if position <= half]
    assert max(before) < 0.1
    assert moving[-1][1] > 4 * PSI_BOUND
    assert [change for change, _ in crossings] == ["crossed"] and crossings[0][1] > half


def test_psi_of_the_whole_test_split_is_high_but_flat(shipped):
    """Two thirds of the test split's beats are anomalous: its PSI is high from the start and stays where it is."""
    _, scorer, reference = shipped
    windows = read_ucr(SPLITS / "test.txt.xz").windows
    trace, _ = psi_trace(scorer, reference, windows)
    values = np.array([value for _, value in trace])
    assert values.min() > PSI_BOUND
    assert values.max() - values.min() < 0.5 * values.mean()


def test_critical_counts_are_the_binomial_tail():
    counts = critical_counts(0.0114, 100, 1e-4)
    for size in (20, 50, 100):
        k = counts[size]
        assert binom.sf(k - 1, size, 0.0114) <= 1e-4 < binom.sf(k - 2, size, 0.0114)


def test_sensors_far_above_the_expected_rate_are_counted_and_leave_the_count():
    rates = AnomalyRates(expected_rate=0.0114, window=100, min_windows=20, alpha=1e-4, max_sensors=3)
    for index in range(100):
        rates.observe("normal", index == 50, now=float(index))  # 1 % anomalous: as expected
        rates.observe("failing", index % 5 == 0, now=float(index))  # 20 %
    assert rates.high == 1
    for index in range(100, 200):
        rates.observe("failing", False, now=float(index))
    assert rates.high == 0  # its anomalous decisions have left the window
    for index in range(200, 220):
        rates.observe("failing", index % 2 == 0, now=float(index))
    assert rates.high == 1
    rates.expire(now=219.0 + 60, idle_seconds=60)
    assert rates.high == 0


def test_too_few_decisions_are_not_judged():
    rates = AnomalyRates(expected_rate=0.01, window=100, min_windows=20)
    for index in range(19):
        rates.observe("new", True, now=float(index))
    assert rates.high == 0
    rates.observe("new", True, now=19.0)
    assert rates.high == 1


def test_an_artifact_from_before_calibration_scores_still_loads_without_them(tmp_path):
    old = tmp_path / "old"
    shutil.copytree(DEFAULT_MODEL, old)
    metadata = json.loads((old / "model.json").read_text())
    del metadata["calibration_scores"]
    (old / "model.json").write_text(json.dumps(metadata))
    assert load_engine(ModelSettings(path=old, device="cpu")).calibration is None
    metadata["calibration_scores"] = {"levels": [0.5], "quantiles": []}
    (old / "model.json").write_text(json.dumps(metadata))
    with pytest.raises(ArtifactError, match="calibration_scores"):
        load_engine(ModelSettings(path=old, device="cpu"))
