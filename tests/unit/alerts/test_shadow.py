"""The shadow model in process: loading refuses a missing or misshapen one by its key, and the comparison counts
disagreements and failures without touching the live decisions."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from monitor.alerts.shadow import ShadowComparison
from monitor.config.schema import ModelSettings
from monitor.errors import ArtifactError, ConfigError
from monitor.model.engine import Engine, load_engine, load_shadow_engine
from monitor.model.scoring import Scores
from monitor.telemetry.metrics import Metrics
from monitor.window import Window
from tests.support import DEFAULT_MODEL


@pytest.fixture(scope="module")
def live() -> Engine:
    return load_engine(ModelSettings(path=DEFAULT_MODEL, device="cpu", threads=1))


def test_no_shadow_path_no_shadow(live):
    assert load_shadow_engine(ModelSettings(path=DEFAULT_MODEL, device="cpu"), live, load_engine) is None


def test_a_missing_or_misshapen_shadow_is_refused_by_its_key(live, tmp_path):
    settings = ModelSettings(path=DEFAULT_MODEL, device="cpu", shadow_path=tmp_path / "missing")
    with pytest.raises(ArtifactError, match="^model.shadow_path: .*not found"):
        load_shadow_engine(settings, live, load_engine)
    other = tmp_path / "other"
    shutil.copytree(DEFAULT_MODEL, other)
    metadata = json.loads((other / "model.json").read_text())
    metadata["architecture"]["window"] = 100  # the LSTM weights take any length: only the declared shape differs
    (other / "model.json").write_text(json.dumps(metadata))
    with pytest.raises(ConfigError, match="model.shadow_path: the shadow model takes windows of 100x1"):
        load_shadow_engine(settings.model_copy(update={"shadow_path": other}), live, load_engine)


def test_a_shadow_is_refused_next_to_a_model_that_scales_its_sensors_scores(live):
    """The sensors' score scales are measured by the live model: a shadow's scores could not be compared."""
    settings = ModelSettings(path=DEFAULT_MODEL, device="cpu", shadow_path=DEFAULT_MODEL)
    scaled = dataclasses.replace(live, score_scale=True)
    with pytest.raises(ConfigError, match="model.shadow_path: not with a model that scales its sensors' scores"):
        load_shadow_engine(settings, scaled, load_engine)
    with pytest.raises(ConfigError, match="model.shadow_path: not with a model that scales"):
        load_shadow_engine(settings, live, lambda model: dataclasses.replace(load_engine(model), score_scale=True))
    assert load_shadow_engine(settings, live, load_engine) is not None  # neither scaled: a shadow as before


class FailingScorer:
    def score(self, windows: np.ndarray) -> Scores:
        raise RuntimeError("out of memory")


def test_disagreements_are_counted_by_which_model_flagged_the_window(live):
    registry = CollectorRegistry()
    metrics = Metrics(registry, 64, live.threshold)
    batch = [Window("s", i * 140, np.zeros((140, 1), np.float32), None, 0.0) for i in range(4)]
    shadow_errors = live.score(np.stack([window.samples for window in batch])).errors
    strict = dataclasses.replace(live, threshold=float(shadow_errors.max()) + 1)  # the shadow flags nothing
    live_anomalous = np.array([True, True, False, False])
    ShadowComparison(strict, metrics).observe(batch, Scores(shadow_errors, np.zeros((4, 140))), live_anomalous, live)
    lenient = dataclasses.replace(live, threshold=-1.0)  # the shadow flags everything
    ShadowComparison(lenient, metrics).observe(batch, Scores(shadow_errors, np.zeros((4, 140))), live_anomalous, live)
    assert registry.get_sample_value("monitor_shadow_windows_scored_total") == 8
    assert registry.get_sample_value("monitor_shadow_disagreements_total", {"decision": "live_only"}) == 2
    assert registry.get_sample_value("monitor_shadow_disagreements_total", {"decision": "shadow_only"}) == 2
    broken = dataclasses.replace(live, scorer=FailingScorer())
    ShadowComparison(broken, metrics).observe(batch, Scores(shadow_errors, np.zeros((4, 140))), live_anomalous, live)
    assert registry.get_sample_value("monitor_shadow_scoring_failures_total") == 1
    assert registry.get_sample_value("monitor_shadow_windows_scored_total") == 8
