"""The shadow model (`model.shadow_path`): scores the same batches as the live model, after the live alerts went
out, never alerts, and counts the windows on which the two decide differently. So a retrained model is judged on
live data before a SIGHUP promotes it (point `model.path` at it). It costs a second forward pass per batch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import structlog

from monitor.alerts.sink import ThresholdDecision
from monitor.model.engine import Engine
from monitor.model.scoring import Scores
from monitor.telemetry.metrics import Metrics
from monitor.window import Window

log = structlog.get_logger("monitor.shadow")

FAILURE_LOG_SECONDS = 60.0


class ShadowComparison:
    """Scores each batch with the shadow engine and counts disagreements with the live decisions."""

    def __init__(self, shadow: Engine, metrics: Metrics) -> None:
        self.shadow = shadow
        self.metrics = metrics
        self._failure_logged_at = -FAILURE_LOG_SECONDS

    def observe(self, batch: Sequence[Window], scores: Scores, anomalous: np.ndarray, engine: Engine) -> None:
        try:
            errors = self.shadow.score_windows(batch).errors
        except Exception:
            self.metrics.shadow_failures.inc()
            if time.monotonic() - self._failure_logged_at >= FAILURE_LOG_SECONDS:
                self._failure_logged_at = time.monotonic()
                log.exception("shadow_scoring_failed", batch=len(batch), model=self.shadow.model.to_dict())
            return
        shadow_anomalous = ThresholdDecision(self.shadow.threshold).anomalous(errors)
        self.metrics.shadow_windows.inc(len(batch))
        self.metrics.shadow_disagreements.labels("live_only").inc(int(np.sum(anomalous & ~shadow_anomalous)))
        self.metrics.shadow_disagreements.labels("shadow_only").inc(int(np.sum(~anomalous & shadow_anomalous)))
