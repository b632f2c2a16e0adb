"""Sensor baselines that follow slow drift: they follow a ramp, not a jump, at a bounded rate, anchored on the
warm-up; training, `monitor evaluate` and the daemon's per-sensor state give the same numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from monitor.model.baseline import (
    CLIP,
    FOLLOW_STEP,
    JUDGED_NORMAL_CLIPPED,
    FollowingBaseline,
    SensorBaseline,
    SensorBaselines,
    follow_rate,
    normalise_recording,
)

RATE = 0.02


def noisy(rng: np.random.Generator, windows: int, level: np.ndarray) -> np.ndarray:
    """`[windows, 10, 2]` windows: unit noise around `level[i]` for window i."""
    return (rng.normal(0.0, 1.0, (windows, 10, 2)) + level[:, None, None]).astype(np.float32)


def test_follows_a_slow_ramp_that_a_fixed_baseline_clips():
    rng = np.random.default_rng(0)
    level = np.r_[np.zeros(50), np.linspace(0.0, 40.0, 1000)]  # 40 noise std over 1000 windows
    windows = noisy(rng, len(level), level)
    fixed, fixed_clipped = normalise_recording(windows, 50, 0.0)
    followed, followed_clipped = normalise_recording(windows, 50, RATE)
    np.testing.assert_array_equal(fixed[:50], followed[:50])  # the warm-up: the anchor alone
    assert fixed_clipped[-100:].mean() == 1.0  # the fixed baseline lost the channel for good
    assert followed_clipped[-100:].mean() == 0.0
    assert np.abs(followed[-100:]).mean() < 3.0


def test_a_jump_is_not_learnt():
    """A fault far off the baseline is not judged normal: it does not move the baseline, so it keeps showing."""
    rng = np.random.default_rng(1)
    level = np.r_[np.zeros(50), np.full(300, 100.0)]
    _, clipped = normalise_recording(noisy(rng, len(level), level), 50, RATE)
    assert clipped[50:].mean(axis=1).min() > JUDGED_NORMAL_CLIPPED
    assert clipped[-1].mean() == 1.0


def test_bounded_step_and_anchored_scale():
    rng = np.random.default_rng(2)
    warm = noisy(rng, 20, np.zeros(20))
    anchor = SensorBaseline.fit(warm)
    follower = FollowingBaseline(anchor, RATE)
    odd = np.full((10, 2), 5.0, np.float32) * anchor.scale + anchor.centre  # 5 scales off: not clipped, capped
    follower.admit(odd)
    moved = (follower.centre - anchor.centre) / anchor.scale
    np.testing.assert_allclose(moved, RATE * FOLLOW_STEP, rtol=1e-6)  # at most rate x step scales per window
    for _ in range(500):  # a flat signal: the scale would shrink to nothing, the anchor's holds it
        follower.admit(np.tile(anchor.centre, (10, 1)))
    np.testing.assert_array_equal(follower.scale, anchor.scale.astype(np.float64))


def test_daemon_state_matches_the_offline_pass_across_a_restart():
    """The daemon's `SensorBaselines`, window by window and through a JSON snapshot half way, gives the numbers
    `normalise_recording` (training and `monitor evaluate`) gives for the same windows."""
    rng = np.random.default_rng(3)
    level = np.r_[np.zeros(20), np.linspace(0.0, 15.0, 200)]
    windows = noisy(rng, len(level), level)
    offline, offline_clipped = normalise_recording(windows, 20, RATE)
    state = SensorBaselines(20, 10, 2, RATE)
    admitted = [state.admit("s", window) for window in windows[:120]]
    restored = SensorBaselines(20, 10, 2, RATE)
    assert restored.restore(json.loads(json.dumps(state.snapshot())), ["s"]) == 1
    admitted += [restored.admit("s", window) for window in windows[120:]]
    assert admitted[:20] == [None] * 20
    for index in range(20, len(windows)):
        normalised, clipped = admitted[index]
        np.testing.assert_array_equal(normalised, offline[index])
        np.testing.assert_array_equal(clipped, offline_clipped[index])


def test_sensors_off_baseline_counted_and_forgotten():
    state = SensorBaselines(1, 10, 2, RATE)
    state.admit("s", np.zeros((10, 2), np.float32))  # warm-up: fits on a constant window (tiny scales)
    normalised, clipped = state.admit("s", np.full((10, 2), 50.0, np.float32))
    assert (np.abs(normalised) == CLIP).all() and clipped.tolist() == [1.0, 1.0]
    assert state.sensors_off_baseline == 1
    state.forget("s")
    assert state.sensors_off_baseline == 0


@pytest.mark.parametrize(
    ("metadata", "rate"),
    [
        ({"baseline": {"type": "sensor", "windows": 5, "follow_rate": 0.02}}, 0.02),
        ({"baseline": {"type": "sensor", "windows": 5}}, 0.0),  # trained before following: fixed
        ({"baseline": {"type": "model"}}, 0.0),
        ({"baseline": {"type": "sensor", "follow_rate": True}}, 0.0),
    ],
)
def test_follow_rate_from_the_artifact(metadata, rate):
    assert follow_rate(metadata) == rate
