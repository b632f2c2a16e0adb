"""The episode stage in process: what it publishes where, failures counted, resume filtered by partition, and the
docs/interface.md's event and state payloads held to what the code produces."""

from __future__ import annotations

import re
import time

import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry

from monitor.alerts.episode_sink import EpisodeSink, read_retained, state_filter
from monitor.alerts.episodes import EpisodeTracker
from monitor.alerts.sink import AlertSink
from monitor.config.schema import AlertSettings, LifecycleSettings, ModelSettings
from monitor.model.engine import Engine, load_engine
from monitor.model.scoring import Scores
from monitor.mqtt.publisher import PublishRefused
from monitor.telemetry.metrics import Metrics
from monitor.window import Window
from tests.support import DEFAULT_MODEL, REPO, free_port, mqtt_settings

LIFECYCLE = LifecycleSettings(
    enabled=True, open_anomalous=2, open_window=3, resolve_normal=2, update_interval_seconds=0
)


class RetainingPublisher:
    """Records (topic, payload, qos, retain); raises `error` instead when one is set."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict, int, bool]] = []
        self.error: Exception | None = None

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> None:
        if self.error is not None:
            raise self.error
        self.sent.append((topic, orjson.loads(payload), qos, retain))

    def on(self, suffix: str) -> list[dict]:
        return [payload for topic, payload, _, _ in self.sent if topic.endswith(suffix)]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return load_engine(ModelSettings(path=DEFAULT_MODEL, device="cpu", threads=1))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_stage(engine: Engine, settings: LifecycleSettings = LIFECYCLE):
    registry, publisher, clock = CollectorRegistry(), RetainingPublisher(), Clock()
    metrics = Metrics(registry, 64, engine.threshold)
    stage = EpisodeSink(EpisodeTracker(settings.policy()), publisher, settings, metrics, engine, clock)
    return stage, publisher, registry, clock


def feed(stage: EpisodeSink, engine: Engine, sensor_id: str, marks: str, first: int = 0) -> None:
    """One batch: `A` a window scored above the threshold, `N` one below (its one channel's error is its score)."""
    windows = [
        Window(sensor_id, (first + i) * 140, np.zeros((140, 1), np.float32), 50.0 + i, 0.0) for i in range(len(marks))
    ]
    errors = np.array([engine.threshold * (2.0 if mark == "A" else 0.5) for mark in marks], dtype=np.float32)
    scores = Scores(errors, np.zeros((len(marks), 140), np.float32), errors[:, None])
    stage.observe(windows, scores, errors > engine.threshold, engine)


def test_events_go_to_the_event_topic_and_each_is_followed_by_the_retained_state(engine):
    stage, publisher, registry, _ = make_stage(engine)
    feed(stage, engine, "s1", "NAANN")
    assert [
        (topic, payload["event"] if "event" in payload else payload["status"], qos, retain)
        for topic, payload, qos, retain in publisher.sent
    ] == [
        ("alerts/s1/events", "opened", 1, False),
        ("alerts/s1/state", "open", 1, True),
        ("alerts/s1/events", "resolved", 1, False),
        ("alerts/s1/state", "idle", 1, True),
    ]
    opened = publisher.on("/events")[0]
    assert opened["model"] == {"name": "ecg5000", "version": "1.0.0"} and opened["threshold"] == engine.threshold
    assert registry.get_sample_value("monitor_episode_events_total", {"event": "opened"}) == 1
    assert registry.get_sample_value("monitor_episodes_open", {"state": "open"}) == 0


def test_with_per_window_alerts_off_only_episode_events_go_out(engine):
    stage, publisher, registry, _ = make_stage(engine)
    settings = AlertSettings(lifecycle=LifecycleSettings(enabled=True, per_window_alerts=False))
    metrics = Metrics(CollectorRegistry(), 64, engine.threshold)
    sink = AlertSink(publisher, "alerts/{sensor_id}", 1, settings, metrics, [stage])
    windows = [Window("s1", i * 140, np.zeros((140, 1), np.float32), None, 0.0) for i in range(3)]
    errors = np.full(3, engine.threshold * 2, np.float32)
    assert sink.handle(windows, Scores(errors, np.zeros((3, 140), np.float32)), engine) == {}
    assert metrics.anomalies._value.get() == 3  # counted all the same
    assert [topic for topic, *_ in publisher.sent] == ["alerts/s1/events", "alerts/s1/state"] * 2  # opened, updated


def test_a_refused_publish_is_counted_and_never_raised(engine):
    stage, publisher, registry, _ = make_stage(engine)
    publisher.error = PublishRefused("queue_full", "paho's queue is full")
    feed(stage, engine, "s1", "AA")
    assert registry.get_sample_value("monitor_episode_messages_dropped_total", {"reason": "queue_full"}) == 2
    assert registry.get_sample_value("monitor_episode_events_total", {"event": "opened"}) == 0
    publisher.error = RuntimeError("anything else")
    feed(stage, engine, "s1", "NN", first=2)
    assert registry.get_sample_value("monitor_episode_messages_dropped_total", {"reason": "publish_error"}) == 2


def test_drain_publishes_the_states_of_sensors_with_an_episode_only(engine):
    stage, publisher, _, _ = make_stage(engine)
    feed(stage, engine, "open-1", "AA")
    feed(stage, engine, "quiet-1", "NN")
    publisher.sent.clear()
    assert stage.publish_open_states() == 1
    assert [(topic, payload["status"], retain) for topic, payload, _, retain in publisher.sent] == [
        ("alerts/open-1/state", "open", True)
    ]


def test_resume_takes_back_its_own_partitions_states_and_counts_the_unreadable(engine):
    before, publisher, _, _ = make_stage(engine)
    feed(before, engine, "mine", "AA")
    feed(before, engine, "theirs", "AA")
    states = [orjson.dumps(payload) for payload in publisher.on("/state")]
    after, republished, registry, _ = make_stage(engine)
    restored, unreadable = after.restore([*states, b"not json", b'{"format": "other"}'], lambda s: s == "mine")
    assert (restored, unreadable) == (1, 2)
    assert after.tracker.open_episodes() == ["mine"]
    assert registry.get_sample_value("monitor_episodes_open", {"state": "open"}) == 1
    feed(after, engine, "mine", "NN", first=2)
    resolved = republished.on("/events")[0]
    assert resolved["event"] == "resolved" and resolved["episode_id"] == publisher.on("/events")[0]["episode_id"]


def test_a_silent_sensor_is_resolved_by_housekeeping(engine):
    stage, publisher, _, clock = make_stage(engine)
    feed(stage, engine, "s1", "AA")
    clock.now += 300
    stage.housekeeping(idle_seconds=300)
    resolved = publisher.on("/events")[-1]
    assert (resolved["event"], resolved["reason"]) == ("resolved", "sensor_idle")


def test_state_filter_matches_every_sensor():
    assert state_filter("alerts/{sensor_id}/state") == "alerts/+/state"
    with pytest.raises(ValueError, match="sensor_id"):
        LifecycleSettings(state_topic="alerts/state")
    with pytest.raises(ValueError, match="differ"):
        LifecycleSettings(event_topic="a/{sensor_id}", state_topic="a/{sensor_id}")


# --- the documented payloads ---


def documented_examples() -> tuple[dict, dict]:
    """The JSON blocks of docs/interface.md's "Episode events and states" section: (event, state)."""
    text = (REPO / "docs" / "interface.md").read_text()
    section = text[text.index("## Episode events and states") :]
    section = section[: section.index("\n## ", 1)]
    event, state = (orjson.loads(block) for block in re.findall(r"```json\n(.*?)```", section, flags=re.S))
    return event, state


def keys(payload: dict, path: str = "") -> set[str]:
    """Every key path in a payload (into nested objects and the first element of lists of objects)."""
    found = set()
    for key, value in payload.items():
        found.add(path + key)
        if isinstance(value, dict) and key != "model":
            found |= keys(value, f"{path}{key}.")
        if isinstance(value, list) and value and isinstance(value[0], dict):
            found |= keys(value[0], f"{path}{key}[].")
    return found


def test_the_documented_event_is_what_the_daemon_publishes(engine):
    stage, publisher, _, _ = make_stage(engine)
    feed(stage, engine, "s1", "AANN")
    documented, _ = documented_examples()
    opened, resolved = publisher.on("/events")
    assert keys(resolved) == keys(documented)
    assert keys(opened) == keys(documented) - {"reason"}  # only a resolve has a reason
    peak = float(np.float32(engine.threshold * 2.0))
    assert opened["peak_channels"] == [{"index": 0, "error": round(peak, 6)}]  # the peak window's top channel
    assert documented["event"] == documented["state"] == "resolved"


def test_the_documented_state_is_what_the_daemon_retains_and_resumes_from(engine):
    stage, publisher, _, _ = make_stage(engine)
    feed(stage, engine, "s1", "NAA")
    _, documented = documented_examples()
    retained = publisher.on("/state")[-1]
    assert keys(retained) == keys(documented)
    tracker = EpisodeTracker(LIFECYCLE.policy())
    assert tracker.restore(documented, time.time()) == "sensor-0007"
    assert tracker.status("sensor-0007", time.time()) == "open"


def test_an_unreachable_broker_leaves_nothing_to_resume_and_does_not_block():
    started = time.monotonic()
    assert read_retained(mqtt_settings(free_port()), "alerts/+/state", timeout_seconds=5) is None
    assert time.monotonic() - started < 5
