"""Alert episodes per sensor: a run of anomalous windows becomes one episode with a lifecycle.

Per-window alerts (docs/interface.md) stay the default. With `alerts.lifecycle` every decision also goes
through an `EpisodeTracker`, which behaves like the alert nodes operators know (Kapacitor, Alertmanager):

- an episode opens when at least k of the last n decisions are anomalous (`open_anomalous` of `open_window`,
  the current, anomalous, decision among them); it stays open while anomalous windows keep coming and resolves
  after m consecutive normal decisions (`resolve_normal`): hysteresis, so one normal beat ends nothing;
- a resolved episode starts a cooldown: no new episode for that sensor before `cooldown_seconds` have passed;
- flapping: when the sensor's state changed (opened or resolved) `flapping_transitions` times within its last
  `flapping_window` decisions, it goes into one episode in state `flapping` instead of a stream of
  opened/resolved events. It leaves it once `flapping_window` decisions pass without a change: resolved if the
  anomalies have stopped, back to `open` if they have not.

Events: `opened`, `flapping`, `updated` (the episode grew, at most once per `update_interval_seconds`, or it
went from flapping back to open) and `resolved` (with a `reason`). Every event of an episode carries the same
`episode_id`. `state_payload` is the sensor's whole state as JSON data (the retained message on the state
topic); `restore` takes it back, so a restarted instance continues the same episode instead of opening another.

`now` (given by the caller) is wall-clock Unix seconds, for the times people read (`opened_at`, `at`). Durations
(cooldowns, the update pacing, idle sensors) are measured on `tick`, a monotonic clock (the daemon's:
`time.monotonic`), so a step of the wall clock (NTP) changes no decision; the state payload converts them to
wall-clock times and `restore` back, so a cooldown and the pacing survive a restart. Without `tick`, durations are
measured on `now`. Not thread-safe: the owner serialises access.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError

from monitor.alerts.sensor_table import SensorTable
from monitor.config.schema import EpisodePolicy

STATE_FORMAT = "monitor-episode-state"
STATE_VERSION = 1
EVENT_KINDS = ("opened", "flapping", "updated", "resolved")
RESOLVE_REASONS = ("normal", "flapping_ended", "sensor_idle", "sensor_limit", "stream_ended")

EpisodeState = Literal["open", "flapping"]


@dataclass(frozen=True, slots=True)
class Decision:
    """One scored window of a sensor: its span, start time, score and the threshold's verdict."""

    start_seq: int
    end_seq: int  # exclusive
    start_ts: float | None
    score: float
    anomalous: bool
    channels: list[dict[str, Any]] | None = None  # an anomalous window's top channels, as its alert lists them


@dataclass
class Episode:
    """What an episode has covered so far; `end_seq`/`end_ts` are those of its last anomalous window."""

    episode_id: str
    state: EpisodeState
    start_seq: int
    end_seq: int
    start_ts: float | None
    end_ts: float | None  # the start time of the last anomalous window
    anomalous_windows: int
    windows: int  # every decision since the first anomalous window, normal ones included
    peak_score: float
    peak_seq: int  # start seq of the window with the peak score
    opened_at: float
    last_event_at: float  # on the tracker's tick clock (wall clock in the state payload)
    reported_windows: int  # anomalous_windows as of the last event
    peak_channels: list[dict[str, Any]] | None = None  # the top channels of the window with the peak score

    def add(self, decision: Decision) -> None:
        self.windows += 1
        if not decision.anomalous:
            return
        self.anomalous_windows += 1
        self.end_seq, self.end_ts = decision.end_seq, decision.start_ts
        if decision.score > self.peak_score:
            self.peak_score, self.peak_seq = decision.score, decision.start_seq
            self.peak_channels = decision.channels

    def public(self) -> dict[str, Any]:
        """The fields an event carries."""
        fields = asdict(self)
        del fields["last_event_at"], fields["reported_windows"]
        return fields


@dataclass(frozen=True)
class EpisodeEvent:
    """A change worth telling subscribers about."""

    kind: str  # one of EVENT_KINDS
    sensor_id: str
    at: float
    episode: dict[str, Any]  # Episode.public() at the time of the event
    reason: str | None = None  # resolved only: one of RESOLVE_REASONS

    def payload(self) -> dict[str, Any]:
        body: dict[str, Any] = {"event": self.kind, "sensor_id": self.sensor_id, **self.episode, "at": self.at}
        if self.reason is not None:
            body["reason"] = self.reason
        return body


@dataclass
class SensorEpisodes:
    """One sensor's lifecycle state; `active` is the hysteresis state, which flapping may hide from events."""

    recent: deque[Decision] = field(default_factory=deque)
    active: bool = False
    normal_run: int = 0
    decisions: int = 0
    transitions: deque[int] = field(default_factory=deque)  # decision numbers at which `active` changed
    episode: Episode | None = None
    cooldown_until: float = 0.0  # on the tracker's tick clock (wall clock in the state payload)


_RECORD = TypeAdapter(SensorEpisodes)


class EpisodeTracker:
    """Turns every sensor's decisions into episode events; bounded to `max_sensors` sensors."""

    def __init__(
        self,
        policy: EpisodePolicy,
        max_sensors: int = 10000,
        new_id: Callable[[], str] | None = None,
        tick: Callable[[], float] | None = None,
    ) -> None:
        self.policy = policy
        self.new_id = new_id or (lambda: uuid.uuid4().hex)
        self.tick = tick
        self.sensors: SensorTable[SensorEpisodes] = SensorTable(max_sensors, self._new_record)

    def _new_record(self) -> SensorEpisodes:
        return SensorEpisodes(recent=deque(maxlen=self.policy.open_window))

    def _tick(self, now: float) -> float:
        return now if self.tick is None else self.tick()

    def decide(self, sensor_id: str, decision: Decision, now: float) -> list[EpisodeEvent]:
        """Take one decision (a sensor's decisions in seq order); returns the events it causes."""
        tick = self._tick(now)
        record, evicted = self.sensors.touch(sensor_id, tick)
        events = self._close_all(evicted, now, tick, "sensor_limit")
        policy = self.policy
        record.decisions += 1
        record.recent.append(decision)
        changed = self._step_hysteresis(record, decision, tick)
        if changed:
            record.transitions.append(record.decisions)
        while record.transitions and record.transitions[0] <= record.decisions - policy.flapping_window:
            record.transitions.popleft()
        flapping = policy.flapping_transitions > 0 and len(record.transitions) >= policy.flapping_transitions
        episode = record.episode
        if episode is None:
            if changed:  # `active` can only have come up here
                record.episode = self._open(record, now, tick, "flapping" if flapping else "open")
                events.append(self._event("flapping" if flapping else "opened", sensor_id, record.episode, now, tick))
            return events
        episode.add(decision)
        if episode.state == "open" and changed:  # `active` went down
            if flapping:
                episode.state = "flapping"
                events.append(self._event("flapping", sensor_id, episode, now, tick))
            else:
                events.append(self._resolve(sensor_id, record, now, tick, "normal"))
        elif episode.state == "flapping" and not record.transitions:
            if record.active:
                episode.state = "open"
                events.append(self._event("updated", sensor_id, episode, now, tick))
            else:
                events.append(self._resolve(sensor_id, record, now, tick, "flapping_ended"))
        elif (
            episode.anomalous_windows > episode.reported_windows
            and tick - episode.last_event_at >= policy.update_interval_seconds
        ):
            events.append(self._event("updated", sensor_id, episode, now, tick))
        return events

    def _step_hysteresis(self, record: SensorEpisodes, decision: Decision, tick: float) -> bool:
        """Advance `active` by one decision; True when it changed."""
        policy = self.policy
        if record.active:
            record.normal_run = 0 if decision.anomalous else record.normal_run + 1
            if record.normal_run < policy.resolve_normal:
                return False
            record.active = False
            record.recent.clear()  # the next episode counts only decisions after this one ended
            return True
        if not decision.anomalous or tick < record.cooldown_until:
            return False
        if sum(item.anomalous for item in record.recent) < policy.open_anomalous:
            return False
        record.active, record.normal_run = True, 0
        return True

    def _open(self, record: SensorEpisodes, now: float, tick: float, state: EpisodeState) -> Episode:
        """A new episode from the first anomalous decision of the run that opened it."""
        run = list(record.recent)
        first = next(index for index, item in enumerate(run) if item.anomalous)
        start = run[first]
        episode = Episode(
            self.new_id(),
            state,
            start.start_seq,
            start.end_seq,
            start.start_ts,
            start.start_ts,
            0,
            0,
            start.score,
            start.start_seq,
            now,
            tick,
            0,
            start.channels,
        )
        for item in run[first:]:
            episode.add(item)
        episode.reported_windows = episode.anomalous_windows
        return episode

    def _event(
        self, kind: str, sensor_id: str, episode: Episode, now: float, tick: float, reason: str | None = None
    ) -> EpisodeEvent:
        episode.last_event_at = tick
        episode.reported_windows = episode.anomalous_windows
        return EpisodeEvent(kind, sensor_id, now, episode.public(), reason)

    def _resolve(self, sensor_id: str, record: SensorEpisodes, now: float, tick: float, reason: str) -> EpisodeEvent:
        assert record.episode is not None
        event = self._event("resolved", sensor_id, record.episode, now, tick, reason)
        event.episode["state"] = "resolved"
        record.episode = None
        record.cooldown_until = tick + self.policy.cooldown_seconds
        return event

    def _close_all(
        self, records: list[tuple[str, SensorEpisodes]], now: float, tick: float, reason: str
    ) -> list[EpisodeEvent]:
        return [
            self._resolve(sensor_id, record, now, tick, reason)
            for sensor_id, record in records
            if record.episode is not None
        ]

    def expire(self, now: float, idle_seconds: float) -> tuple[list[EpisodeEvent], list[str]]:
        """Forget sensors without a decision for `idle_seconds`, resolving their episodes (reason `sensor_idle`).

        Returns the events and the ids of the forgotten sensors.
        """
        tick = self._tick(now)
        expired = self.sensors.expire(tick, idle_seconds)
        return self._close_all(expired, now, tick, "sensor_idle"), [sensor_id for sensor_id, _ in expired]

    def end_stream(self, sensor_id: str, now: float) -> list[EpisodeEvent]:
        """Forget a sensor whose source ended its stream (a Sparkplug DEATH), resolving its episode (`stream_ended`)."""
        record = self.sensors.pop(sensor_id)
        return [] if record is None else self._close_all([(sensor_id, record)], now, self._tick(now), "stream_ended")

    def open_episodes(self) -> list[str]:
        """The sensors with an open or flapping episode (whose state a drain should publish)."""
        return [sensor_id for sensor_id, record in self.sensors.items() if record.episode is not None]

    def status(self, sensor_id: str, now: float) -> str:
        """`open`, `flapping`, `cooldown` or `idle`."""
        record = self.sensors.get(sensor_id)
        if record is None:
            return "idle"
        if record.episode is not None:
            return record.episode.state
        return "cooldown" if self._tick(now) < record.cooldown_until else "idle"

    def state_payload(self, sensor_id: str, now: float) -> dict[str, Any]:
        """The sensor's state as JSON data: the retained state message, and what `restore` takes back."""
        record = self.sensors.get(sensor_id) or self._new_record()
        to_wall = now - self._tick(now)  # tick-clock times + this = wall-clock times, as of now
        episode = None if record.episode is None else asdict(record.episode)
        if episode is not None:
            episode["last_event_at"] += to_wall
        cooldown_until = record.cooldown_until + to_wall
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "sensor_id": sensor_id,
            "status": self.status(sensor_id, now),
            "at": now,
            "episode": episode,
            "cooldown_until": cooldown_until if cooldown_until > now else None,
            "tracker": {
                "active": record.active,
                "normal_run": record.normal_run,
                "decisions": record.decisions,
                "transitions": list(record.transitions),
                "recent": [asdict(item) for item in record.recent],
            },
        }

    def restore(self, payload: Any, now: float) -> str:
        """Take back a sensor's state from `state_payload`; returns the sensor id, or raises ValueError."""
        if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
            raise ValueError("not an episode state")
        if payload.get("version") != STATE_VERSION:
            raise ValueError(f"episode state version {payload.get('version')!r} is not {STATE_VERSION}")
        sensor_id = payload.get("sensor_id")
        tracker = payload.get("tracker")
        if not isinstance(sensor_id, str) or not isinstance(tracker, dict):
            raise ValueError("episode state lacks sensor_id or tracker")
        try:
            record = _RECORD.validate_python(
                {**tracker, "episode": payload.get("episode"), "cooldown_until": payload.get("cooldown_until") or 0.0}
            )
        except ValidationError as error:
            raise ValueError(f"invalid episode state: {error.errors()[0]['loc']} {error.errors()[0]['msg']}") from None
        record.recent = deque(record.recent, maxlen=self.policy.open_window)
        tick = self._tick(now)
        if record.cooldown_until:
            record.cooldown_until += tick - now  # wall-clock times in the payload, tick-clock times here
        if record.episode is not None:
            record.episode.last_event_at += tick - now
        self.sensors.put(sensor_id, record, tick)
        return sensor_id
