"""Threshold calibration: turn the errors of held-out normal windows into a decision threshold.

Methods:
- `quantile`: the `q` quantile of the normal errors (false-alarm rate about 1 - q).
- `mean_std`: mean + k * std of the normal errors.
- `pot`: peaks over threshold: a generalised Pareto distribution fitted to the excesses over the
  `tail_quantile` quantile, solved for the error exceeded with probability `false_alarm_rate`
  (Siffer et al., "Anomaly detection in streams with extreme value theory", KDD 2017).

With several recordings (`calibrate_recordings`) each recording's calibration errors give a threshold of their own
by the method, and the model's one threshold is their median: a recording whose calibration part holds anomalies
or drift (unlabelled training data often does) raises only its own threshold, not everyone's. One recording gives
the method's threshold unchanged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from monitor.errors import ConfigError

METHODS = ("quantile", "mean_std", "pot")
# Below this many calibration windows the trainer warns with the threshold's uncertainty.
SMALL_CALIBRATION = 200
MIN_ERRORS = 10  # fewer calibration errors (of a recording, with several) are refused
DEFAULT_PARAMS: dict[str, dict[str, float]] = {
    "quantile": {"q": 0.99},
    "mean_std": {"k": 3.0},
    "pot": {"tail_quantile": 0.9, "false_alarm_rate": 0.01},
}


@dataclass(frozen=True)
class Calibration:
    """A calibrated threshold and how it was obtained."""

    method: str
    params: dict[str, float]
    n_windows: int
    threshold: float
    fit: dict[str, float] = field(default_factory=dict)
    recording_thresholds: tuple[float, ...] = ()  # each recording's own, when the threshold is their median

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        if not self.recording_thresholds:
            del record["recording_thresholds"]
        else:
            record["recording_thresholds"] = list(self.recording_thresholds)
            record["combined"] = "median of the recordings' own thresholds"
        return record


def _params(method: str, params: dict[str, float] | None) -> dict[str, float]:
    if method not in METHODS:
        raise ConfigError(f"threshold.method: {method!r} is not one of {', '.join(METHODS)}")
    merged = dict(DEFAULT_PARAMS[method])
    for key, value in (params or {}).items():
        if key not in merged:
            raise ConfigError(f"threshold.{key}: not a parameter of method {method!r} (has {', '.join(merged)})")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"threshold.{key}: must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"threshold.{key}: must be a finite number, got {value!r}")
        merged[key] = number
    return merged


def calibrate(errors: np.ndarray, method: str = "quantile", params: dict[str, float] | None = None) -> Calibration:
    """Calibrate a threshold on the errors of normal windows the model never trained on."""
    errors = np.asarray(errors, dtype=np.float64)
    if errors.ndim != 1 or errors.size < MIN_ERRORS or not np.isfinite(errors).all():
        raise ConfigError(f"calibration needs at least {MIN_ERRORS} finite errors, got {errors.size}")
    chosen = _params(method, params)
    fit: dict[str, float] = {}
    if method == "quantile":
        if not 0.0 < chosen["q"] < 1.0:
            raise ConfigError(f"threshold.q: must be in (0, 1), got {chosen['q']}")
        threshold = float(np.quantile(errors, chosen["q"]))
    elif method == "mean_std":
        threshold = float(errors.mean() + chosen["k"] * errors.std(ddof=1))
    else:
        threshold, fit = _peaks_over_threshold(errors, chosen["tail_quantile"], chosen["false_alarm_rate"])
    return Calibration(method, chosen, int(errors.size), threshold, fit)


def calibrate_recordings(
    recordings: list[np.ndarray], method: str = "quantile", params: dict[str, float] | None = None
) -> Calibration:
    """One threshold for several recordings: the median of the thresholds `method` gives each recording's errors
    alone (the plain `calibrate` for one recording). `fit` is left out: each recording has its own."""
    if not recordings:
        raise ConfigError("calibration needs the errors of at least one recording")
    if len(recordings) == 1:
        return calibrate(recordings[0], method, params)
    each = [calibrate(errors, method, params) for errors in recordings]
    thresholds = tuple(item.threshold for item in each)
    n_windows = sum(item.n_windows for item in each)
    return Calibration(method, each[0].params, n_windows, float(np.median(thresholds)), {}, thresholds)


def _peaks_over_threshold(
    errors: np.ndarray, tail_quantile: float, false_alarm_rate: float
) -> tuple[float, dict[str, float]]:
    from scipy.stats import genpareto

    if not 0.0 < tail_quantile < 1.0 or not 0.0 < false_alarm_rate < 1.0 - tail_quantile:
        raise ConfigError(
            "threshold: pot needs 0 < tail_quantile < 1 and 0 < false_alarm_rate < 1 - tail_quantile "
            f"(got {tail_quantile}, {false_alarm_rate})"
        )
    initial = float(np.quantile(errors, tail_quantile))
    excesses = errors[errors > initial] - initial
    if excesses.size < 5:
        raise ConfigError(f"threshold: pot found only {excesses.size} peaks over the {tail_quantile} quantile; need 5")
    shape, _, scale = genpareto.fit(excesses, floc=0.0)
    ratio = false_alarm_rate * errors.size / excesses.size
    if abs(shape) < 1e-9:
        threshold = initial - scale * math.log(ratio)
    else:
        threshold = initial + scale / shape * (ratio ** (-shape) - 1.0)
    fit = {"initial_threshold": initial, "n_peaks": float(excesses.size), "shape": float(shape), "scale": float(scale)}
    return float(threshold), fit


@dataclass(frozen=True)
class ThresholdUncertainty:
    """How well `n` calibration errors pin a threshold down, without assuming their distribution.

    With `k` of the `n` errors at or below the threshold, the share of normal windows it passes is
    distributed as Beta(k, n + 1 - k) (order statistics), which bounds the false-alarm rate; the
    quantile at the threshold's level k / n lies between two order statistics chosen by the binomial.
    """

    n_windows: int
    level: float
    false_alarm_rate: tuple[float, float]
    threshold_range: tuple[float, float]
    confidence: float

    def describe(self, threshold: float) -> str:
        low, high = self.threshold_range
        shown_high = f"{high:.4g}" if math.isfinite(high) else "above the largest calibration error"
        return (
            f"the threshold {threshold:.4g} rests on {self.n_windows} calibration windows: with "
            f"{self.confidence:.0%} confidence the {self.level:.3g} quantile it estimates lies between {low:.4g} and "
            f"{shown_high}, and it flags between {self.false_alarm_rate[0]:.2%} and {self.false_alarm_rate[1]:.2%} "
            f"of normal windows"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "confidence": self.confidence,
            "false_alarm_rate": list(self.false_alarm_rate),
            "threshold_range": [x if math.isfinite(x) else None for x in self.threshold_range],
        }


def threshold_uncertainty(
    errors: np.ndarray, threshold: float, level: float | None = None, confidence: float = 0.95
) -> ThresholdUncertainty:
    """Distribution-free intervals for the false-alarm rate and the quantile a threshold stands for
    (`level`, by default the share of calibration errors at or below the threshold)."""
    from scipy.stats import beta, binom

    ordered = np.sort(np.asarray(errors, dtype=np.float64))
    n = ordered.size
    k = max(int(np.searchsorted(ordered, threshold, side="right")), 1)
    tail = (1.0 - confidence) / 2.0
    passed = beta(k, n + 1 - k)
    false_alarms = (float(1.0 - passed.ppf(1.0 - tail)), float(1.0 - passed.ppf(tail)))
    level = min(k / n if level is None else level, 1.0 - 1.0 / (n + 1))
    low_rank, high_rank = int(binom.ppf(tail, n, level)), int(binom.ppf(1.0 - tail, n, level)) + 1
    low = float(ordered[low_rank - 1]) if low_rank >= 1 else -math.inf
    high = float(ordered[high_rank - 1]) if high_rank <= n else math.inf
    return ThresholdUncertainty(n, level, false_alarms, (low, high), confidence)


CALIBRATION_KEY = "calibration_scores"
QUANTILE_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99)


@dataclass(frozen=True)
class CalibrationScores:
    """The distribution of the calibration windows' scores, as `model.json` records it under `calibration_scores`."""

    levels: tuple[float, ...]
    quantiles: tuple[float, ...]
    above_threshold: float  # share of calibration windows whose score is above the threshold
    n_windows: int

    @classmethod
    def from_errors(
        cls, errors: np.ndarray, threshold: float, levels: tuple[float, ...] = QUANTILE_LEVELS
    ) -> CalibrationScores:
        errors = np.asarray(errors, dtype=np.float64)
        quantiles = tuple(float(value) for value in np.quantile(errors, levels))
        return cls(tuple(levels), quantiles, float(np.mean(errors > threshold)), int(errors.size))

    def to_dict(self) -> dict[str, Any]:
        return {
            "note": "scores of the calibration windows: quantiles at these levels, share above the threshold",
            "n_windows": self.n_windows,
            "levels": list(self.levels),
            "quantiles": list(self.quantiles),
            "above_threshold": self.above_threshold,
        }

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> CalibrationScores | None:
        """What an artifact recorded; None for an artifact made before it was recorded. Raises ValueError if broken."""
        data = metadata.get(CALIBRATION_KEY)
        if data is None:
            return None
        try:
            levels = tuple(float(value) for value in data["levels"])
            quantiles = tuple(float(value) for value in data["quantiles"])
            scores = cls(levels, quantiles, float(data["above_threshold"]), int(data["n_windows"]))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{CALIBRATION_KEY}: unreadable ({error})") from None
        if (
            not levels
            or len(levels) != len(quantiles)
            or not all(0 < level < 1 for level in levels)
            or any(b <= a for a, b in zip(levels, levels[1:], strict=False))
            or any(b < a for a, b in zip(quantiles, quantiles[1:], strict=False))
            or not all(math.isfinite(value) for value in quantiles)
            or not 0 <= scores.above_threshold <= 1
            or scores.n_windows < 1
        ):
            raise ValueError(
                f"{CALIBRATION_KEY}: levels must rise within (0, 1), quantiles must not fall, one per level"
            )
        return scores

    def bin_shares(self) -> np.ndarray:
        """The calibration share of each bin the quantiles cut (below the first, between each pair, above the last)."""
        return np.diff(np.concatenate([[0.0], self.levels, [1.0]]))
