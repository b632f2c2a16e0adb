"""The episode stage (`alerts.lifecycle`): every decision through the `EpisodeTracker`, its events and the
sensors' retained states out over MQTT, and, at start, the retained states read back to resume.

Events go to `event_topic` (QoS `event_qos`, not retained) with the model and threshold added; after each event
the sensor's state goes to `state_topic`, retained, QoS 1. A drain publishes the state of every sensor with an
episode, so a clean restart resumes it exactly; after a crash the retained state is that of the last event.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import orjson
import structlog

from monitor.alerts.episodes import Decision, EpisodeEvent, EpisodeTracker
from monitor.alerts.sink import channels_of
from monitor.config.schema import LifecycleSettings, MqttSettings
from monitor.model.engine import Engine
from monitor.model.scoring import Scores
from monitor.mqtt.client import client_id_for, make_client
from monitor.mqtt.publisher import DropReason, Publisher, PublishRefused
from monitor.telemetry.metrics import EPISODE_STATES, Metrics
from monitor.window import Window

log = structlog.get_logger("monitor.episodes")

STATE_QOS = 1


class EpisodeSink:
    """Feeds the tracker (from the scoring thread) and publishes what it says; housekeeping may run alongside."""

    def __init__(
        self,
        tracker: EpisodeTracker,
        publisher: Publisher,
        settings: LifecycleSettings,
        metrics: Metrics,
        engine: Engine,
        clock: Callable[[], float] = time.time,
        top_channels: int = 3,
    ) -> None:
        """`top_channels`: how many channels an episode names for its peak window (`alerts.top_channels`)."""
        self.tracker = tracker
        self.top_channels = top_channels
        self.publisher = publisher
        self.settings = settings
        self.metrics = metrics
        self.engine = engine  # the model named in events; the latest one that decided
        self.clock = clock
        self.lock = threading.Lock()

    def observe(self, batch: Sequence[Window], scores: Scores, anomalous: np.ndarray, engine: Engine) -> None:
        now = self.clock()
        with self.lock:
            self.engine = engine
            for index, window in enumerate(batch):
                start, flagged = window.start_seq, bool(anomalous[index])
                channels = channels_of(scores, index, self.top_channels, engine) if flagged else None
                score = float(scores.errors[index])
                decision = Decision(start, start + engine.window, window.start_ts, score, flagged, channels)
                self._emit(self.tracker.decide(window.sensor_id, decision, now), now)
            self._count_open()

    def housekeeping(self, idle_seconds: float) -> None:
        """Resolve the episodes of sensors silent for `idle_seconds` and forget those sensors."""
        now = self.clock()
        with self.lock:
            events, _ = self.tracker.expire(now, idle_seconds)
            self._emit(events, now)
            self._count_open()

    def end_streams(self, sensor_ids: Sequence[str]) -> None:
        """Resolve the episodes of sensors whose stream ended (reason `stream_ended`) and forget those sensors."""
        now = self.clock()
        with self.lock:
            for sensor_id in sensor_ids:
                self._emit(self.tracker.end_stream(sensor_id, now), now)
            self._count_open()

    def publish_open_states(self) -> int:
        """Publish the state of every sensor with an episode (at drain, so the next start resumes them exactly)."""
        now = self.clock()
        with self.lock:
            sensors = self.tracker.open_episodes()
            for sensor_id in sensors:
                self._publish_state(sensor_id, now)
        return len(sensors)

    def restore(self, payloads: Sequence[bytes], accept: Callable[[str], bool]) -> tuple[int, int]:
        """Take back retained states of sensors this instance serves; returns (restored, unreadable)."""
        now = self.clock()
        restored = unreadable = 0
        with self.lock:
            for payload in payloads:
                try:
                    state = orjson.loads(payload)
                    sensor_id = state.get("sensor_id") if isinstance(state, dict) else None
                    if isinstance(sensor_id, str) and not accept(sensor_id):
                        continue
                    self.tracker.restore(state, now)
                    restored += 1
                except (orjson.JSONDecodeError, ValueError) as error:
                    unreadable += 1
                    log.warning("episode_state_unreadable", error=str(error)[:300], bytes=len(payload))
            self._count_open()
        return restored, unreadable

    def _emit(self, events: list[EpisodeEvent], now: float) -> None:
        engine = self.engine
        for event in events:
            body = {
                **event.payload(),
                "threshold": engine.threshold,
                "baseline": engine.baseline[0],
                "model": engine.model.to_dict(),
            }
            topic = self.settings.event_topic.format(sensor_id=event.sensor_id)
            if self._publish(topic, body, self.settings.event_qos, retain=False, what=event.kind):
                self.metrics.episode_events.labels(event.kind).inc()
                log.info(
                    f"episode_{event.kind}",
                    sensor_id=event.sensor_id,
                    episode_id=body["episode_id"],
                    anomalous_windows=body["anomalous_windows"],
                    peak_score=round(body["peak_score"], 5),
                    **({"reason": event.reason} if event.reason else {}),
                )
            self._publish_state(event.sensor_id, now)

    def _publish_state(self, sensor_id: str, now: float) -> None:
        topic = self.settings.state_topic.format(sensor_id=sensor_id)
        self._publish(topic, self.tracker.state_payload(sensor_id, now), STATE_QOS, retain=True, what="state")

    def _publish(self, topic: str, body: dict, qos: int, retain: bool, what: str) -> bool:
        reason: DropReason
        try:
            self.publisher.publish(topic, orjson.dumps(body), qos, retain)
            return True
        except PublishRefused as error:
            reason, detail = error.reason, str(error)
        except Exception as error:  # noqa: BLE001 - whatever the transport raises, the label set stays closed
            reason, detail = "publish_error", f"{type(error).__name__}: {error}"
        self.metrics.episode_messages_dropped.labels(reason).inc()
        log.error("episode_message_dropped", what=what, topic=topic, reason=reason, error=detail[:300])
        return False

    def _count_open(self) -> None:
        counts = dict.fromkeys(EPISODE_STATES, 0)
        for sensor_id in self.tracker.open_episodes():
            counts[self.tracker.status(sensor_id, 0.0)] += 1
        for state, count in counts.items():
            self.metrics.episodes_open.labels(state).set(count)


def state_filter(state_topic: str) -> str:
    """The subscription filter that matches every sensor's state topic."""
    return state_topic.replace("{sensor_id}", "+")


def read_retained(
    settings: MqttSettings, topic_filter: str, timeout_seconds: float, quiet_seconds: float = 0.5
) -> list[bytes] | None:
    """The retained messages under `topic_filter`, read once with a client of its own; None if the broker could not
    be asked within `timeout_seconds`. A broker sends the retained messages right after the subscription, so the
    reading ends once `quiet_seconds` pass without one (or at the timeout)."""
    received: list[bytes] = []
    subscribed = threading.Event()
    lock = threading.Lock()
    last = [time.monotonic()]

    def on_message(client, userdata, message) -> None:
        if message.retain:
            with lock:
                received.append(message.payload)
                last[0] = time.monotonic()

    def on_subscribe(client, userdata, mid, reason_codes, properties) -> None:
        last[0] = time.monotonic()
        subscribed.set()

    client = make_client(settings, client_id_for(settings, "state-reader"))
    client.on_connect = lambda c, u, flags, code, props: None if code.is_failure else c.subscribe(topic_filter, qos=1)
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    deadline = time.monotonic() + timeout_seconds
    try:
        client.connect(settings.host, settings.port, keepalive=max(5, int(timeout_seconds) + 5))
    except (OSError, ValueError) as error:
        log.warning("episode_states_not_read", error=str(error)[:300])
        return None
    client.loop_start()
    try:
        if not subscribed.wait(max(deadline - time.monotonic(), 0.0)):
            log.warning("episode_states_not_read", error=f"no subscription within {timeout_seconds} s")
            return None
        while time.monotonic() < deadline:
            with lock:
                if time.monotonic() - last[0] >= quiet_seconds:
                    break
            time.sleep(0.05)
        with lock:
            return list(received)
    finally:
        client.disconnect()
        client.loop_stop()
