"""The daemon's beat assembler: the same beat windows as offline cutting, seq gaps reset the detector, duplicates
are trimmed, and a snapshot carries every sensor across a restart."""

from __future__ import annotations

import base64
import json
from collections import Counter

import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry

from monitor.ecg.beats import BeatSpec, _median, cut_beats
from monitor.errors import PayloadError
from monitor.ingest.acks import InOrderAcks, PendingWindows
from monitor.ingest.batching import WindowQueue
from monitor.ingest.beat_windowing import BeatAssembler
from monitor.ingest.journal import Journal, Replayed, decode_windows, encode_windows
from monitor.ingest.payload import Message, PayloadDecoder
from monitor.ingest.stage import Ingest
from monitor.telemetry.metrics import Metrics
from monitor.training.beat_data import read_recording
from tests.support import REPO, wait_until
from tests.unit.ecg.test_qrs import synthetic_ecg

RECORD = REPO / "data" / "mitdb-dev" / "test" / "208_excerpt.npy"
FS = 360.0


@pytest.fixture(scope="module")
def signal() -> np.ndarray:
    return read_recording(RECORD, FS).signal[: int(120 * FS)]


def message(samples: np.ndarray, seq: int | None, ts: float | None = None) -> Message:
    return Message(np.asarray(samples, dtype=np.float32).reshape(-1, 1), seq, ts)


def stream(assembler: BeatAssembler, sensor: str, signal: np.ndarray, chunk: int, start: int = 0):
    windows, found, unscorable = [], 0, 0
    for offset in range(0, len(signal), chunk):
        result = assembler.feed(sensor, message(signal[offset : offset + chunk], start + offset), 0.0)
        windows += result.windows
        found += result.beats_found
        unscorable += sum(result.unscorable.values())
    return windows, found, unscorable


def test_beat_windows_in_the_daemon_are_the_offline_ones(signal):
    spec = BeatSpec(
        stretch_limit=0.3, dominant=True, timing_gain=2.0, rr_spread_floor=0.05, next_beat_seconds=2.0,
        qrs_correlation=0.76,
    )  # fmt: skip
    offline = cut_beats(signal.astype(np.float32).astype(np.float64), FS, spec)  # the payload carries float32 samples
    assembler = BeatAssembler(spec, FS, max_sensors=10, idle_seconds=60)
    windows, found, unscorable = stream(assembler, "s1", signal, chunk=35, start=1000)
    scorable = [beat for beat in offline if beat.scorable]
    assert found == len(offline) and unscorable == len(offline) - len(scorable) and len(windows) == len(scorable) > 100
    for beat, window in zip(scorable, windows, strict=True):
        assert (window.beat.beat_seq, window.start_seq, window.end_seq) == (
            beat.r_seq + 1000,
            beat.start_seq + 1000,
            beat.end_seq + 1000,
        )
        assert window.beat.rr_seconds == beat.rr_seconds
        assert np.array_equal(window.samples, beat.window)
        qrs_scale = max(1.0, 0.24 / (1.0 - beat.qrs_correlation))
        assert window.error_scale == spec.error_scale(beat.stretch, beat.qrs_correlation)
        assert window.error_scale == pytest.approx(max(1.0, beat.stretch / 0.3) * qrs_scale)
        assert window.timing_score == 2.0 * beat.earliness / max(0.05, beat.rr_spread)
    assert any(window.error_scale > 1 for window in windows) and any(window.error_scale == 1 for window in windows)
    assert any(beat.earliness < beat.prematurity for beat in scorable)  # the timing looked at the next beat
    assert np.all(BeatSpec().error_scale([0.1, 5.0], [0.99, 0.5]) == 1.0)  # no limit: scores as they are
    restored = decode_windows(encode_windows(windows), 0.0)  # the journal's records
    assert [w.error_scale for w in restored] == [w.error_scale for w in windows]
    assert [w.timing_score for w in restored] == [w.timing_score for w in windows]


def test_a_seq_gap_resets_the_detector_and_duplicates_are_trimmed(signal):
    # a tolerance above the 10 s gap below: within it a gap resets the detector; beyond it, see the next test
    assembler = BeatAssembler(BeatSpec(), FS, max_sensors=10, idle_seconds=60, seq_tolerance=10**6)
    first = assembler.feed("s1", message(signal[:3600], 0), 0.0)
    again = assembler.feed("s1", message(signal[:3600], 0), 0.0)
    assert again.duplicate and again.duplicate_samples == 3600 and not again.windows
    overlap = assembler.feed("s1", message(signal[3000:7200], 3000), 0.0)
    assert overlap.duplicate_samples == 600 and not overlap.gaps
    gap = assembler.feed("s1", message(signal[10800:14400], 10800), 0.0)
    assert gap.gaps == 1 and gap.detector_resets == 1
    later = stream(assembler, "s1", signal[14400:], chunk=360, start=14400)[0]
    # after the reset the stream starts afresh at 10800: its first beat has no RR interval and warms up again
    restarted = cut_beats(signal[10800:].astype(np.float32).astype(np.float64), FS, BeatSpec())
    expected = [beat for beat in restarted if beat.scorable and beat.end_seq + 10800 > 14400]
    got = [window for window in gap.windows + later if window.beat.beat_seq >= 10800]
    assert [w.beat.beat_seq for w in got][-len(expected) :] == [beat.r_seq + 10800 for beat in expected]
    assert first.beats_found > 0


def test_one_message_far_ahead_cannot_silence_a_sensor_and_a_reboot_to_zero_is_followed(signal):
    """The seq jump policy in beat mode: the seq policy is fixed mode's (`SensorStreams`), so a poisoned seq near 2**53
    costs the sensor nothing (its beats are exactly those of an untouched stream) and a reboot is scored at once."""
    spec, half = BeatSpec(), int(60 * FS)
    untouched = stream(BeatAssembler(spec, FS, max_sensors=10, idle_seconds=60), "s1", signal, chunk=360)[0]
    assembler = BeatAssembler(spec, FS, max_sensors=10, idle_seconds=60)
    before = stream(assembler, "s1", signal[:half], chunk=360)[0]
    poison = assembler.feed("s1", message(signal[:1], 2**53 - 10), 0.0)
    assert poison.restarted and not poison.gaps and not poison.windows
    after = stream(assembler, "s1", signal[half:], chunk=360, start=half)[0]
    assert [w.beat.beat_seq for w in before + after] == [w.beat.beat_seq for w in untouched] and len(after) > 40
    rebooted = stream(assembler, "s1", signal, chunk=360)[0]  # the sensor restarts its seq at 0
    assert [w.beat.beat_seq for w in rebooted] == [w.beat.beat_seq for w in untouched]


def test_state_survives_a_restart_exactly(signal):
    spec = BeatSpec(stretch_limit=0.3, dominant=True, timing_gain=2.0, rr_spread_floor=0.01, next_beat_seconds=2.0)
    reference = BeatAssembler(spec, FS, max_sensors=10, idle_seconds=60)
    expected = stream(reference, "a", signal, chunk=100)[0]
    assembler = BeatAssembler(spec, FS, max_sensors=10, idle_seconds=60)
    half = len(signal) // 2 + 17
    before = stream(assembler, "a", signal[:half], chunk=100)[0]
    state = json.loads(json.dumps(assembler.snapshot()))
    restarted = BeatAssembler(spec, FS, max_sensors=10, idle_seconds=60)
    assert restarted.restore(state, 0.0) == 1
    after = stream(restarted, "a", signal[half:], chunk=100, start=half)[0]
    assert [w.beat.beat_seq for w in before + after] == [w.beat.beat_seq for w in expected]
    assert all(np.array_equal(a.samples, b.samples) for a, b in zip(before + after, expected, strict=True))
    assert [w.error_scale for w in before + after] == [w.error_scale for w in expected]  # the stretch history too
    assert [w.timing_score for w in before + after] == [w.timing_score for w in expected]  # the RR reference too
    assert any(w.timing_score > 0 for w in expected)
    old = {**state, "version": 4}  # a state file from before the other normal classes
    with pytest.raises(ValueError, match="not a monitor-beat-state of version 5"):
        restarted.restore(old, 0.0)
    other_rate = BeatAssembler(spec, 250.0, max_sensors=10, idle_seconds=60)
    with pytest.raises(ValueError, match="saved for 360.0 Hz"):
        other_rate.restore(state, 0.0)


@pytest.mark.parametrize("fault", ["huge_sample", "next_seq_not_a_number", "template_cut_short"])
def test_one_bad_sensor_entry_costs_that_sensor_only(signal, fault):
    spec = BeatSpec(stretch_limit=0.3, dominant=True, timing_gain=2.0)
    assembler = BeatAssembler(spec, FS, max_sensors=10, idle_seconds=60)
    for index in range(3):
        stream(assembler, f"s{index}", signal[: 20 * int(FS)], chunk=100)
    state = json.loads(json.dumps(assembler.snapshot()))
    entry = state["sensors"][1]
    if fault == "huge_sample":
        raw = np.frombuffer(base64.b64decode(entry["stream"]["raw"]), dtype="<f8").copy()
        raw[-3] = 1e30  # restored, it would be scored: out of range as in a message
        entry["stream"]["raw"] = base64.b64encode(raw.tobytes()).decode()
    if fault == "next_seq_not_a_number":
        entry["next_seq"] = "seventy"
    if fault == "template_cut_short":
        entry["stream"]["templates"][0] = entry["stream"]["templates"][0][:12]
    restarted = BeatAssembler(spec, FS, max_sensors=10, idle_seconds=60)
    assert restarted.restore(state, 0.0, max_abs_value=1e6) == 2
    assert restarted.refused == ["s1"]


def test_timestamps_sensor_limit_and_a_bad_rate():
    fs = 250.0
    assembler = BeatAssembler(BeatSpec(), fs, max_sensors=1, idle_seconds=5)
    t = np.arange(int(20 * fs)) / fs
    lead = np.sin(2 * np.pi * t) ** 63  # sharp periodic peaks, one a second
    windows = []
    for offset in range(0, len(lead), 250):
        windows += assembler.feed("a", message(lead[offset : offset + 250], offset, 1000.0 + offset / fs), 0.0).windows
    assert windows and all(w.start_ts == pytest.approx(1000.0 + w.start_seq / fs) for w in windows)
    with pytest.raises(PayloadError, match="sensor_limit"):
        assembler.feed("b", message(lead[:10], 0), 1.0)
    assert assembler.feed("b", message(lead[:10], 0), 10.0).beats_found == 0  # "a" went idle and was evicted
    with pytest.raises(ValueError, match="sampling rate must be >= 50 Hz"):
        BeatAssembler(BeatSpec(), 20.0, max_sensors=1, idle_seconds=5)


def test_beat_mode_with_a_journal_acknowledges_a_message_once_on_disk_and_its_beats_decided(signal, tmp_path):
    """Beat windows are tracked like fixed ones: a message whose beats wait in the queue is not acknowledged (nor any
    after it: MQTT's order); once the beats are decided, every message is, in arrival order."""
    acks = InOrderAcks()
    pending = PendingWindows(acks)
    journal = Journal(tmp_path / "journal", acks.release, sync_interval_seconds=0.01)
    queue: WindowQueue = WindowQueue(10_000)
    assembler = BeatAssembler(BeatSpec(), FS, max_sensors=10, idle_seconds=60)
    ingest = Ingest(
        PayloadDecoder(1, 4096), assembler, queue, Metrics(CollectorRegistry(), 4, 1.0), 1, None, None, pending, journal
    )
    journal.start(ingest.snapshot())
    chunk, received = 360, []
    for mid, offset in enumerate(range(0, 30 * chunk, chunk), start=1):
        payload = orjson.dumps({"seq": offset, "samples": signal[offset : offset + chunk, None].tolist()})
        receipt = acks.received(mid, 1)
        ingest.handle("sensors/a/ecg", payload, 0.0, receipt)
        acks.release(receipt)  # what the MQTT source does after the handler
        received.append(mid)
    wait_until(lambda: journal.syncs > 0 and not journal._waiting, 10, what="every record on disk")
    released = [receipt.mid for receipt in acks.ready()]
    queued = queue.depth()
    assert queued > 10 and len(pending) == queued and len(released) < len(received)
    while queue.depth():
        pending.decided(queue.get(1.0))  # scored, not anomalous
    released += [receipt.mid for receipt in acks.ready()]
    journal.close(ingest.snapshot())
    assert released == received and len(pending) == 0
    old = {**ingest.snapshot()["windowing"], "version": 1}  # a checkpoint from before the dominant rhythm
    messages = [
        ("sensors/b/ecg", orjson.dumps({"seq": offset, "samples": signal[offset : offset + chunk, None].tolist()}))
        for offset in range(0, 20 * chunk, chunk)
    ]
    fresh = BeatAssembler(BeatSpec(), FS, max_sensors=10, idle_seconds=60)
    replaying = Ingest(PayloadDecoder(1, 4096), fresh, WindowQueue(10_000), Metrics(CollectorRegistry(), 4, 1.0), 1)
    replaying.replay(Replayed(old, [], messages=messages, decided=Counter()), 0.0)  # old state discarded, not fatal
    assert list(fresh.sensor_ids()) == ["b"] and replaying.windows.depth() > 10


def test_the_fast_median_gives_numpys_values_exactly():
    """Templates and noise floors use a partition instead of np.median (its overhead was a fifth of a beat's cost in
    the network thread); the windows the bundled model was trained on must not move by a bit."""
    rng = np.random.default_rng(0)
    for shape in ((16, 64), (15, 64), (1, 64), (471,), (470,)):
        values = rng.normal(size=shape)
        assert np.array_equal(_median(values), np.median(values, axis=0)), shape


def test_a_relearn_is_counted_in_the_daemons_metrics():
    fs = 250.0
    signal, _ = synthetic_ecg(fs, 120, seed=4)
    signal[int(40 * fs) :] *= -1  # the lead's beats change shape for good
    spec = BeatSpec(dominant=True, relearn_beats=32, relearn_share=0.1)
    metrics = Metrics(CollectorRegistry(), 4, 1.0)
    ingest = Ingest(PayloadDecoder(1, 4096), BeatAssembler(spec, fs, 10, 60), WindowQueue(10_000), metrics, 1)
    for offset in range(0, len(signal), 250):
        payload = orjson.dumps({"seq": offset, "samples": signal[offset : offset + 250].tolist()})
        ingest.handle("sensors/a/ecg", payload, 0.0)
    assert metrics.beat_relearns._value.get() == 1
