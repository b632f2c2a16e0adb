"""Does the model still fit the data? Recent scores against the calibration scores the artifact records.

The statistic is the population stability index (PSI) of the last N scores over the bins that the calibration
scores' quantiles cut (deciles and the 0.99 quantile: each bin holds a known share of normal windows):
`PSI = sum_i (o_i - e_i) * ln(o_i / e_i)`, o_i the share of recent scores in bin i, e_i its calibration share.
Why PSI on these bins:
- it compares whole distributions, in both directions: a gain or offset change that makes every window fit worse
  pushes mass up, a sensor gone flat or clipped pushes it down; a share above the threshold sees only the first;
- it needs nothing but the calibration quantiles, which any artifact can record at training time, and costs
  O(bins) per window over a ring of bin indices (no scores kept, no sorting);
- its scale is conventional and independent of the model: below 0.1 stable, 0.1 to 0.25 moderate, above 0.25 a
  shift worth acting on; with N recent windows, sampling noise alone gives about (bins - 1) / N.
A high PSI also follows a high share of genuinely anomalous windows (they fill the top bins): the count of
sensors whose anomaly rate is far above the expected rate (`AnomalyRates`) tells one from the other: drift
raises the rate of many sensors at once.

`AnomalyRates` keeps each sensor's last decisions and counts the sensors whose anomalous count there is far above
the model's expected rate (the share of calibration windows above the threshold): a one-sided binomial tail
probability below `alpha`.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np
import structlog
from scipy.stats import binom

from monitor.alerts.sensor_table import SensorTable
from monitor.config.schema import DriftSettings
from monitor.model.calibration import CalibrationScores
from monitor.model.engine import Engine
from monitor.model.scoring import Scores
from monitor.telemetry.metrics import DRIFT_SHARE_LEVELS, Metrics
from monitor.window import Window

log = structlog.get_logger("monitor.drift")

SHARE_FLOOR = 1e-4  # an empty bin would make the PSI infinite


class DriftMonitor:
    """PSI of the last `window` scores against the calibration scores; reported once `min_windows` are in."""

    def __init__(self, reference: CalibrationScores, window: int = 1000, min_windows: int = 200) -> None:
        if not 1 <= min_windows <= window:
            raise ValueError("min_windows must be between 1 and window")
        self.reference = reference
        self.window = window
        self.min_windows = min_windows
        self._edges = np.asarray(reference.quantiles)
        self._expected = reference.bin_shares()
        self._ring = np.zeros(window, dtype=np.int16)
        self._counts = np.zeros(len(self._expected), dtype=np.int64)
        self._filled = 0
        self._next = 0
        self.drifting = False

    @property
    def windows(self) -> int:
        """How many recent scores the statistic covers."""
        return self._filled

    def observe(self, errors: np.ndarray) -> None:
        """Add a batch of scores; the oldest leave the ring."""
        bins = np.searchsorted(self._edges, np.asarray(errors, dtype=np.float64), side="right")
        for index in bins[-self.window :]:
            if self._filled == self.window:
                self._counts[self._ring[self._next]] -= 1
            else:
                self._filled += 1
            self._ring[self._next] = index
            self._counts[index] += 1
            self._next = (self._next + 1) % self.window

    def shares(self) -> np.ndarray:
        return self._counts / max(self._filled, 1)

    def psi(self) -> float:
        """The PSI of the recent scores; NaN while fewer than `min_windows` are in."""
        if self._filled < self.min_windows:
            return math.nan
        observed = np.maximum(self.shares(), SHARE_FLOOR)
        return float(np.sum((observed - self._expected) * np.log(observed / self._expected)))

    def share_above(self, level: float) -> float:
        """The share of recent scores above the calibration quantile at `level` (one of the recorded levels)."""
        position = self.reference.levels.index(level)
        return float(self._counts[position + 1 :].sum() / max(self._filled, 1))

    def crossing(self, bound: float) -> str | None:
        """`crossed` when the PSI has just gone above `bound`, `recovered` when it has just come back, else None."""
        value = self.psi()
        if math.isnan(value):
            return None
        drifting = value > bound
        if drifting == self.drifting:
            return None
        self.drifting = drifting
        return "crossed" if drifting else "recovered"


def critical_counts(expected_rate: float, window: int, alpha: float) -> np.ndarray:
    """`counts[n]`: the fewest anomalous among n decisions whose probability at `expected_rate` is below `alpha`."""
    sizes = np.arange(window + 1)
    # isf(alpha) is the smallest k with P(X > k) <= alpha: k + 1 or more anomalous decisions are that improbable
    return binom.isf(alpha, sizes, expected_rate).astype(np.int64) + 1


class _Recent:
    __slots__ = ("decisions", "anomalous")

    def __init__(self, window: int) -> None:
        self.decisions: deque[bool] = deque(maxlen=window)
        self.anomalous = 0


class AnomalyRates:
    """How many sensors have, over their last `window` decisions, an anomaly rate far above `expected_rate`."""

    def __init__(
        self,
        expected_rate: float,
        window: int = 100,
        min_windows: int = 20,
        alpha: float = 1e-4,
        max_sensors: int = 10000,
    ) -> None:
        if not 1 <= min_windows <= window:
            raise ValueError("min_windows must be between 1 and window")
        self.expected_rate = expected_rate
        self.min_windows = min_windows
        self._critical = critical_counts(expected_rate, window, alpha)
        self._sensors: SensorTable[_Recent] = SensorTable(max_sensors, lambda: _Recent(window))
        self._high: set[str] = set()

    @property
    def high(self) -> int:
        return len(self._high)

    def observe(self, sensor_id: str, anomalous: bool, now: float) -> None:
        recent, evicted = self._sensors.touch(sensor_id, now)
        self._high.difference_update(evicted_id for evicted_id, _ in evicted)
        if len(recent.decisions) == recent.decisions.maxlen:
            recent.anomalous -= recent.decisions[0]
        recent.decisions.append(anomalous)
        recent.anomalous += anomalous
        size = len(recent.decisions)
        if size >= self.min_windows and recent.anomalous >= self._critical[size]:
            self._high.add(sensor_id)
        else:
            self._high.discard(sensor_id)

    def expire(self, now: float, idle_seconds: float) -> None:
        """Forget sensors without a decision for `idle_seconds`."""
        for sensor_id, _ in self._sensors.expire(now, idle_seconds):
            self._high.discard(sensor_id)


class DriftWatch:
    """The drift stage: every decided batch into the PSI and the sensors' anomaly rates; metrics, and a log event
    when the PSI crosses `drift.psi_bound` either way. Housekeeping (another thread) may run alongside."""

    def __init__(
        self,
        reference: CalibrationScores,
        settings: DriftSettings,
        metrics: Metrics,
        max_sensors: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.monitor = DriftMonitor(reference, settings.window_count, settings.min_windows)
        # A calibration set with no window above the threshold still has some false-alarm rate: at most ~1/(n+1).
        expected = max(reference.above_threshold, 0.5 / reference.n_windows)
        self.rates = AnomalyRates(
            expected, settings.sensor_window, settings.sensor_min_windows, settings.sensor_alpha, max_sensors
        )
        self.lock = threading.Lock()
        metrics.drift_psi_bound.set(settings.psi_bound)
        metrics.expected_anomaly_rate.set(reference.above_threshold)
        self._levels = [level for level in DRIFT_SHARE_LEVELS if level in reference.levels]

    def observe(self, batch: Sequence[Window], scores: Scores, anomalous: np.ndarray, engine: Engine) -> None:
        now = self.clock()
        with self.lock:
            self.monitor.observe(scores.errors)
            for window, flag in zip(batch, anomalous, strict=True):
                self.rates.observe(window.sensor_id, bool(flag), now)
            high = self.rates.high
        psi = self.monitor.psi()
        self.metrics.drift_psi.set(psi)
        self.metrics.drift_windows.set(self.monitor.windows)
        self.metrics.sensors_rate_high.set(high)
        for level in self._levels:
            self.metrics.drift_share_above.labels(str(level)).set(self.monitor.share_above(level))
        change = self.monitor.crossing(self.settings.psi_bound)
        fields = {
            "psi": round(psi, 4),
            "bound": self.settings.psi_bound,
            "windows": self.monitor.windows,
            "sensors_far_above_expected": high,
            "model": engine.model.to_dict(),
        }
        if change == "crossed":
            log.warning("drift_bound_crossed", **fields)
        elif change == "recovered":
            log.info("drift_within_bound", **fields)

    def housekeeping(self, idle_seconds: float) -> None:
        """Forget the anomaly rates of sensors silent for `idle_seconds`."""
        with self.lock:
            self.rates.expire(self.clock(), idle_seconds)
            self.metrics.sensors_rate_high.set(self.rates.high)
