"""Per-sensor baselines: each sensor's own per-channel normalisation.

A sensor's first N windows (its warm-up) fit a `SensorBaseline`; every later window is normalised with
it before the model sees it. Training, `monitor evaluate` and the daemon fit and apply it through this
module, so the three see the same numbers.

Estimator, per channel, over every sample of the warm-up windows:
- centre: the median; scale: 1.4826 x the median absolute deviation (MAD, the standard deviation for
  Gaussian data). Both have a 50 % breakdown point, so an outlier or two in the warm-up move neither.
- The scale is at least `SPREAD_FLOOR` x the standard deviation of the values winsorised at their 1st and
  99th percentiles. Many real channels sit at one value most of the time with excursions (server load,
  error counts): their MAD is 0 although they move, and the MAD alone would turn every ordinary excursion
  into a huge value. Winsorising keeps this bound robust too: outliers in up to 1 % of the samples are cut.
- Two more floors: `RELATIVE_FLOOR` of the channel's level (|median|), so a channel that barely moves around
  a large value is not blown up, and `ABSOLUTE_FLOOR`, so a constant channel divides by a finite number (it is
  tiny on purpose: the units are the sensor's, and the clip below bounds what a channel that was constant in
  the warm-up can do later; on SMD, pooled PCA, warm-up 150 windows, 1e-3 gave ROC AUC 0.785, 1e-6 0.830).
- The normalised values are clipped to +-`CLIP`: after a short warm-up the later values of a drifting or
  newly active channel can lie thousands of scales away, and unclipped such a channel alone would decide
  every window's score (the score averages |error| over channels).
bench/baseline_smd.py measures the alternatives on SMD (bench/baseline_smd.md, pooled PCA, warm-up 150 windows,
ROC AUC): this estimator 0.830, MAD alone 0.788, trimmed mean/std 0.794, mean/std 0.775; without the clip
0.646 to 0.730.

Following slow drift (`FollowingBaseline`, a model trained with a follow rate > 0): machines drift, and a baseline
fitted once leaves a drifted channel at the clip for good (the share of values at the clip is the symptom, counted
per window). After the warm-up, every window judged normal moves the sensor's centre and scale a bounded step
towards its own level and spread, with the fitted warm-up as the anchor:
- judged normal: at most `JUDGED_NORMAL_CLIPPED` of the window's values at the clip. A window the baseline cannot
  represent (a fault, a jump) does not move it, so it keeps showing;
- bounded: per window the centre moves `rate` x the window's median offset, the offset capped at `FOLLOW_STEP`
  current scales, and the scale by the factor (window std / scale) ** rate, capped at `FOLLOW_STEP` ** rate. A
  fault can pull the baseline only a little per window, as a slow drift does, and never by a jump;
- anchored: the scale never goes below the warm-up's, so a quiet stretch cannot make every later move huge.
The same window sequence gives the same numbers in training, `monitor evaluate` and the daemon (one class, float64
state, windows in order). A model trained with rate 0 (or before following existed) keeps the fixed baseline.

Score scale (a model trained with `--score-scale sensor`): sensors differ in how well a model reconstructs even their
normal windows (a noisy machine scores higher throughout), so one threshold on raw scores flags the noisy ones and
misses faults on the quiet ones. A sensor's score scale is the median score of its warm-up windows (normalised by the
baseline they fit, scored by the model): the baseline's own estimator, robust to a few odd warm-up windows. Every
later score of the sensor is divided by it, and the threshold is calibrated on scores divided the same way (each
training recording's calibration windows by the scale of a warm-up just before them, as a daemon starting there).
The daemon scores a sensor's warm-up once, when it completes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from monitor.errors import ConfigError
from monitor.window import decode_array, encode_array

MAD_TO_STD = 1.4826
SPREAD_FLOOR = 0.5
WINSORISE = 0.01
RELATIVE_FLOOR = 0.01
ABSOLUTE_FLOOR = 1e-6
CLIP = 10.0
ESTIMATOR = "median, max(1.4826 MAD, spread_floor x std winsorised)"
FOLLOW_RATE = 0.02  # the training default (TrainSettings.baseline_follow_rate)
FOLLOW_STEP = 3.0
JUDGED_NORMAL_CLIPPED = 0.25
SCORE_SCALE_KEY = "score_scale"
SCORE_SCALE_FLOOR = 1e-9  # a warm-up the model reconstructs perfectly still divides by a finite number
STATE_FORMAT = "monitor-sensor-baselines"
STATE_VERSION = 1


@dataclass(frozen=True)
class SensorBaseline:
    """One sensor's per-channel centre and scale; `apply` maps raw windows to the model's units."""

    centre: np.ndarray  # [C] float32
    scale: np.ndarray  # [C] float32, > 0

    @classmethod
    def fit(cls, windows: np.ndarray) -> SensorBaseline:
        """Fit on warm-up windows `[N, W, C]` (any N >= 1)."""
        flat = np.asarray(windows, dtype=np.float64).reshape(-1, windows.shape[-1])
        centre = np.median(flat, axis=0)
        spread = MAD_TO_STD * np.median(np.abs(flat - centre), axis=0)
        low, high = np.quantile(flat, [WINSORISE, 1.0 - WINSORISE], axis=0)
        spread = np.maximum(spread, SPREAD_FLOOR * np.clip(flat, low, high).std(axis=0))
        scale = np.maximum(spread, np.maximum(RELATIVE_FLOOR * np.abs(centre), ABSOLUTE_FLOOR))
        return cls(centre.astype(np.float32), scale.astype(np.float32))

    def apply(self, windows: np.ndarray) -> np.ndarray:
        """Normalise `[..., C]` values: (x - centre) / scale, clipped to +-CLIP, as float32."""
        normalised = (np.asarray(windows, dtype=np.float32) - self.centre) / self.scale
        return np.clip(normalised, -CLIP, CLIP).astype(np.float32, copy=False)

    def to_dict(self) -> dict[str, list[float]]:
        """JSON-ready; float32 values survive the round trip through JSON's float64 exactly."""
        return {"centre": self.centre.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_dict(cls, data: Any, channels: int) -> SensorBaseline:
        """Inverse of `to_dict`; ValueError for data that does not fit `channels` channels."""
        try:
            centre = np.asarray(data["centre"], dtype=np.float32)
            scale = np.asarray(data["scale"], dtype=np.float32)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"not a sensor baseline ({type(error).__name__}: {error})") from None
        if centre.shape != (channels,) or scale.shape != (channels,):
            raise ValueError(f"baseline has {centre.shape} / {scale.shape} values, not {channels} channel(s)")
        if not (np.isfinite(centre).all() and np.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError("baseline values must be finite and scales > 0")
        return cls(centre, scale)


class FollowingBaseline:
    """One sensor's baseline after its warm-up: normalises each window, then follows it if it is judged normal."""

    def __init__(self, anchor: SensorBaseline, rate: float) -> None:
        self.anchor = anchor
        self.rate = rate
        self.centre = anchor.centre.astype(np.float64)
        self.scale = anchor.scale.astype(np.float64)

    def admit(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The `[W, C]` window normalised by the current baseline, and each channel's share of values at the clip."""
        if self.rate == 0.0:
            normalised = self.anchor.apply(samples)
            return normalised, (np.abs(normalised) >= CLIP).mean(axis=0)
        raw = np.asarray(samples, dtype=np.float64)
        scaled = (raw - self.centre) / self.scale
        clipped = (np.abs(scaled) >= CLIP).mean(axis=0)
        if clipped.mean() <= JUDGED_NORMAL_CLIPPED:
            offset = np.clip((np.median(raw, axis=0) - self.centre) / self.scale, -FOLLOW_STEP, FOLLOW_STEP)
            self.centre = self.centre + self.rate * offset * self.scale
            ratio = np.log(np.maximum(raw.std(axis=0), ABSOLUTE_FLOOR) / self.scale)
            step = np.clip(ratio, -np.log(FOLLOW_STEP), np.log(FOLLOW_STEP))
            self.scale = np.maximum(self.scale * np.exp(self.rate * step), self.anchor.scale)
        return np.clip(scaled, -CLIP, CLIP).astype(np.float32), clipped

    def to_dict(self) -> dict[str, Any]:
        """The anchor, and where the baseline has followed to (float64 values, exact through JSON)."""
        return {**self.anchor.to_dict(), "current": {"centre": self.centre.tolist(), "scale": self.scale.tolist()}}

    @classmethod
    def from_dict(cls, data: Any, channels: int, rate: float) -> FollowingBaseline:
        """Inverse of `to_dict`; a state without "current" (saved before following existed) starts at its anchor."""
        restored = cls(SensorBaseline.from_dict(data, channels), rate)
        current = data.get("current")
        if current is not None:
            SensorBaseline.from_dict(current, channels)  # the same checks: shape, finite values, scales > 0
            restored.centre = np.asarray(current["centre"], np.float64)
            restored.scale = np.maximum(np.asarray(current["scale"], np.float64), restored.anchor.scale)
        return restored


def normalise_recording(windows: np.ndarray, warm_up: int, rate: float) -> tuple[np.ndarray, np.ndarray]:
    """A sensor's windows `[N, W, C]` as the daemon normalises them, and each window's per-channel share at the clip.

    The first `warm_up` windows fit the anchor and are normalised by it; the later ones go through a
    `FollowingBaseline` in order.
    """
    anchor = SensorBaseline.fit(windows[:warm_up])
    follower = FollowingBaseline(anchor, rate)
    normalised = np.empty(windows.shape, np.float32)
    clipped = np.empty((len(windows), windows.shape[-1]), np.float64)
    normalised[:warm_up] = anchor.apply(windows[:warm_up])
    clipped[:warm_up] = (np.abs(normalised[:warm_up]) >= CLIP).mean(axis=1)
    for index in range(warm_up, len(windows)):
        normalised[index], clipped[index] = follower.admit(windows[index])
    return normalised, clipped


def describe(windows: int, follow_rate: float) -> dict[str, Any]:
    """How a sensor baseline is fitted, as recorded in the model artifact."""
    return {
        "type": "sensor",
        "windows": windows,
        "follow_rate": follow_rate,
        "follow_step": FOLLOW_STEP,
        "judged_normal_clipped": JUDGED_NORMAL_CLIPPED,
        "estimator": ESTIMATOR,
        "spread_floor": SPREAD_FLOOR,
        "winsorise": WINSORISE,
        "relative_floor": RELATIVE_FLOOR,
        "absolute_floor": ABSOLUTE_FLOOR,
        "clip": CLIP,
    }


def trained_baseline(metadata: dict[str, Any]) -> tuple[str, int | None]:
    """How a model artifact was trained: ("model", None) or ("sensor", its warm-up windows)."""
    trained = metadata.get("baseline")
    if not isinstance(trained, dict) or trained.get("type") != "sensor":
        return "model", None
    windows = trained.get("windows")
    return "sensor", windows if isinstance(windows, int) and not isinstance(windows, bool) and windows >= 1 else None


def follow_rate(metadata: dict[str, Any]) -> float:
    """The rate at which a model's sensor baselines follow drift (0: fixed, as for models trained before it)."""
    trained = metadata.get("baseline")
    rate = trained.get("follow_rate", 0.0) if isinstance(trained, dict) else 0.0
    return float(rate) if isinstance(rate, int | float) and not isinstance(rate, bool) and 0 <= rate <= 1 else 0.0


def score_scale(warm_up_scores: np.ndarray) -> float:
    """A sensor's score scale: the median of its warm-up windows' scores, at least `SCORE_SCALE_FLOOR`."""
    return max(float(np.median(np.asarray(warm_up_scores, dtype=np.float64))), SCORE_SCALE_FLOOR)


def describe_score_scale() -> dict[str, Any]:
    """How a model's sensors' score scales are measured, as recorded in the model artifact (`score_scale`)."""
    return {
        "type": "sensor",
        "estimator": "median score of the sensor's warm-up windows, normalised by the baseline they fit",
        "floor": SCORE_SCALE_FLOOR,
        "decision": "anomaly when score / scale > threshold; the threshold is calibrated on scores divided so",
    }


def scaled_scores(metadata: dict[str, Any]) -> bool:
    """Whether a model divides each sensor's scores by its score scale (False for models trained before it)."""
    recorded = metadata.get(SCORE_SCALE_KEY)
    return isinstance(recorded, dict) and recorded.get("type") == "sensor"


def resolve_baseline(trained: tuple[str, int | None], asked: str | None, windows: int | None, where: str) -> int | None:
    """The warm-up length to use with a model (None for `baseline: model`), checked against how it was trained.

    `asked`/`windows` are the user's choice (None: as trained). A model trained on per-sensor baselines
    cannot score raw values or the reverse; the warm-up length may differ from the training's.
    """
    kind, trained_windows = trained
    if asked is not None and asked != kind:
        raise ConfigError(f"{where}: baseline {asked!r}, but the model was trained with baseline {kind!r}")
    if kind != "sensor":
        if windows is not None:
            raise ConfigError(f"{where}: baseline windows are only for baseline 'sensor'")
        return None
    chosen = windows if windows is not None else trained_windows
    if chosen is None or chosen < 1:
        raise ConfigError(f"{where}: baseline windows must be an integer >= 1, got {chosen!r}")
    return chosen


class ScaleScorer(Protocol):
    """What measures the daemon's score scales: the live model's scores, and its identity (saved with the scales)."""

    @property
    def identity(self) -> dict[str, Any]: ...

    def scores(self, windows: np.ndarray) -> np.ndarray: ...


class SensorBaselines:
    """The daemon's per-sensor baseline state: the warm-up windows still being collected, and fitted baselines.

    A sensor's first `warm_up` windows are collected (not scored); the last of them fits its baseline (the
    anchor) and every later window is normalised with it, as it follows (`FollowingBaseline`). `forget` drops
    a sensor (idle eviction), so a sensor that comes back starts a new warm-up. Memory: a warming sensor holds
    up to `warm_up` x W x C float32 values. Not thread-safe: the caller serialises access (the ingest lock).
    """

    def __init__(
        self, warm_up: int, window: int, channels: int, follow_rate: float = 0.0, scorer: ScaleScorer | None = None
    ) -> None:
        """With `scorer` (a model with a score scale: windows `[N, W, C]` -> their scores `[N]`, and the identity of
        the model, which a saved state must match), a warm-up that completes is scored once to give its sensor's
        score scale."""
        if warm_up < 1:
            raise ValueError(f"warm_up must be >= 1, got {warm_up}")
        self.warm_up = warm_up
        self.window = window
        self.channels = channels
        self.follow_rate = follow_rate
        self.scorer = scorer
        self._warming: dict[str, list[np.ndarray]] = {}
        self._fitted: dict[str, FollowingBaseline] = {}
        self._scales: dict[str, float] = {}
        self._off_baseline: set[str] = set()

    @property
    def sensors_warming_up(self) -> int:
        return len(self._warming)

    @property
    def sensors_off_baseline(self) -> int:
        """Sensors whose last window had more than `JUDGED_NORMAL_CLIPPED` of its values at the clip."""
        return len(self._off_baseline)

    def admit(self, sensor_id: str, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """The window normalised by its sensor's baseline and its channels' shares at the clip, or None while it
        is one of the sensor's warm-up windows."""
        baseline = self._fitted.get(sensor_id)
        if baseline is not None:
            normalised, clipped = baseline.admit(samples)
            if clipped.mean() > JUDGED_NORMAL_CLIPPED:
                self._off_baseline.add(sensor_id)
            else:
                self._off_baseline.discard(sensor_id)
            return normalised, clipped
        collected = self._warming.setdefault(sensor_id, [])
        collected.append(samples)
        if len(collected) >= self.warm_up:
            self._fitted[sensor_id], scale = self._fit(collected)
            if scale is not None:
                self._scales[sensor_id] = scale
            del self._warming[sensor_id]
        return None

    def _fit(self, collected: list[np.ndarray]) -> tuple[FollowingBaseline, float | None]:
        """A completed warm-up's baseline and, with a scorer, its score scale: one scoring pass over the warm-up's
        windows (on the caller's thread, once per warm-up)."""
        windows = np.stack(collected)
        anchor = SensorBaseline.fit(windows)
        scale = None if self.scorer is None else score_scale(self.scorer.scores(anchor.apply(windows)))
        return FollowingBaseline(anchor, self.follow_rate), scale

    def scale_of(self, sensor_id: str) -> float:
        """What the sensor's scores are divided by: its score scale, 1 without one."""
        return self._scales.get(sensor_id, 1.0)

    def forget(self, sensor_id: str) -> None:
        self._warming.pop(sensor_id, None)
        self._fitted.pop(sensor_id, None)
        self._scales.pop(sensor_id, None)
        self._off_baseline.discard(sensor_id)

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready: fitted baselines, and warm-up windows as base64 of little-endian float32 `[n, W, C]`."""
        warming = {sid: encode_array(np.stack(windows)) for sid, windows in self._warming.items()}
        fitted = {sid: baseline.to_dict() for sid, baseline in self._fitted.items()}
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "window": self.window,
            "channels": self.channels,
            "fitted": fitted,
            "warming": warming,
            **({} if self.scorer is None else {"score_scales": dict(self._scales), "scored_by": self.scorer.identity}),
        }

    def restore(self, state: Any, sensors: Iterable[str]) -> int:
        """Takes back a `snapshot()` for the given sensors (those whose windows were restored); returns how many.

        Raises ValueError, changing nothing, for a snapshot of another shape or an inconsistent one. A warm-up
        saved with more windows than this instance's `warm_up` fits its baseline at once.
        """
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a {STATE_FORMAT} of version {STATE_VERSION}")
        if (state.get("window"), state.get("channels")) != (self.window, self.channels):
            raise ValueError(
                f"saved for window, channels {state.get('window')}, {state.get('channels')}, "
                f"not {self.window}, {self.channels}"
            )
        keep = set(sensors)
        warming: dict[str, list[np.ndarray]] = {}
        fitted: dict[str, FollowingBaseline] = {}
        scales = self._restored_scales(state, keep)
        try:
            for sid, data in state["fitted"].items():
                if sid in keep:
                    fitted[sid] = FollowingBaseline.from_dict(data, self.channels, self.follow_rate)
                    if self.scorer is not None and sid not in scales:
                        raise ValueError(f"sensor {sid!r}: a fitted baseline without a score scale")
            for sid, encoded in state["warming"].items():
                if sid in keep:
                    raw = decode_array(encoded)
                    windows = raw.reshape(-1, self.window, self.channels)
                    if not np.isfinite(windows).all():
                        raise ValueError(f"sensor {sid!r}: warm-up windows are not finite")
                    warming[sid] = [window for window in windows]
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"inconsistent baseline state ({type(error).__name__}: {error})") from None
        for sid, collected in list(warming.items()):
            if len(collected) >= self.warm_up:
                fitted[sid], scale = self._fit(collected)
                if scale is not None:
                    scales[sid] = scale
                del warming[sid]
        self._warming, self._fitted, self._scales = warming, fitted, scales
        return len(warming) + len(fitted)

    def _restored_scales(self, state: dict[str, Any], keep: set[str]) -> dict[str, float]:
        """The saved score scales of the sensors kept; ValueError when they were measured by another model (its
        sensors then start new warm-ups) or are not finite positive numbers."""
        if self.scorer is None:
            return {}
        if state.get("scored_by") != self.scorer.identity:
            raise ValueError(f"score scales measured by model {state.get('scored_by')}, not {self.scorer.identity}")
        saved = state.get("score_scales")
        if not isinstance(saved, dict):
            raise ValueError("score_scales: missing")
        scales = {}
        for sid, value in saved.items():
            if sid in keep:
                if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
                    raise ValueError(f"sensor {sid!r}: score scale {value!r} is not a finite number > 0")
                scales[sid] = float(value)
        return scales
