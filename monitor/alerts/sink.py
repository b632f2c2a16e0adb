"""The alert stage: decide (score above the threshold), build the payload (docs/interface.md), publish, count, log.

`AlertSink.handle` takes one scored window. It publishes through a `Publisher`, which either queues the
message or raises `PublishRefused` with one of `DROP_REASONS`; any other exception counts as
`publish_error`, so the `reason` label set stays closed whatever the transport raises. A sensor flooding the
alert queue (`over_share`) loses its own further alerts as `sensor_share`, so every other sensor's still fit.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

import numpy as np
import orjson
import structlog

from monitor.config.schema import AlertSettings
from monitor.model.engine import Engine, ModelIdentity
from monitor.model.scoring import Scores, top_channels
from monitor.mqtt.publisher import DropReason, Publisher, PublishRefused
from monitor.telemetry.log import RateLimiter
from monitor.telemetry.metrics import Metrics
from monitor.window import BeatMark, Window

log = structlog.get_logger("monitor.alerts")

AlertDropReason = DropReason | Literal["sensor_share"]


class DecisionObserver(Protocol):
    """A stage that sees every decided batch after its alerts went out (episodes, drift, the shadow model)."""

    def observe(self, batch: Sequence[Window], scores: Scores, anomalous: np.ndarray, engine: Engine) -> None: ...


class ThresholdDecision:
    """A window is anomalous when its score is strictly above the threshold, as in `monitor evaluate`."""

    def __init__(self, threshold: float) -> None:
        self.threshold = float(threshold)

    def anomalous(self, errors: np.ndarray) -> np.ndarray:
        return np.asarray(errors) > self.threshold


def build_alert(
    sensor_id: str,
    start_seq: int,
    window: int,
    score: float,
    profile: np.ndarray,
    threshold: float,
    model: ModelIdentity,
    start_ts: float | None = None,
    top_timesteps: int = 5,
    include_profile: bool = False,
    detected_at: float | None = None,
    baseline: str = "model",
    beat: BeatMark | None = None,
    channels: list[dict[str, Any]] | None = None,
    score_scale: float | None = None,
) -> dict[str, Any]:
    """The JSON alert for one anomalous window; for a beat (beat mode) with its span, `beat_seq` and `rr_seconds`;
    with a model that scales its sensors' scores, `score` is the scaled one (compared with the threshold), and
    `raw_score` and `score_scale` say what it was divided by.

    `top_timesteps` lists the offsets within the window with the largest error (highest first),
    so a subscriber can see where in the window the anomaly lies; `channels` (`top_channels`) which of its
    channels made the score.
    """
    alert: dict[str, Any] = {
        "sensor_id": sensor_id,
        "window_start_seq": int(start_seq),
        "window_end_seq": int(start_seq + window if beat is None else beat.end_seq),
        "score": float(score),
        "threshold": float(threshold),
        "baseline": baseline,
        "model": model.to_dict(),
        "detected_at": time.time() if detected_at is None else detected_at,
    }
    if score_scale is not None:
        alert["raw_score"] = float(score) * score_scale
        alert["score_scale"] = score_scale
    if beat is not None:
        alert["beat_seq"] = beat.beat_seq
        alert["rr_seconds"] = beat.rr_seconds
    if start_ts is not None:
        alert["window_start_ts"] = float(start_ts)
    if top_timesteps:
        top = np.argsort(-profile, kind="stable")[:top_timesteps]
        alert["top_timesteps"] = [{"offset": int(i), "error": round(float(profile[i]), 6)} for i in top]
    if channels:
        alert["top_channels"] = channels
    if include_profile:
        alert["error_profile"] = [round(float(value), 6) for value in profile]
    return alert


def channels_of(scores: Scores, index: int, count: int, engine: Engine) -> list[dict[str, Any]] | None:
    """Window `index`'s top `count` channels, named when the model knows names (None without per-channel errors)."""
    if scores.channels is None or not count:
        return None
    return top_channels(scores.channels[index], count, engine.channel_names)


class AlertSink:
    """Decides, builds, publishes, counts and logs the alert for each anomalous window of a scored batch, then
    hands the decisions to the observers. With `alerts.lifecycle` on and `per_window_alerts` off, the per-window
    alerts are only counted (`monitor_anomalies_total`), not published."""

    def __init__(
        self,
        publisher: Publisher,
        topic_template: str,
        qos: int,
        settings: AlertSettings,
        metrics: Metrics,
        observers: Sequence[DecisionObserver] = (),
        sources: Mapping[str, Mapping[str, Any]] | None = None,
        instance: str | None = None,
        over_share: Callable[[str], bool] | None = None,
        warnings: RateLimiter | None = None,
    ) -> None:
        """`sources`: fields added to the alerts of some sensors, saying where their data comes from (a Sparkplug B
        device's group, node, device and metric names). `instance` (the daemon's MQTT client id) goes into every
        alert, so that a subscriber can tell the alerts of several instances apart (`monitor watch` counts
        duplicates by it). `over_share(sensor_id)` says a sensor holds more than its share of the alerts waiting for
        the broker; its alerts are then dropped, logged once per sensor and `warnings` interval."""
        self.instance = instance
        self.publisher = publisher
        self.sources = dict(sources or {})
        self.topic_template = topic_template
        self.qos = qos
        self.settings = settings
        self.metrics = metrics
        self.observers = tuple(observers)
        self.over_share = over_share
        self._warnings = warnings or RateLimiter(60.0)
        self._share_drops: Counter[str] = Counter()  # by sensor, since its last `alerts_over_share` line

    def handle(self, batch: Sequence[Window], scores: Scores, engine: Engine) -> dict[int, int]:
        """Publish an alert for each anomalous window; returns {index in the batch: packet id} of those queued.
        Never raises."""
        anomalous = ThresholdDecision(engine.threshold).anomalous(scores.errors)
        flagged = np.flatnonzero(anomalous)
        self.metrics.anomalies.inc(len(flagged))
        queued = {}
        if self.settings.per_window:
            for index in flagged:
                mid = self._alert(batch[int(index)], float(scores.errors[index]), scores, int(index), engine)
                if mid is not None:
                    queued[int(index)] = mid
        for observer in self.observers:
            try:
                observer.observe(batch, scores, anomalous, engine)
            except Exception:
                log.exception("decision_observer_failed", stage=type(observer).__name__, batch=len(batch))
        return queued

    def _alert(self, window: Window, score: float, scores: Scores, index: int, engine: Engine) -> int | None:
        if self.over_share is not None and self.over_share(window.sensor_id):
            self._drop_over_share(window.sensor_id)
            return None
        alert = build_alert(
            window.sensor_id,
            window.start_seq,
            engine.window,
            score,
            scores.profiles[index],
            engine.threshold,
            engine.model,
            window.start_ts,
            self.settings.top_timesteps,
            self.settings.include_profile,
            baseline=engine.baseline[0],
            beat=window.beat,
            channels=channels_of(scores, index, self.settings.top_channels, engine),
            score_scale=window.error_scale if engine.score_scale else None,
        )
        alert.update(self.sources.get(window.sensor_id, {}))
        if self.instance is not None:
            alert["instance"] = self.instance
        topic = self.topic_template.format(sensor_id=window.sensor_id)
        reason: AlertDropReason
        try:
            mid = self.publisher.publish(topic, orjson.dumps(alert), self.qos)
        except PublishRefused as error:
            reason, detail = error.reason, str(error)
        except Exception as error:  # noqa: BLE001 - whatever the transport raises, the label set stays closed
            reason, detail = "publish_error", f"{type(error).__name__}: {error}"
        else:
            self.metrics.alerts_published.inc()
            log.info(
                "alert_published",
                sensor_id=window.sensor_id,
                window_start_seq=window.start_seq,
                score=round(score, 5),
                threshold=round(engine.threshold, 5),
            )
            return mid
        self.metrics.alerts_dropped.labels(reason).inc()
        log.error(
            "alert_dropped",
            reason=reason,
            sensor_id=window.sensor_id,
            window_start_seq=window.start_seq,
            score=score,
            error=detail[:300],
        )
        return None

    def _drop_over_share(self, sensor_id: str) -> None:
        self.metrics.alerts_dropped.labels("sensor_share").inc()
        self._share_drops[sensor_id] += 1
        if self._warnings.allow((sensor_id, "alerts_over_share")):
            log.warning("alerts_over_share", sensor_id=sensor_id, alerts_dropped=self._share_drops.pop(sensor_id))
