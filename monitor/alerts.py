"""The decision (score above the calibrated threshold) and the alert payload (contract section 4)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np


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
    model: dict[str, str],
    start_ts: float | None = None,
    top_timesteps: int = 5,
    include_profile: bool = False,
    detected_at: float | None = None,
) -> dict[str, Any]:
    """The JSON alert for one anomalous window.

    `top_timesteps` lists the offsets within the window with the largest error (highest first),
    so a subscriber can see where in the window the anomaly lies.
    """
    alert: dict[str, Any] = {
        "sensor_id": sensor_id,
        "window_start_seq": int(start_seq),
        "window_end_seq": int(start_seq + window),
        "score": float(score),
        "threshold": float(threshold),
        "model": model,
        "detected_at": time.time() if detected_at is None else detected_at,
    }
    if start_ts is not None:
        alert["window_start_ts"] = float(start_ts)
    if top_timesteps:
        top = np.argsort(-profile, kind="stable")[:top_timesteps]
        alert["top_timesteps"] = [{"offset": int(i), "error": round(float(profile[i]), 6)} for i in top]
    if include_profile:
        alert["error_profile"] = [round(float(value), 6) for value in profile]
    return alert
