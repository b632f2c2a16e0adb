"""Episode lifecycle on scripted decision sequences: every transition, pacing, cooldown, flapping, resume."""

from __future__ import annotations

import itertools

import orjson
import pytest

from monitor.alerts.episodes import Decision, EpisodeTracker
from monitor.config.schema import EpisodePolicy

WINDOW = 140


class Script:
    """Feeds a sensor's decisions written as a string: `A` anomalous, `N` normal, one per `step_seconds`."""

    def __init__(
        self, tracker: EpisodeTracker, sensor_id: str = "s1", now: float = 1000.0, step_seconds: float = 1.0
    ) -> None:
        self.tracker = tracker
        self.sensor_id = sensor_id
        self.now = now
        self.step_seconds = step_seconds
        self.index = 0

    def feed(self, script: str, scores: list[float] | None = None) -> list[dict]:
        """Returns the payloads of the events, each with `index`: the decision that caused it."""
        events = []
        for position, mark in enumerate(script.replace(" ", "")):
            score = scores[position] if scores else (0.5 + self.index / 1000 if mark == "A" else 0.1)
            decision = Decision(self.index * WINDOW, (self.index + 1) * WINDOW, 100.0 + self.index, score, mark == "A")
            for event in self.tracker.decide(self.sensor_id, decision, self.now):
                events.append({**event.payload(), "index": self.index})
            self.index += 1
            self.now += self.step_seconds
        return events


def counter_ids():
    numbers = itertools.count(1)
    return lambda: f"ep-{next(numbers)}"


def tracker(**policy) -> EpisodeTracker:
    return EpisodeTracker(EpisodePolicy(**{"update_interval_seconds": 1e9, **policy}), new_id=counter_ids())


def kinds(events: list[dict]) -> list[tuple[str, int]]:
    return [(event["event"], event["index"]) for event in events]


def test_opens_when_k_of_the_last_n_decisions_are_anomalous():
    script = Script(tracker(open_anomalous=3, open_window=5))
    assert script.feed("ANNNA NNANN NNN") == []  # never 3 anomalous among 5
    events = script.feed("ANAA")  # decisions 13..16: 3 of the last 5 at decision 16
    assert kinds(events) == [("opened", 16)]
    opened = events[0]
    assert opened["state"] == "open" and opened["episode_id"] == "ep-1"
    # the episode starts at the first anomalous decision of the run that opened it (13)
    assert opened["start_seq"] == 13 * WINDOW and opened["start_ts"] == 113.0
    assert opened["end_seq"] == 17 * WINDOW and opened["end_ts"] == 116.0
    assert opened["anomalous_windows"] == 3 and opened["windows"] == 4
    assert opened["peak_score"] == pytest.approx(0.516) and opened["peak_seq"] == 16 * WINDOW


def test_a_normal_decision_never_opens_an_episode():
    script = Script(tracker(open_anomalous=2, open_window=3))
    assert kinds(script.feed("ANAN")) == [("opened", 2)]


def test_resolves_after_m_consecutive_normal_decisions_only():
    script = Script(tracker(open_anomalous=2, open_window=2, resolve_normal=3))
    events = script.feed("AA NN A NN A NNN N")
    assert kinds(events) == [("opened", 1), ("resolved", 10)]
    resolved = events[1]
    assert resolved["state"] == "resolved" and resolved["reason"] == "normal"
    assert resolved["episode_id"] == events[0]["episode_id"]
    assert resolved["start_seq"] == 0 and resolved["end_seq"] == 8 * WINDOW  # the last anomalous window, decision 7
    assert resolved["anomalous_windows"] == 4 and resolved["windows"] == 11
    assert resolved["peak_seq"] == 7 * WINDOW and resolved["at"] == 1010.0
    assert script.tracker.status("s1", script.now) == "idle"


def test_decisions_of_a_resolved_episode_do_not_count_for_the_next():
    script = Script(tracker(open_anomalous=3, open_window=5, resolve_normal=1))
    events = script.feed("AAA N A A A")
    # without forgetting, the run A A A N A would reopen at decision 4
    assert kinds(events) == [("opened", 2), ("resolved", 3), ("opened", 6)]
    assert events[2]["episode_id"] != events[0]["episode_id"] and events[2]["start_seq"] == 4 * WINDOW


def test_updates_are_paced_and_carry_count_and_worst_score_so_far():
    script = Script(tracker(open_anomalous=1, open_window=1, resolve_normal=50, update_interval_seconds=10.0))
    scores = [0.5, 0.9, 0.6] + [0.4] * 18
    events = script.feed("A" * 21, scores)
    assert kinds(events) == [("opened", 0), ("updated", 10), ("updated", 20)]
    assert [event["anomalous_windows"] for event in events] == [1, 11, 21]
    assert all(event["peak_score"] == 0.9 and event["peak_seq"] == WINDOW for event in events[1:])
    # nothing new since the last update: no update, however long it has been
    assert script.feed("N" * 20) == []
    assert kinds(script.feed("A")) == [("updated", 41)]


def test_cooldown_holds_back_a_new_episode_then_lets_it_open():
    script = Script(tracker(open_anomalous=2, open_window=2, resolve_normal=2, cooldown_seconds=10.0))
    events = script.feed("AA NN")
    assert kinds(events) == [("opened", 1), ("resolved", 3)]
    assert script.tracker.status("s1", script.now) == "cooldown"
    assert script.tracker.state_payload("s1", script.now)["cooldown_until"] == 1013.0
    assert script.feed("AAAAAAAA") == []  # decisions 4..11 at t = 1004..1011: still cooling down
    events = script.feed("AA")  # t = 1012 (within), 1013 (over): k of n still holds, so it opens now
    assert kinds(events) == [("opened", 13)]
    assert events[0]["episode_id"] == "ep-2"
    assert events[0]["anomalous_windows"] == 2  # the window of the last n decisions, not the whole cooldown


@pytest.mark.parametrize("cooldown", [0.0, 5.0])
def test_a_step_of_the_wall_clock_changes_no_decision(cooldown):
    """An NTP step of the wall clock one hour back, right after an episode resolved: with durations on the monotonic
    tick, the next anomalous run opens an episode exactly as without the step (the wall clock still dates it)."""
    decisions: dict[bool, list[tuple[str, int]]] = {}
    for stepped in (False, True):
        ticks = itertools.count(0.0, 1.0)  # the monotonic clock: one second a decision, whatever the wall clock does
        tracker = EpisodeTracker(
            EpisodePolicy(open_anomalous=2, open_window=2, resolve_normal=2, cooldown_seconds=cooldown),
            new_id=counter_ids(),
            tick=lambda ticks=ticks: next(ticks),
        )
        script = Script(tracker)
        events = script.feed("AA NN")
        if stepped:
            script.now -= 3600.0
        events += script.feed("N" * 10 + "AAAA")
        decisions[stepped] = kinds(events)
        assert events[-1]["opened_at"] == script.now - 3  # decision 15 of 0..17: people read the wall clock
    assert decisions[True] == decisions[False] == [("opened", 1), ("resolved", 3), ("opened", 15)]


def test_flapping_replaces_open_resolve_churn_with_one_state():
    script = Script(
        tracker(open_anomalous=1, open_window=1, resolve_normal=1, flapping_transitions=4, flapping_window=20)
    )
    events = script.feed("AN AN")
    assert kinds(events) == [("opened", 0), ("resolved", 1), ("opened", 2), ("flapping", 3)]
    flapping_id = events[3]["episode_id"]
    assert events[3]["state"] == "flapping" and events[2]["episode_id"] == flapping_id
    assert script.feed("AN" * 30) == []  # no stream of opened/resolved while it flaps
    assert script.tracker.status("s1", script.now) == "flapping"
    events = script.feed("N" * 20)  # 20 decisions without a change of state end it
    assert kinds(events) == [("resolved", 83)]
    assert events[0]["reason"] == "flapping_ended" and events[0]["episode_id"] == flapping_id
    assert events[0]["anomalous_windows"] == 31 and events[0]["windows"] == 82


def test_flapping_that_settles_into_a_steady_run_becomes_open_again():
    script = Script(
        tracker(open_anomalous=1, open_window=1, resolve_normal=1, flapping_transitions=3, flapping_window=10)
    )
    assert kinds(script.feed("ANA")) == [("opened", 0), ("resolved", 1), ("flapping", 2)]
    events = script.feed("A" * 10)  # 10 decisions (3..12) without a change of state
    assert kinds(events) == [("updated", 12)]
    assert events[0]["state"] == "open"
    assert kinds(script.feed("N")) == [("resolved", 13)]


def test_flapping_detection_can_be_off():
    script = Script(tracker(open_anomalous=1, open_window=1, resolve_normal=1, flapping_transitions=0))
    assert [kind for kind, _ in kinds(script.feed("AN" * 10))] == ["opened", "resolved"] * 10


def test_sensors_are_independent():
    shared = tracker(open_anomalous=2, open_window=2, resolve_normal=1)
    first, second = Script(shared, "a"), Script(shared, "b")
    assert kinds(first.feed("A")) == [] and kinds(second.feed("A")) == []
    assert kinds(first.feed("A")) == [("opened", 1)]
    assert kinds(second.feed("N")) == []


def resume_after(script_text: str, cut: int) -> tuple[list[dict], list[dict]]:
    """Events of one uninterrupted run, and of a run that restarts from the retained state after `cut` decisions."""
    policy = {
        "open_anomalous": 2,
        "open_window": 4,
        "resolve_normal": 3,
        "update_interval_seconds": 5.0,
        "flapping_transitions": 6,
        "flapping_window": 30,
        "cooldown_seconds": 4.0,
    }
    whole = Script(tracker(**policy)).feed(script_text)
    first = Script(tracker(**policy))
    events = first.feed(script_text[:cut])
    retained = orjson.dumps(first.tracker.state_payload("s1", first.now))  # what the broker keeps
    restarted = tracker(**policy)
    restarted.new_id = lambda: "a-second-id"  # the restarted instance would mint other ids
    assert restarted.restore(orjson.loads(retained), first.now) == "s1"
    second = Script(restarted, now=first.now)
    second.index = first.index
    events += second.feed(script_text[cut:])
    return whole, events


@pytest.mark.parametrize("cut", [3, 10, 18, 22])
def test_a_restarted_tracker_resumes_from_the_retained_state(cut):
    """Cut inside an open episode, between pacing updates, inside the resolving run, and in the cooldown."""
    text = "NAANAAAAAAAANNAAANNNNAAAANNN"
    whole, resumed = resume_after(text, cut)
    assert kinds(whole) == [
        ("opened", 2),
        ("updated", 7),
        ("updated", 12),
        ("updated", 17),
        ("resolved", 19),
        ("opened", 23),
        ("resolved", 27),
    ]
    # the episode under way at the restart keeps its id and counts; one opened after it has the new instance's id
    assert {event["episode_id"] for event in resumed if event["index"] <= 19} == {"ep-1"}
    assert [
        {**event, "episode_id": "ep-2"} if event["episode_id"] == "a-second-id" else event for event in resumed
    ] == whole


def test_restore_refuses_what_is_not_a_state():
    restored = tracker()
    good = Script(tracker(open_anomalous=1, open_window=1))
    good.feed("A")
    payload = good.tracker.state_payload("s1", good.now)
    for bad in [
        None,
        [],
        {"format": "other"},
        {**payload, "version": 99},
        {**payload, "sensor_id": 7},
        {**payload, "tracker": {**payload["tracker"], "normal_run": "x"}},
        {**payload, "episode": {**payload["episode"], "state": "weird"}},
    ]:
        with pytest.raises(ValueError):
            restored.restore(bad, 0.0)
    assert len(restored.sensors) == 0


def test_a_silent_sensor_resolves_its_episode_and_is_forgotten():
    script = Script(tracker(open_anomalous=1, open_window=1))
    script.feed("A")  # at t = 1000
    events, forgotten = script.tracker.expire(1299.0, idle_seconds=300)
    assert events == [] and forgotten == []
    events, forgotten = script.tracker.expire(1300.0, idle_seconds=300)
    assert forgotten == ["s1"] and [(event.kind, event.reason) for event in events] == [("resolved", "sensor_idle")]
    assert len(script.tracker.sensors) == 0


def test_the_sensor_bound_resolves_the_least_recent_sensors_episode():
    bounded = EpisodeTracker(EpisodePolicy(open_anomalous=1, open_window=1), max_sensors=2, new_id=counter_ids())
    Script(bounded, "a").feed("A")
    Script(bounded, "b").feed("A")
    events = Script(bounded, "c").feed("A")
    assert [(event["sensor_id"], event["event"], event.get("reason")) for event in events] == [
        ("a", "resolved", "sensor_limit"),
        ("c", "opened", None),
    ]
    assert bounded.open_episodes() == ["b", "c"]


@pytest.mark.parametrize(
    "bad",
    [
        {"open_anomalous": 0},
        {"open_anomalous": 6, "open_window": 5},
        {"resolve_normal": 0},
        {"cooldown_seconds": -1},
        {"flapping_transitions": 1},
        {"flapping_transitions": 11, "flapping_window": 10},
    ],
)
def test_policy_refuses_impossible_settings(bad):
    with pytest.raises(ValueError):
        EpisodePolicy(**bad)
