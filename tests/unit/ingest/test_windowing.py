"""WindowAssembler: absolute alignment, stride, gaps, duplicates, timestamps, eviction and bounded buffers."""

from __future__ import annotations

import timeit

import numpy as np
import pytest

from monitor.errors import PayloadError
from monitor.ingest.payload import REJECT_REASONS, Message
from monitor.ingest.windowing import SENSOR_LIMIT_REASON, FeedResult, WindowAssembler
from monitor.window import Window


def signal(samples: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(samples, channels)).astype(np.float32)


def message(samples: np.ndarray, seq: int | None = None, ts: float | None = None) -> Message:
    return Message(samples=samples, seq=seq, ts=ts)


def assembler(
    window: int, stride: int, channels: int = 1, max_sensors: int = 100, idle_seconds: float = 60.0
) -> WindowAssembler:
    return WindowAssembler(
        window=window, stride=stride, channels=channels, max_sensors=max_sensors, idle_seconds=idle_seconds
    )


def feed_chunks(
    target: WindowAssembler, stream: np.ndarray, chunk: int, first_seq: int | None = 0, sensor_id: str = "s"
) -> list[Window]:
    """Feeds stream in chunks (with seq from first_seq, or without seq when first_seq is None)."""
    windows: list[Window] = []
    for offset in range(0, len(stream), chunk):
        seq = None if first_seq is None else first_seq + offset
        windows += target.feed(sensor_id, message(stream[offset : offset + chunk], seq), now=float(offset)).windows
    return windows


def expected(stream: np.ndarray, first_seq: int, window: int, stride: int) -> list[tuple[int, np.ndarray]]:
    """The windows k*S >= first_seq that lie wholly inside stream (which starts at absolute index first_seq)."""
    k = -(-first_seq // stride)
    out = []
    while k * stride + window <= first_seq + len(stream):
        start = k * stride - first_seq
        out.append((k * stride, stream[start : start + window]))
        k += 1
    return out


def assert_windows(windows: list[Window], want: list[tuple[int, np.ndarray]]) -> None:
    assert [w.start_seq for w in windows] == [start for start, _ in want]
    for got, (_, samples) in zip(windows, want, strict=True):
        np.testing.assert_array_equal(got.samples, samples)


@pytest.mark.parametrize(
    ("window", "stride", "channels"),
    [(140, 140, 1), (140, 35, 1), (140, 50, 2), (140, 1, 1), (140, 200, 3), (10, 37, 1), (1, 1, 1)],
)
@pytest.mark.parametrize("with_seq", [True, False])
def test_chunks_of_35_reproduce_sliding_window_view(window: int, stride: int, channels: int, with_seq: bool) -> None:
    stream = signal(1000, channels)
    windows = feed_chunks(assembler(window, stride, channels), stream, 35, first_seq=0 if with_seq else None)
    reference = np.lib.stride_tricks.sliding_window_view(stream, window, axis=0)[::stride].transpose(0, 2, 1)
    assert len(windows) == len(reference) > 0
    for k, (got, want) in enumerate(zip(windows, reference, strict=True)):
        assert got.start_seq == k * stride
        assert got.samples.shape == (window, channels) and got.samples.dtype == np.float32
        np.testing.assert_array_equal(got.samples, want)


@pytest.mark.parametrize("stride", [1, 70, 140, 500])
def test_one_4096_sample_message_spans_many_windows(stride: int) -> None:
    stream = signal(4096)
    result = assembler(140, stride).feed("s", message(stream, seq=0), now=7.5)
    assert_windows(result.windows, expected(stream, 0, 140, stride))
    assert len(result.windows) == (4096 - 140) // stride + 1
    assert {w.completed_at for w in result.windows} == {7.5}
    assert {w.sensor_id for w in result.windows} == {"s"}


def test_big_message_after_a_partial_window() -> None:
    stream = signal(5000)
    target = assembler(140, 60)
    windows = target.feed("s", message(stream[:100], seq=0), now=0.0).windows
    windows += target.feed("s", message(stream[100:4196], seq=100), now=1.0).windows
    windows += target.feed("s", message(stream[4196:], seq=4196), now=2.0).windows
    assert_windows(windows, expected(stream, 0, 140, 60))


def test_one_sample_messages() -> None:
    stream = signal(100, 2)
    assert_windows(feed_chunks(assembler(7, 3, channels=2), stream, 1), expected(stream, 0, 7, 3))


@pytest.mark.parametrize(
    ("first_seq", "stride", "first_start"),
    [
        (100, 50, 100),
        (101, 50, 150),
        (101, 1, 101),
        (1, 140, 140),
        (0, 140, 0),
        (2**53 - 1000, 140, 2**53 - 1000 + 128),
    ],
)
def test_first_window_is_the_first_aligned_start_at_or_after_the_first_seq(
    first_seq: int, stride: int, first_start: int
) -> None:
    stream = signal(400)
    windows = feed_chunks(assembler(140, stride), stream, 35, first_seq=first_seq)
    assert windows[0].start_seq == first_start
    assert all(w.start_seq % stride == 0 for w in windows)
    assert_windows(windows, expected(stream, first_seq, 140, stride))


def test_messages_without_seq_continue_the_stream() -> None:
    stream = signal(60)
    target = assembler(10, 10)
    windows = target.feed("s", message(stream[:25], seq=5), now=0.0).windows
    windows += target.feed("s", message(stream[25:40]), now=1.0).windows  # continues at 30
    windows += target.feed("s", message(stream[40:60], seq=45), now=2.0).windows  # seq agrees: no gap
    assert_windows(windows, expected(stream, 5, 10, 10))


def test_new_sensor_without_seq_starts_at_zero() -> None:
    windows = assembler(4, 4).feed("s", message(signal(9)), now=0.0).windows
    assert [w.start_seq for w in windows] == [0, 4]


def test_sensors_are_independent() -> None:
    a, b = signal(300, seed=1), signal(300, seed=2)
    target = assembler(50, 25)
    windows: dict[str, list[Window]] = {"a": [], "b": []}
    for offset in range(0, 300, 30):
        windows["a"] += target.feed("a", message(a[offset : offset + 30], offset), now=0.0).windows
        windows["b"] += target.feed("b", message(b[offset : offset + 30], 1000 + offset), now=0.0).windows
    assert_windows(windows["a"], expected(a, 0, 50, 25))
    assert_windows(windows["b"], expected(b, 1000, 50, 25))


def test_gap_drops_every_window_overlapping_the_missing_samples() -> None:
    stream = signal(60)
    target = assembler(10, 5)
    first = target.feed("s", message(stream[:12], seq=0), now=0.0)
    assert [w.start_seq for w in first.windows] == [0]
    # Missing [12, 30): windows 5, 10, 15, 20, 25 overlap it; 5 and 10 held samples before it, 25 holds samples after
    # it; 15 and 20 lie wholly inside it, held nothing that arrived and are not counted.
    result = target.feed("s", message(stream[30:60], seq=30), now=1.0)
    assert (result.gaps, result.gap_windows_dropped, result.duplicate, result.duplicate_samples) == (1, 3, False, 0)
    assert_windows(result.windows, expected(stream[30:60], 30, 10, 5))
    assert result.windows[0].start_seq == 30


def test_gap_counts_only_windows_that_held_samples_which_arrived() -> None:
    target = assembler(10, 10)
    target.feed("s", message(signal(10), seq=0), now=0.0)
    # Window 10 lies wholly in the gap [10, 25): nothing of it arrived. Window 20 holds 25..29: broken, counted.
    result = target.feed("s", message(signal(10), seq=25), now=1.0)
    assert (result.gaps, result.gap_windows_dropped, result.windows) == (1, 1, [])
    assert [w.start_seq for w in target.feed("s", message(signal(5), seq=35), now=2.0).windows] == [30]


def test_gap_between_windows_with_stride_beyond_window_drops_nothing() -> None:
    stream = signal(200)
    target = assembler(10, 100)
    assert [w.start_seq for w in target.feed("s", message(stream[:15], seq=0), now=0.0).windows] == [0]
    result = target.feed("s", message(stream[50:120], seq=50), now=1.0)  # missing [15, 50): no window there
    assert (result.gaps, result.gap_windows_dropped) == (1, 0)
    assert_windows(result.windows, [(100, stream[100:110])])


def test_gap_with_stride_beyond_window_does_not_count_windows_inside_it() -> None:
    target = assembler(10, 100)
    target.feed("s", message(signal(15), seq=0), now=0.0)
    result = target.feed("s", message(signal(10), seq=250), now=1.0)  # windows 100 and 200 lie wholly in [15, 250)
    assert (result.gaps, result.gap_windows_dropped) == (1, 0)
    assert [w.start_seq for w in target.feed("s", message(signal(70), seq=260), now=2.0).windows] == [300]


def test_gap_does_not_count_windows_before_the_stream_started() -> None:
    target = assembler(10, 10)
    target.feed("s", message(signal(5), seq=3), now=0.0)  # stream starts at 3: window 0 was never a candidate
    result = target.feed("s", message(signal(20), seq=15), now=1.0)  # breaks window 10 only
    assert (result.gaps, result.gap_windows_dropped) == (1, 1)
    assert [w.start_seq for w in result.windows] == [20]


def test_gap_within_the_tolerance_counts_only_the_broken_windows() -> None:
    target = WindowAssembler(140, 140, 1, 10, 60.0, seq_tolerance=10_000)
    target.feed("s", message(signal(100), seq=0), now=0.0)
    result = target.feed("s", message(signal(1), seq=9_000), now=1.0)
    # Window 0 held 100 samples; 8960 holds the one that arrived; the 63 windows between held nothing.
    assert (result.gaps, result.restarted, result.gap_windows_dropped) == (1, False, 2)


# Far ahead, and just beyond the tolerance (behind: the reboot test); the sensor near 0 or far from it.
@pytest.mark.parametrize("poison_offset", [140 * 10**13, 1155])
@pytest.mark.parametrize("position", [385, 2065])
def test_one_message_far_from_the_position_costs_the_sensor_nothing(poison_offset: int, position: int) -> None:
    stream = signal(position + 315)
    target = assembler(140, 140)  # seq_tolerance 1024
    windows = feed_chunks(target, stream[:position], 35)  # the last window is partial: 105 samples
    poison_seq = -(-(position + poison_offset) // 140) * 140  # at a window start: the poison opens a partial window
    poison = target.feed("s", message(signal(1), seq=poison_seq), now=1.0)
    assert (poison.restarted, poison.gaps, poison.restart_windows_dropped, poison.windows) == (True, 0, 0, [])
    resumed = target.feed("s", message(stream[position : position + 35], seq=position), now=2.0)  # the sensor goes on
    assert (resumed.restarted, resumed.duplicate, resumed.restart_windows_dropped) == (False, False, 1)  # the poison's
    for offset in range(position + 35, position + 315, 35):
        windows += target.feed("s", message(stream[offset : offset + 35], seq=offset), now=3.0).windows
    assert_windows(sorted(windows + resumed.windows, key=lambda w: w.start_seq), expected(stream, 0, 140, 140))
    assert target.buffered_samples() == 0


def test_sensor_rebooting_to_seq_zero_is_scored_again_at_once() -> None:
    stream = signal(2000)
    target = assembler(140, 140, idle_seconds=1e9)
    before = feed_chunks(target, stream[:1470], 35)  # the last window (1400) is partial: 70 samples
    rebooted = target.feed("s", message(stream[1470:1505], seq=0), now=1.0)
    assert rebooted.restarted and target.buffered_samples() == 70 + 35  # the old stream is kept aside for now
    confirmed = target.feed("s", message(stream[1505:1540], seq=35), now=2.0)
    assert (confirmed.restarted, confirmed.restart_windows_dropped) == (False, 1)  # the old partial window 1400
    after = rebooted.windows + confirmed.windows + feed_chunks(target, stream[1540:1890], 35, first_seq=70)
    assert [w.start_seq for w in before] == list(range(0, 1400, 140))
    assert_windows(after, expected(stream[1470:1890], 0, 140, 140))


def test_two_jumps_in_a_row_replace_the_unconfirmed_stream_and_keep_the_established_one() -> None:
    stream = signal(420)
    target = assembler(140, 140)
    windows = feed_chunks(target, stream[:175], 35)
    assert target.feed("s", message(signal(10), seq=140 * 10**9), now=1.0).restarted
    second = target.feed("s", message(signal(10), seq=140 * 10**12), now=1.0)
    assert (second.restarted, second.restart_windows_dropped) == (True, 1)  # the first jump's stream
    for offset in range(175, 420, 35):
        windows += target.feed("s", message(stream[offset : offset + 35], seq=offset), now=2.0).windows
    assert_windows(windows, expected(stream, 0, 140, 140))


def test_duplicates_within_the_tolerance_or_far_behind_stay_duplicates() -> None:
    target = assembler(10, 10)
    target.feed("s", message(signal(5000), seq=0), now=0.0)
    result = target.feed("s", message(signal(35), seq=5000 - 1024), now=1.0)
    assert (result.duplicate, result.restarted) == (True, False)
    resent = target.feed("s", message(signal(35), seq=2000), now=1.0)  # a sensor's client re-sending after an outage
    assert (resent.duplicate, resent.restarted) == (True, False)
    assert target.feed("s", message(signal(35), seq=1024), now=1.0).restarted  # back near the start: a reboot


def test_whole_duplicate_is_ignored() -> None:
    stream = signal(40)
    target = assembler(10, 10)
    target.feed("s", message(stream[:25], seq=0), now=0.0)
    for seq, n in [(0, 25), (10, 15), (20, 5), (0, 1)]:
        result = target.feed("s", message(signal(n, seed=9), seq=seq), now=1.0)
        assert (result.duplicate, result.duplicate_samples, result.gaps, result.windows) == (True, n, 0, [])
    windows = target.feed("s", message(stream[25:40], seq=25), now=2.0).windows
    assert_windows(windows, expected(stream, 0, 10, 10)[2:])  # the duplicates' values never entered the buffer


def test_seq_older_than_the_stream_start_is_a_duplicate() -> None:
    target = assembler(10, 10)
    target.feed("s", message(signal(5), seq=1000), now=0.0)
    result = target.feed("s", message(signal(35), seq=100), now=1.0)  # within the tolerance
    assert (result.duplicate, result.duplicate_samples) == (True, 35)


def test_partial_overlap_trims_the_old_prefix() -> None:
    stream = signal(100)
    target = assembler(20, 10)
    windows = target.feed("s", message(stream[:35], seq=0), now=0.0).windows
    resend = stream[25:70].copy()
    resend[:10] = 99.0  # values of already-seen indices must be ignored
    result = target.feed("s", message(resend, seq=25), now=1.0)
    assert (result.duplicate, result.duplicate_samples, result.gaps) == (False, 10, 0)
    windows += result.windows + target.feed("s", message(stream[70:100]), now=2.0).windows
    assert_windows(windows, expected(stream, 0, 20, 10))


def test_windows_own_their_samples() -> None:
    stream = signal(100)
    source = stream.copy()
    windows = assembler(20, 10).feed("s", message(source, seq=0), now=0.0).windows
    assert len(windows) == 9
    for i, window in enumerate(windows):
        assert not np.shares_memory(window.samples, source)
        assert all(not np.shares_memory(window.samples, other.samples) for other in windows[i + 1 :])
    source[:] = 0.0
    assert_windows(windows, expected(stream, 0, 20, 10))


def test_window_bytes_survive_later_feeds() -> None:
    stream = signal(300)
    target = assembler(20, 7)
    windows = feed_chunks(target, stream, 9)  # windows come from the recycled per-sensor buffer
    assert_windows(windows, expected(stream, 0, 20, 7))


def test_start_ts_of_a_replay_of_consecutive_chunks() -> None:
    rate_hz, t0 = 250.0, 1_700_000_000.0
    stream = signal(700)
    target = assembler(140, 50)
    windows: list[Window] = []
    for seq in range(0, 700, 35):
        windows += target.feed("s", message(stream[seq : seq + 35], seq=seq, ts=t0 + seq / rate_hz), now=0.0).windows
    assert [w.start_seq for w in windows] == list(range(0, 561, 50))
    for w in windows:
        assert w.start_ts == pytest.approx(t0 + w.start_seq / rate_hz, rel=0, abs=1e-6)
    # A window starting on a message boundary takes that message's ts exactly.
    assert windows[0].start_ts == t0
    assert [w.start_ts for w in windows if w.start_seq == 350] == [t0 + 350 / rate_hz]


def test_start_ts_with_window_equal_to_stride_is_exact() -> None:
    target = assembler(140, 140)
    windows: list[Window] = []
    for seq in range(0, 700, 35):
        windows += target.feed("s", message(signal(35), seq=seq, ts=1000.0 + seq * 0.004), now=0.0).windows
    assert [w.start_ts for w in windows] == [1000.0 + start * 0.004 for start in (0, 140, 280, 420, 560)]


def test_start_ts_needs_a_period_for_an_offset() -> None:
    windows = assembler(10, 10).feed("s", message(signal(30), seq=0, ts=500.0), now=0.0).windows
    # Offset 0 needs no period; offsets 10 and 20 need one, and one message gives none.
    assert [w.start_ts for w in windows] == [500.0, None, None]


def test_start_ts_after_the_period_is_known() -> None:
    target = assembler(10, 10)
    assert target.feed("s", message(signal(5), seq=0, ts=100.0), now=0.0).windows == []
    windows = target.feed("s", message(signal(40), seq=5, ts=100.5), now=0.0).windows
    # Period 0.1 s from the two messages; window 20 is 15 samples into the second message.
    assert [w.start_seq for w in windows] == [0, 10, 20, 30]
    assert windows[0].start_ts == 100.0
    assert windows[1].start_ts == pytest.approx(101.0)
    assert windows[2].start_ts == pytest.approx(102.0)


def test_start_ts_is_none_without_ts() -> None:
    target = assembler(10, 10)
    windows = target.feed("s", message(signal(20), seq=0), now=0.0).windows
    windows += target.feed("s", message(signal(10), seq=20, ts=3.0), now=0.0).windows
    windows += target.feed("s", message(signal(10), seq=30), now=0.0).windows
    # Window 30 starts in a message without ts: no anchor to take it from.
    assert [(w.start_seq, w.start_ts) for w in windows] == [(0, None), (10, None), (20, 3.0), (30, None)]


def test_start_ts_is_none_when_ts_goes_backwards() -> None:
    target = assembler(10, 10)
    target.feed("s", message(signal(5), seq=0, ts=10.0), now=0.0)
    windows = target.feed("s", message(signal(20), seq=5, ts=9.0), now=0.0).windows
    assert [(w.start_seq, w.start_ts) for w in windows] == [(0, 10.0), (10, None)]


def test_completed_at_is_the_now_of_the_last_sample() -> None:
    target = assembler(10, 5)
    assert target.feed("s", message(signal(8), seq=0), now=1.0).windows == []
    windows = target.feed("s", message(signal(8), seq=8), now=2.5).windows
    assert [(w.start_seq, w.completed_at) for w in windows] == [(0, 2.5), (5, 2.5)]


def test_evict_idle_drops_least_recently_seen_sensors() -> None:
    target = assembler(10, 10, idle_seconds=10.0)
    target.feed("a", message(signal(3), seq=0), now=0.0)
    target.feed("b", message(signal(3), seq=0), now=1.0)
    target.feed("a", message(signal(3), seq=3), now=2.0)  # "a" is now the most recently seen
    assert target.active_sensors == 2
    assert target.evict_idle(now=10.5) == 0
    assert target.evict_idle(now=11.0) == 1  # "b": idle for exactly idle_seconds
    assert target.active_sensors == 1
    assert target.buffered_samples() == 6
    assert target.evict_idle(now=12.0) == 1
    assert (target.active_sensors, target.buffered_samples()) == (0, 0)


def test_duplicates_refresh_last_seen() -> None:
    target = assembler(10, 10, idle_seconds=10.0)
    target.feed("a", message(signal(3), seq=0), now=0.0)
    assert target.feed("a", message(signal(3), seq=0), now=5.0).duplicate
    assert target.evict_idle(now=14.0) == 0


def test_evicted_sensor_starts_a_new_stream() -> None:
    target = assembler(10, 10, idle_seconds=1.0)
    target.feed("s", message(signal(15), seq=0), now=0.0)
    assert target.evict_idle(now=5.0) == 1
    result = target.feed("s", message(signal(17), seq=3), now=6.0)  # would be a duplicate of the old stream
    assert (result.duplicate, result.gaps, [w.start_seq for w in result.windows]) == (False, 0, [10])


def test_sensor_limit() -> None:
    target = assembler(10, 10, max_sensors=2, idle_seconds=10.0)
    target.feed("a", message(signal(3)), now=0.0)
    target.feed("b", message(signal(3)), now=1.0)
    with pytest.raises(PayloadError) as info:
        target.feed("c", message(signal(3)), now=5.0)
    assert info.value.reason == SENSOR_LIMIT_REASON == "sensor_limit"
    assert SENSOR_LIMIT_REASON not in REJECT_REASONS
    assert target.active_sensors == 2
    target.feed("a", message(signal(3)), now=6.0)  # known sensors are still fed when full
    # At 11.0 "b" has been idle for 10 s: it makes room for "c"; "a" (seen at 6.0) stays.
    assert target.feed("c", message(signal(10)), now=11.0).windows[0].start_seq == 0
    assert target.active_sensors == 2
    assert target.evict_idle(now=15.9) == 0
    assert target.evict_idle(now=16.0) == 1  # "a"


@pytest.mark.parametrize(("window", "stride"), [(140, 140), (140, 35), (140, 1), (20, 300)])
def test_buffers_stay_below_one_window_per_sensor(window: int, stride: int) -> None:
    rng = np.random.default_rng(3)
    target = assembler(window, stride, max_sensors=50)
    next_seq = dict.fromkeys(range(20), 0)
    for _ in range(3000):
        sensor = int(rng.integers(20))
        n = int(rng.choice([1, 35, 140, 1000, 4096], p=[0.2, 0.5, 0.2, 0.07, 0.03]))
        target.feed(str(sensor), message(signal(n), seq=next_seq[sensor]), now=0.0)
        next_seq[sensor] += n
        assert target.buffered_samples() <= target.active_sensors * (window - 1)


def test_samples_between_windows_are_not_buffered() -> None:
    target = assembler(10, 100)
    target.feed("s", message(signal(15), seq=0), now=0.0)
    assert target.buffered_samples() == 0  # window 0 is out; window 100 has not started
    target.feed("s", message(signal(35), seq=15), now=0.0)
    assert target.buffered_samples() == 0
    target.feed("s", message(signal(55), seq=50), now=0.0)
    assert target.buffered_samples() == 5  # samples 100..104 of window 100


def test_rejects_samples_of_another_channel_count() -> None:
    with pytest.raises(ValueError):
        assembler(10, 10, channels=2).feed("s", message(signal(5, channels=3)), now=0.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"window": 0, "stride": 1, "channels": 1, "max_sensors": 1, "idle_seconds": 1.0},
        {"window": 1, "stride": 0, "channels": 1, "max_sensors": 1, "idle_seconds": 1.0},
        {"window": 1, "stride": 1, "channels": 0, "max_sensors": 1, "idle_seconds": 1.0},
        {"window": 1, "stride": 1, "channels": 1, "max_sensors": 0, "idle_seconds": 1.0},
        {"window": 1, "stride": 1, "channels": 1, "max_sensors": 1, "idle_seconds": 0.0},
    ],
)
def test_constructor_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        WindowAssembler(**kwargs)


def test_feed_result_defaults() -> None:
    assert FeedResult(windows=[]) == FeedResult([], 0, 0, False, 0)


def test_feeding_35_samples_is_cheap() -> None:
    # 1000 sensors; each timed repeat is 4 rounds, a full window cycle (W = 140 = 4 x 35), so window
    # emission is included. Best of several repeats keeps a busy shared machine from making this flaky.
    chunk = signal(35)
    target = assembler(140, 140, max_sensors=1000)
    counter = iter(range(10**9))

    def feed_round() -> None:
        step = next(counter)
        for sensor in range(1000):
            target.feed(str(sensor), message(chunk, seq=35 * step, ts=1e9 + step * 0.14), now=0.0)

    feed_round()  # creates the sensors
    seconds_per_message = min(timeit.repeat(feed_round, number=4, repeat=5)) / 4000
    assert seconds_per_message < 50e-6
    assert target.buffered_samples() == 1000 * 35  # 4 * 5 + 1 rounds: one chunk into the next window


def test_a_redelivered_message_far_behind_is_a_duplicate_not_a_jump() -> None:
    target = assembler(140, 140)
    feed_chunks(target, signal(4200), 35)
    result = target.feed("s", message(signal(35), seq=385), now=1.0, redelivered=True)  # 3,780 behind: the broker's
    assert (result.duplicate, result.restarted) == (True, False)
    assert target.feed("s", message(signal(35), seq=385), now=1.0).restarted  # the same from a sensor: a reboot


def test_a_ts_going_back_is_ignored_and_no_window_time_is_extrapolated_from_it() -> None:
    """A sensor's clock stepped back an hour for one message: its ts is ignored (counted by the caller), the samples
    kept, and the next window, which starts inside the message after it, keeps the time its good neighbours give
    (taken from the stepped ts, the period would have been 72 s a sample)."""
    stream = signal(140 * 5)
    feeder = WindowAssembler(140, 140, 1, 10, 60.0, ts_tolerance_seconds=1.0)
    results = []
    for index, start in enumerate(range(0, len(stream), 50)):
        ts = 1.7e9 + start / 250 - (3600.0 if index == 7 else 0.0)
        results.append(feeder.feed("s", message(stream[start : start + 50], seq=start, ts=ts), 0.0))
    assert [index for index, result in enumerate(results) if result.ts_backwards] == [7]
    windows = [window for result in results for window in result.windows]
    assert [window.start_seq for window in windows] == [0, 140, 280, 420, 560]
    assert [window.start_ts for window in windows] == pytest.approx(
        [1.7e9 + start / 250 for start in range(0, 700, 140)]
    )
