"""Episodes, drift and the shadow model end to end: the real daemon, a real Mosquitto, real model files."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch
import yaml

from monitor.alerts.episode_sink import read_retained
from monitor.alerts.episodes import Decision, EpisodeTracker
from monitor.config.schema import EpisodePolicy, ModelSettings
from monitor.model.engine import Engine, load_engine
from monitor.mqtt.client import make_client
from monitor.training.datasets import read_ucr
from tests.support import (
    DEFAULT_MODEL,
    SPLITS,
    daemon_config,
    metric,
    missing_tool,
    mqtt_settings,
    replay_args,
    run_cli,
    wait_until,
)

pytestmark = pytest.mark.slow

SENSORS = 20
WINDOW = 140
LIFECYCLE = {
    "enabled": True,
    "open_anomalous": 3,
    "open_window": 5,
    "resolve_normal": 3,
    "update_interval_seconds": 3600,
}


@pytest.fixture(scope="module")
def engine() -> Engine:
    torch.set_num_threads(1)
    return load_engine(ModelSettings(path=DEFAULT_MODEL, device="cpu", threads=1))


@pytest.fixture(scope="module")
def test_split(engine):
    data = read_ucr(SPLITS / "test.txt.xz")
    return data, engine.score(data.windows).errors


class Beats:
    """A sensor publishing one beat per message, its seq continuing across calls, QoS 1, acknowledged."""

    def __init__(self, port: int) -> None:
        self.client = make_client(mqtt_settings(port), f"beats-{id(self)}")
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.next_seq: dict[str, int] = {}

    def send(self, sensor_id: str, beats: np.ndarray) -> None:
        infos = []
        for beat in beats:
            seq = self.next_seq.get(sensor_id, 0)
            body = {"seq": seq, "ts": 1_800_000_000.0 + seq / 140, "samples": beat.reshape(-1).tolist()}
            infos.append(self.client.publish(f"sensors/{sensor_id}/ecg", orjson.dumps(body), qos=1))
            self.next_seq[sensor_id] = seq + len(beat)
        for info in infos:
            info.wait_for_publish(timeout=30)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def beats_factory():
    made: list[Beats] = []
    yield lambda port: made.append(Beats(port)) or made[-1]
    for item in made:
        item.close()


def replay_test_split(config) -> None:
    result = run_cli(*replay_args(config, SPLITS / "test.txt.xz", SENSORS))
    assert result.returncode == 0, result.stderr


def messages(capture, suffix: str) -> list[tuple[str, dict]]:
    with capture.lock:
        return [(topic, json.loads(payload)) for topic, payload, _ in capture.messages if topic.endswith(suffix)]


def expected_events(errors: np.ndarray, threshold: float) -> list[tuple]:
    """What the tracker makes of the replay's decisions, sensor by sensor in seq order (no update is due)."""
    tracker = EpisodeTracker(EpisodePolicy(**{key: value for key, value in LIFECYCLE.items() if key != "enabled"}))
    events = []
    for index, score in enumerate(errors):
        sensor_id, start = f"sensor-{index % SENSORS:04d}", (index // SENSORS) * WINDOW
        decision = Decision(start, start + WINDOW, None, float(score), bool(score > threshold))
        events += [event.payload() for event in tracker.decide(sensor_id, decision, 0.0)]
    return sorted(event_key(event) for event in events)


def event_key(event: dict) -> tuple:
    return (
        event["sensor_id"],
        event["event"],
        event["start_seq"],
        event["end_seq"],
        event["anomalous_windows"],
        event["windows"],
        event["peak_seq"],
    )


def test_ecg5000_replay_gives_episode_events_instead_of_an_alert_per_window(
    broker_factory, capture_factory, daemon_factory, tmp_path, engine, test_split
):
    """On a broker of its own: the retained states it leaves would be resumed by the next daemon on the broker."""
    data, errors = test_split
    broker = broker_factory().start()
    config = daemon_config(tmp_path / "monitor.yaml", broker.port, alerts={"lifecycle": LIFECYCLE})
    daemon = daemon_factory(config)
    capture = capture_factory(broker.port, ["alerts/#"])
    replay_test_split(config)
    wait_until(lambda: metric(daemon.scrape(), "monitor_windows_scored_total") >= len(errors), 120, what="all scored")
    expected = expected_events(errors, engine.threshold)
    per_window = int(np.sum(errors > engine.threshold))
    capture.wait_for(lambda c: len(messages(c, "/events")) >= len(expected), 30, what="the episode events")
    capture.wait_for(
        lambda c: sum(topic.count("/") == 1 for topic, _ in messages(c, "")) >= per_window, 30, what="every alert"
    )
    alerts = [payload for topic, payload in messages(capture, "") if topic.count("/") == 1]
    events = [payload for _, payload in messages(capture, "/events")]
    assert len(alerts) == per_window == 2021  # per-window alerts stay on unless turned off
    assert sorted(event_key(event) for event in events) == expected
    assert len(events) < per_window / 10
    print(f"ECG5000 replay: {per_window} per-window alerts, {len(events)} episode events")  # for the report
    samples = daemon.scrape()
    for kind in ("opened", "flapping", "updated", "resolved"):
        count = sum(event["event"] == kind for event in events)
        assert metric(samples, "monitor_episode_events_total", event=kind) == count
    last = {event["sensor_id"]: event for event in events}
    still_open = sum(event["event"] != "resolved" for event in last.values())
    assert sum(metric(samples, "monitor_episodes_open", state=state) for state in ("open", "flapping")) == still_open
    for event in events:
        assert event["model"] == {"name": "ecg5000", "version": "1.0.0"} and event["threshold"] == engine.threshold
        assert isinstance(event["start_ts"], float) and event["end_seq"] > event["start_seq"]
    # every sensor's retained state is the state after its last event
    states = {payload["sensor_id"]: payload for _, payload in messages(capture, "/state")}
    for event in events:
        assert event["sensor_id"] in states
    assert daemon.stop() == 0


def test_a_restarted_daemon_resumes_the_open_episode_from_the_retained_state(
    broker_factory, capture_factory, daemon_factory, beats_factory, tmp_path, test_split, engine
):
    data, errors = test_split
    broker = broker_factory().start()
    anomalous, normal = data.windows[errors > 1.5 * engine.threshold], data.windows[errors < 0.5 * engine.threshold]
    lifecycle = {**LIFECYCLE, "per_window_alerts": False, "update_interval_seconds": 0}
    config = daemon_config(tmp_path / "monitor.yaml", broker.port, alerts={"lifecycle": lifecycle})
    capture = capture_factory(broker.port, ["alerts/#"])
    beats = beats_factory(broker.port)
    first = daemon_factory(config)
    beats.send("resume-1", np.concatenate([normal[:2], anomalous[:4]]))
    capture.wait_for(lambda c: any(p["event"] == "opened" for _, p in messages(c, "resume-1/events")), 30, what="open")
    wait_until(lambda: metric(first.scrape(), "monitor_windows_scored_total") >= 6, 30, what="6 windows scored")
    assert first.stop() == 0
    assert first.events("episode_states_published")[0]["sensors"] == 1

    second = daemon_factory(config)
    restored = second.events("episode_states_restored")[0]
    assert restored["states"] >= 1 and restored["open_episodes"] >= 1
    beats.send("resume-1", np.concatenate([anomalous[4:6], normal[2:5]]))
    capture.wait_for(
        lambda c: any(p["event"] == "resolved" for _, p in messages(c, "resume-1/events")), 30, what="the resolve"
    )
    events = [payload for _, payload in messages(capture, "resume-1/events")]
    # opened at the 3rd anomalous beat of 5; every later anomalous beat is news (update_interval_seconds 0)
    assert [event["event"] for event in events] == ["opened", "updated", "updated", "updated", "resolved"]
    assert len({event["episode_id"] for event in events}) == 1  # one episode across the restart, not two
    resolved = events[-1]
    assert resolved["anomalous_windows"] == 6 and resolved["windows"] == 9 and resolved["reason"] == "normal"
    assert resolved["start_seq"] == 2 * WINDOW and resolved["end_seq"] == 8 * WINDOW
    assert messages(capture, "alerts/resume-1") == []  # per-window alerts off
    state = messages(capture, "resume-1/state")[-1][1]
    assert state["status"] == "idle" and state["episode"] is None
    assert second.stop() == 0


def write_ucr(path, windows: np.ndarray) -> None:
    np.savetxt(path, np.column_stack([np.ones(len(windows)), windows.reshape(len(windows), -1)]), fmt="%.7e")


def test_drift_is_flat_on_normal_beats_and_moves_when_the_gain_changes(
    broker, daemon_factory, beats_factory, tmp_path, test_split
):
    data, _ = test_split
    normal = data.windows[~data.is_anomaly(1)]
    half = len(normal) // 2
    config = daemon_config(tmp_path / "monitor.yaml", broker.port, drift={"window_count": 400, "min_windows": 200})
    daemon = daemon_factory(config)
    beats = beats_factory(broker.port)
    scored = 0

    def send(windows: np.ndarray) -> float:
        nonlocal scored
        for sensor in range(10):
            beats.send(f"drift-{sensor}", windows[sensor::10])
        scored += len(windows)
        wait_until(lambda: metric(daemon.scrape(), "monitor_windows_scored_total") >= scored, 60, what="scored")
        return metric(daemon.scrape(), "monitor_drift_psi")

    first, second = send(normal[:half]), send(normal[half:])
    assert first < 0.1 and second < 0.1 and abs(second - first) < 0.05  # flat
    assert daemon.events("drift_bound_crossed") == []
    shifted = send(normal[half:] * 1.5)
    assert shifted > 1.0
    crossed = daemon.wait_for_event("drift_bound_crossed")[0]
    assert crossed["bound"] == 0.25 and crossed["psi"] > 0.25 and crossed["windows"] == 400
    assert metric(daemon.scrape(), "monitor_drift_share_above", quantile="0.5") > 0.9
    assert daemon.stop() == 0


def test_shadow_model_counts_disagreements_and_a_sighup_promotes_it(
    broker, daemon_factory, tmp_path, engine, test_split
):
    """The shadow is the shipped model with a threshold of 0.5: it disagrees exactly on the scores in between."""
    data, errors = test_split
    shadow = tmp_path / "shadow"
    shutil.copytree(DEFAULT_MODEL, shadow)
    metadata = json.loads((shadow / "model.json").read_text())
    metadata["threshold"]["value"], metadata["version"] = 0.5, "1.0.0-strict"
    (shadow / "model.json").write_text(json.dumps(metadata))
    config = daemon_config(tmp_path / "monitor.yaml", broker.port)
    settings = yaml.safe_load(config.read_text())
    settings["model"]["shadow_path"] = str(shadow)
    config.write_text(yaml.safe_dump(settings))
    daemon = daemon_factory(config)
    assert daemon.events("shadow_model_loaded")[0]["version"] == "1.0.0-strict"
    replay_test_split(config)
    wait_until(
        lambda: metric(daemon.scrape(), "monitor_shadow_windows_scored_total") >= len(errors),
        120,
        what="the shadow to score every window",
    )
    samples = daemon.scrape()
    between = int(np.sum((errors > engine.threshold) & (errors <= 0.5)))
    assert between > 0
    assert metric(samples, "monitor_shadow_disagreements_total", decision="live_only") == between
    assert metric(samples, "monitor_shadow_disagreements_total", decision="shadow_only") == 0
    assert metric(samples, "monitor_shadow_threshold") == 0.5
    assert metric(samples, "monitor_alerts_published_total") == int(np.sum(errors > engine.threshold))  # live alerts

    settings["model"] = {"path": str(shadow), "device": "cpu"}
    config.write_text(yaml.safe_dump(settings))
    daemon.process.send_signal(signal.SIGHUP)
    assert daemon.wait_for_event("reloaded")[0]["version"] == "1.0.0-strict"
    samples = daemon.scrape()
    assert metric(samples, "monitor_threshold") == 0.5
    assert math.isnan(metric(samples, "monitor_shadow_threshold"))
    assert not [labels for name, labels in samples if name == "monitor_shadow_model_info"]
    assert daemon.stop() == 0


def test_the_retained_states_are_read_once_from_a_real_broker(broker_factory):
    broker = broker_factory().start()
    settings = mqtt_settings(broker.port)
    writer = make_client(settings, "state-writer")
    writer.connect("127.0.0.1", broker.port)
    writer.loop_start()
    try:
        for sensor in ("a", "b"):
            writer.publish(
                f"alerts/{sensor}/state", b'{"sensor_id": "%s"}' % sensor.encode(), qos=1, retain=True
            ).wait_for_publish(10)
        writer.publish("alerts/c/events", b"{}", qos=1).wait_for_publish(10)  # neither retained nor a state
    finally:
        writer.disconnect()
        writer.loop_stop()
    payloads = read_retained(settings, "alerts/+/state", timeout_seconds=10, quiet_seconds=0.3)
    assert sorted(orjson.loads(payload)["sensor_id"] for payload in payloads) == ["a", "b"]


@pytest.fixture
def wall_clock(tmp_path) -> tuple[dict[str, str], Callable[[int], None]]:
    """(the environment that gives a daemon a wall clock of its own, a function that steps it by whole seconds): a
    small preloaded library (tests/e2e/wallclock.c) adds the offset in a file to CLOCK_REALTIME only, as an NTP step
    moves the wall clock and not the monotonic one."""
    gcc = shutil.which("gcc") or missing_tool("gcc", "gcc, libc6-dev")
    library = tmp_path / "wallclock.so"
    source = Path(__file__).with_name("wallclock.c")
    built = subprocess.run(
        [gcc, "-shared", "-fPIC", "-O2", "-o", str(library), str(source), "-ldl"], capture_output=True
    )
    assert built.returncode == 0, built.stderr.decode()
    offset = tmp_path / "wall_clock_offset"
    offset.write_text("0")
    return {"LD_PRELOAD": str(library), "WALL_CLOCK_OFFSET_FILE": str(offset)}, lambda seconds: offset.write_text(
        str(seconds)
    )


@pytest.mark.parametrize("cooldown", [0, 5])
def test_a_one_hour_step_back_of_the_daemons_wall_clock_changes_no_episode_decision(
    broker_factory, capture_factory, daemon_factory, beats_factory, wall_clock, tmp_path, test_split, engine, cooldown
):
    """The daemon's wall clock steps back an hour right after an episode resolved: once the cooldown has passed, the
    next anomalous run opens an episode as it would have without the step (durations are on the monotonic clock);
    the events' times, which people read, are the stepped wall clock's."""
    data, errors = test_split
    anomalous, normal = data.windows[errors > 1.5 * engine.threshold], data.windows[errors < 0.5 * engine.threshold]
    broker = broker_factory().start()
    lifecycle = {**LIFECYCLE, "per_window_alerts": False, "cooldown_seconds": cooldown}
    config = daemon_config(tmp_path / "monitor.yaml", broker.port, alerts={"lifecycle": lifecycle})
    capture = capture_factory(broker.port, ["alerts/#"])
    beats = beats_factory(broker.port)
    env, step = wall_clock
    daemon = daemon_factory(config, env=env)
    events = lambda: [payload for _, payload in messages(capture, "step/events")]  # noqa: E731
    beats.send("step", np.concatenate([anomalous[:3], normal[:3]]))
    capture.wait_for(lambda c: [e["event"] for e in events()] == ["opened", "resolved"], 30, what="open, resolve")
    step(-3600)
    time.sleep(cooldown + 1)
    beats.send("step", anomalous[3:6])
    capture.wait_for(lambda c: [e["event"] for e in events()][2:] == ["opened"], 30, what="the next episode opened")
    resolved, reopened = events()[1], events()[2]
    assert reopened["at"] < resolved["at"] - 3000  # the daemon's wall clock did step back
    assert daemon.stop() == 0
