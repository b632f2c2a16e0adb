"""Threshold calibration on synthetic errors whose true quantiles are known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from monitor.errors import ConfigError
from monitor.model.calibration import DEFAULT_PARAMS, calibrate, calibrate_recordings

N = 200_000


@pytest.fixture(scope="module")
def exponential() -> np.ndarray:
    return np.random.default_rng(20240501).exponential(1.0, N)


@pytest.fixture(scope="module")
def normal() -> np.ndarray:
    return np.random.default_rng(7).normal(2.0, 0.5, N)


@pytest.mark.parametrize("q", [0.9, 0.99, 0.999])
def test_quantile_matches_the_true_exponential_quantile(exponential, q):
    result = calibrate(exponential, "quantile", {"q": q})
    true = -math.log(1.0 - q)  # Exp(1) quantile
    # Standard error of the sample quantile is sqrt(q(1-q)/n)/f(x_q): < 1 % of x_q up to q = 0.99.
    tolerance = 0.01 if q <= 0.99 else 0.03
    assert result.threshold == pytest.approx(true, rel=tolerance)
    # The empirical false-alarm rate on the calibration errors is 1 - q.
    assert np.mean(exponential > result.threshold) == pytest.approx(1.0 - q, abs=2.0 / N)


def test_quantile_on_a_normal_distribution(normal):
    result = calibrate(normal, "quantile", {"q": 0.95})
    assert result.threshold == pytest.approx(norm.ppf(0.95, loc=2.0, scale=0.5), abs=0.005)
    default = calibrate(normal)
    assert default.method == "quantile" and default.params == {"q": 0.99}
    assert default.threshold == pytest.approx(norm.ppf(0.99, loc=2.0, scale=0.5), abs=0.01)


@pytest.mark.parametrize("k", [0.0, 1.0, 3.0, 4.5])
def test_mean_std_is_mean_plus_k_std(normal, k):
    result = calibrate(normal, "mean_std", {"k": k})
    assert result.threshold == pytest.approx(normal.mean() + k * normal.std(ddof=1), rel=1e-12)
    assert result.threshold == pytest.approx(2.0 + k * 0.5, abs=0.01)
    assert result.params == {"k": k}


def test_mean_std_default_k_is_three():
    errors = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    result = calibrate(errors, "mean_std")
    # mean 5.5, sample std sqrt(82.5 / 9)
    assert result.threshold == pytest.approx(5.5 + 3.0 * math.sqrt(82.5 / 9.0), rel=1e-12)


@pytest.mark.parametrize("false_alarm_rate", [0.01, 0.002, 0.0005])
def test_pot_recovers_the_exponential_tail_quantile(exponential, false_alarm_rate):
    result = calibrate(exponential, "pot", {"tail_quantile": 0.9, "false_alarm_rate": false_alarm_rate})
    true = -math.log(false_alarm_rate)
    assert result.threshold == pytest.approx(true, rel=0.03)
    # The fit: excesses of an exponential over any level are Exp(1): shape ~ 0, scale ~ 1.
    assert result.fit["n_peaks"] == pytest.approx(0.1 * N, abs=2)
    assert result.fit["initial_threshold"] == pytest.approx(math.log(10.0), rel=0.01)
    assert abs(result.fit["shape"]) < 0.03
    assert result.fit["scale"] == pytest.approx(1.0, rel=0.03)


def test_pot_extrapolates_beyond_the_data_of_a_heavy_tail():
    # Lomax (Pareto II) with a = 5: excesses over any level are generalised Pareto with shape 1/a.
    a, false_alarm_rate = 5.0, 1e-4
    errors = np.random.default_rng(11).pareto(a, 20_000)
    true = false_alarm_rate ** (-1.0 / a) - 1.0
    assert np.sum(errors > true) <= 5  # too few exceedances for an empirical quantile
    result = calibrate(errors, "pot", {"tail_quantile": 0.9, "false_alarm_rate": false_alarm_rate})
    assert result.threshold == pytest.approx(true, rel=0.10)
    assert result.fit["shape"] == pytest.approx(1.0 / a, abs=0.06)


def test_recorded_method_params_and_count(exponential):
    result = calibrate(exponential[:5000], "pot", {"false_alarm_rate": 0.005})
    assert result.method == "pot"
    assert result.n_windows == 5000
    assert result.params == {"tail_quantile": 0.9, "false_alarm_rate": 0.005}
    recorded = result.to_dict()
    assert set(recorded) == {"method", "params", "n_windows", "threshold", "fit"}  # one recording: no more
    assert recorded["threshold"] == result.threshold and isinstance(recorded["threshold"], float)
    assert set(recorded["fit"]) == {"initial_threshold", "n_peaks", "shape", "scale"}
    quantile = calibrate(list(range(100)), "quantile", {"q": 0.5})
    assert (quantile.n_windows, quantile.method, quantile.threshold, quantile.fit) == (100, "quantile", 49.5, {})
    # Defaults are not shared mutable state.
    quantile.params["q"] = 0.1
    assert DEFAULT_PARAMS["quantile"] == {"q": 0.99}


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("percentile", None, "not one of quantile, mean_std, pot"),
        ("quantile", {"k": 3}, r"threshold\.k: not a parameter of method 'quantile'"),
        ("mean_std", {"q": 0.9}, r"threshold\.q: not a parameter"),
        ("quantile", {"q": 0.0}, r"threshold\.q: must be in \(0, 1\)"),
        ("quantile", {"q": 1.0}, r"threshold\.q: must be in \(0, 1\)"),
        ("quantile", {"q": 99}, r"threshold\.q: must be in \(0, 1\)"),
        ("quantile", {"q": "high"}, r"threshold\.q: must be a number"),
        ("mean_std", {"k": float("nan")}, r"threshold\.k: must be a finite number"),
        ("mean_std", {"k": float("inf")}, r"threshold\.k: must be a finite number"),
        ("pot", {"tail_quantile": 1.0}, "pot needs 0 < tail_quantile < 1"),
        ("pot", {"tail_quantile": 0.9, "false_alarm_rate": 0.1}, "false_alarm_rate < 1 - tail_quantile"),
        ("pot", {"false_alarm_rate": 0.0}, "pot needs"),
        ("pot", {"false_alarm_rate": -0.01}, "pot needs"),
    ],
)
def test_bad_parameters_raise_config_error(method, params, message):
    errors = np.random.default_rng(0).exponential(1.0, 1000)
    with pytest.raises(ConfigError, match=message) as error:
        calibrate(errors, method, params)
    assert "\n" not in str(error.value)


def test_bad_errors_raise_config_error():
    with pytest.raises(ConfigError, match="at least 10 finite errors, got 9"):
        calibrate(np.ones(9))
    with pytest.raises(ConfigError, match="finite errors"):
        calibrate(np.r_[np.ones(20), np.nan])
    with pytest.raises(ConfigError, match="finite errors"):
        calibrate(np.r_[np.ones(20), np.inf], "mean_std")
    with pytest.raises(ConfigError, match="finite errors"):
        calibrate(np.ones((5, 4)))
    # Too few peaks over the tail quantile for a fit.
    with pytest.raises(ConfigError, match="pot found only"):
        calibrate(np.r_[np.zeros(95), np.arange(1.0, 6.0)], "pot", {"tail_quantile": 0.98, "false_alarm_rate": 0.01})


def recordings_with_an_anomalous_end(seed: int = 3) -> list[np.ndarray]:
    """Four recordings' calibration errors from one distribution, the first with its last fifth far above it."""
    rng = np.random.default_rng(seed)
    recordings = [rng.exponential(1.0, 2000) for _ in range(4)]
    recordings[0][-400:] += 6.0
    return recordings


@pytest.mark.parametrize(("method", "params"), [("quantile", None), ("mean_std", None), ("pot", None)])
def test_one_recording_with_an_anomalous_end_does_not_set_everyones_threshold(method, params):
    """The median of the recordings' own thresholds stays with the clean ones, where pooling the errors is pulled up
    by the one anomalous end (to about the anomalies' level: a threshold that passes most normal windows' faults)."""
    recordings = recordings_with_an_anomalous_end()
    clean = [calibrate(errors, method, params).threshold for errors in recordings[1:]]
    result = calibrate_recordings(recordings, method, params)
    assert min(clean) <= result.threshold <= max(clean)
    assert result.recording_thresholds[1:] == pytest.approx(clean)
    assert result.recording_thresholds[0] > 1.5 * max(clean)
    assert calibrate(np.concatenate(recordings), method, params).threshold > 1.3 * max(clean)
    assert result.n_windows == 8000 and result.fit == {}
    recorded = result.to_dict()
    assert recorded["recording_thresholds"] == list(result.recording_thresholds)
    assert recorded["combined"] == "median of the recordings' own thresholds"


def test_on_the_clean_recordings_the_nominal_rate_holds():
    """At the combined 0.99 threshold the clean recordings pass about 99 % of fresh normal errors."""
    result = calibrate_recordings(recordings_with_an_anomalous_end())
    fresh = np.random.default_rng(11).exponential(1.0, 200_000)
    assert np.mean(fresh > result.threshold) == pytest.approx(0.01, abs=0.003)


def test_one_recording_gives_the_plain_calibration(exponential):
    for method in ("quantile", "mean_std", "pot"):
        alone = calibrate_recordings([exponential[:5000]], method)
        assert alone == calibrate(exponential[:5000], method)
        assert "recording_thresholds" not in alone.to_dict() and alone.recording_thresholds == ()


def test_each_recording_needs_enough_errors():
    with pytest.raises(ConfigError, match="at least 10 finite errors, got 9"):
        calibrate_recordings([np.ones(50), np.ones(9)])
    with pytest.raises(ConfigError, match="at least one recording"):
        calibrate_recordings([])
