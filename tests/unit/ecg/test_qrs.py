"""The streaming R-peak detector and the beat windows: synthetic ECG with known peaks, a vendored MIT-BIH record,
chunking and restarts that must not change a single beat, and the signal-quality measure."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from monitor.ecg.beats import BeatSpec, BeatStream, cut_beats
from monitor.ecg.qrs import QRSDetector, match_beats
from monitor.training.beat_data import label_beats, read_recording
from tests.support import REPO

VENDORED = REPO / "data" / "mitdb-dev"
NORMAL_WAVES = [(0.15, -0.2, 0.025), (-0.1, -0.03, 0.01), (1.0, 0.0, 0.012), (-0.25, 0.03, 0.01), (0.3, 0.25, 0.05)]
WIDE_WAVES = [(1.3, 0.0, 0.035), (-0.4, 0.08, 0.03), (-0.45, 0.3, 0.07)]  # a wide, inverted-T "ventricular" beat


def draw(signal: np.ndarray, fs: float, beat_time: float, waves: list[tuple[float, float, float]]) -> None:
    """Adds one beat's Gaussian waves (amplitude, offset s, width s) at `beat_time` to the lead."""
    t = np.arange(len(signal)) / fs
    for amplitude, offset, width in waves:
        signal += amplitude * np.exp(-0.5 * ((t - beat_time - offset) / width) ** 2)


def synthetic_ecg(
    fs: float, seconds: float, seed: int = 0, wide_every: int = 0, swing: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """A lead of sums of Gaussian waves (P, Q, R, S, T) with a varying RR interval; returns (signal, R indices).

    With `wide_every`, every such beat is a wide, premature, inverted-T "ventricular" beat. With `swing`, the RR
    interval also rises and falls by that share over a 4 s breath (sinus arrhythmia).
    """
    rng = np.random.default_rng(seed)
    signal = np.zeros(int(seconds * fs))
    peaks = []
    beat_time, number = 0.5, 0
    while beat_time < seconds - 0.6:
        number += 1
        wide = wide_every and number % wide_every == 0
        draw(signal, fs, beat_time, WIDE_WAVES if wide else NORMAL_WAVES)
        peaks.append(int(round(beat_time * fs)))
        breath = 1.0 + swing * np.sin(2 * np.pi * beat_time / 4.0)
        beat_time += breath * rng.uniform(0.8, 1.0) * (0.7 if wide_every and (number + 1) % wide_every == 0 else 1.0)
    return signal, np.asarray(peaks)


def detect(signal: np.ndarray, fs: float, chunks: int | None = None, seed: int = 0) -> np.ndarray:
    detector = QRSDetector(fs)
    if chunks is None:
        return np.asarray(detector.feed(signal))
    rng = np.random.default_rng(seed)
    found, start = [], 0
    while start < len(signal):
        size = int(rng.integers(1, chunks))
        found += detector.feed(signal[start : start + size])
        start += size
    return np.asarray(found)


def scores(found: np.ndarray, truth: np.ndarray, fs: float) -> tuple[float, float, float]:
    """(sensitivity, PPV, largest distance in seconds of a matched beat)."""
    match, used = match_beats(found, truth, int(0.15 * fs))
    distance = np.abs(found[match[match >= 0]] - truth[match >= 0]).max() / fs
    return (match >= 0).mean(), used.mean(), float(distance)


@pytest.mark.parametrize("fs", [250.0, 360.0, 500.0])
def test_finds_every_synthetic_beat_at_any_rate(fs):
    signal, truth = synthetic_ecg(fs, 120)
    sensitivity, ppv, distance = scores(detect(signal, fs), truth, fs)
    assert sensitivity == 1.0 and ppv == 1.0
    assert distance <= 0.02  # on the R wave, not the S wave 30 ms later


def test_noise_baseline_wander_amplitude_changes_and_inverted_polarity():
    fs = 250.0
    signal, truth = synthetic_ecg(fs, 300, seed=1)
    t = np.arange(len(signal)) / fs
    rng = np.random.default_rng(2)
    amplitude = np.where(t < 100, 1.0, np.where(t < 200, 0.2, 3.0))  # a 5x drop, then a 15x rise
    wander = 1.5 * np.sin(2 * np.pi * 0.15 * t) + 0.5 * np.sin(2 * np.pi * 0.4 * t)  # breathing, larger than the QRS
    noisy = amplitude * signal + wander + rng.normal(0, 0.03, len(signal)) + 0.05 * np.sin(2 * np.pi * 50 * t)
    for lead in (noisy, -noisy):  # and an inverted lead
        found = detect(lead, fs)
        match, used = match_beats(found, truth, int(0.15 * fs))
        missed = truth[match < 0] / fs
        assert used.mean() >= 0.99
        # a sudden change of gain costs the beats of a few seconds while the thresholds adapt, nothing else
        assert (((missed > 100) & (missed < 110)) | ((missed > 199) & (missed < 210))).all(), missed
        assert len(missed) <= 10


def test_recovers_after_a_dropout():
    fs = 250.0
    signal, truth = synthetic_ecg(fs, 120, seed=3)
    dropped = (truth > 40 * fs) & (truth < 45 * fs)
    signal[int(40 * fs) : int(45 * fs)] = 0.0  # the lead falls off for 5 s
    found = detect(signal, fs)
    match, used = match_beats(found, truth, int(0.15 * fs))
    after = truth > 47 * fs  # once a beat or two have re-taught the thresholds
    assert (match[after] >= 0).all()
    extra = found[~used] / fs
    assert not ((extra > 40.2) & (extra < 44.8)).any()  # nothing invented in the flat stretch (its edges are steps)
    assert (match[dropped] < 0).all()


def test_small_beats_between_tall_ones_and_a_stream_starting_off_zero():
    """Beats alternating 1 : 0.3 in amplitude (the integrated signal 1 : 0.09, as in lead V5) are all found, on a
    lead whose first sample is far from zero (the filters start as if the lead had been there: no step)."""
    fs = 360.0
    signal, truth = synthetic_ecg(fs, 120, seed=13)
    gain = np.ones(len(signal))
    for number, (start, end) in enumerate(zip(truth[:-1], truth[1:], strict=True)):
        if number % 2:
            gain[(start + end) // 2 - (end - start) : (start + end) // 2] = 0.3
    lead = 5.0 + gain * signal + np.random.default_rng(14).normal(0, 0.01, len(signal))
    found = detect(lead, fs)
    sensitivity, ppv, _ = scores(found, truth, fs)
    assert sensitivity == 1.0 and ppv == 1.0


def test_chunking_does_not_change_a_single_beat():
    fs = 360.0
    signal, _ = synthetic_ecg(fs, 90, seed=4)
    signal = signal + np.random.default_rng(5).normal(0, 0.05, len(signal))
    whole = detect(signal, fs)
    assert np.array_equal(whole, detect(signal, fs, chunks=7, seed=1))
    assert np.array_equal(whole, detect(signal, fs, chunks=900, seed=2))


def test_lookahead_is_bounded():
    fs = 250.0
    signal, _ = synthetic_ecg(fs, 60, seed=6)
    detector = QRSDetector(fs)
    assert detector.lookahead_seconds <= 0.5
    latest_delay = 0
    for start in range(0, len(signal)):
        for peak in detector.feed(signal[start : start + 1]):
            if peak > 2 * fs:  # after the 2 s learning phase
                latest_delay = max(latest_delay, start - peak)
    assert 0 < latest_delay / fs <= detector.lookahead_seconds


def test_on_a_vendored_mitdb_record_against_its_annotations():
    recording = read_recording(VENDORED / "test" / "123.npy", 360, VENDORED / "test" / "123.csv")
    labelled = label_beats(recording, cut_beats(recording.signal, 360, BeatSpec()))
    sensitivity = labelled.detected / (labelled.detected + labelled.missed)
    ppv = labelled.detected / (labelled.detected + labelled.extra)
    assert sensitivity >= 0.995 and ppv >= 0.995


@pytest.mark.parametrize("next_beat_seconds", [None, 2.0])
def test_beat_windows_do_not_depend_on_chunking_or_a_restart(next_beat_seconds):
    fs = 250.0
    signal, _ = synthetic_ecg(fs, 60, seed=7, wide_every=5)
    signal = signal + np.random.default_rng(8).normal(0, 0.02, len(signal))
    spec = BeatSpec(next_beat_seconds=next_beat_seconds)
    whole = cut_beats(signal, fs, spec)
    stream, chunked, start = BeatStream(fs, spec), [], 0
    rng = np.random.default_rng(9)
    while start < len(signal):
        size = int(rng.integers(1, 200))
        chunked += stream.feed(signal[start : start + size])
        start += size
        if start > len(signal) // 2 and not getattr(stream, "restored", False):
            stream = BeatStream.restore(json.loads(json.dumps(stream.snapshot())), spec)  # as across a SIGTERM restart
            stream.restored = True
    assert len(whole) == len(chunked) > 50
    for a, b in zip(whole, chunked, strict=True):
        assert (a.r_seq, a.rr_seconds, a.start_seq, a.end_seq, a.reason) == (
            b.r_seq,
            b.rr_seconds,
            b.start_seq,
            b.end_seq,
            b.reason,
        )
        assert (a.prematurity, a.rr_spread, a.stretch, a.normal) == (b.prematurity, b.rr_spread, b.stretch, b.normal)
        assert a.earliness == b.earliness
        assert np.array_equal(a.window, b.window)
    if next_beat_seconds is None:
        assert all(beat.earliness == beat.prematurity for beat in whole)
    else:
        assert any(beat.earliness < beat.prematurity for beat in whole)


def test_beat_windows_shape_warmup_and_rr():
    fs = 250.0
    signal, truth = synthetic_ecg(fs, 60, seed=10, wide_every=5)
    beats = cut_beats(signal, fs, BeatSpec())
    assert all(beat.window.shape == (64, 3) and beat.window.dtype == np.float32 for beat in beats)
    assert [beat.reason for beat in beats[:8]] == ["warmup"] * 8 and beats[8].reason is None
    assert beats[0].rr_seconds is None and beats[1].rr_seconds == pytest.approx((beats[1].r_seq - beats[0].r_seq) / fs)
    shapes = np.stack([beat.window[:, 0] for beat in beats])
    assert np.allclose(shapes.mean(axis=1), 0, atol=1e-5) and np.allclose(shapes.std(axis=1), 1, atol=1e-4)
    found = np.asarray([beat.r_seq for beat in beats])
    match, _ = match_beats(found, truth, int(0.15 * fs))
    wide = np.zeros(len(truth), bool)
    wide[4::5] = True
    scorable = np.asarray([beat.scorable for beat in beats])
    template_distance = np.asarray([np.abs(beat.window[:, 1]).mean() for beat in beats])
    wide_found = match[wide & (match >= 0)]
    normal_found = match[~wide & (match >= 0)]
    wide_found, normal_found = wide_found[wide_found >= 8], normal_found[normal_found >= 8]
    assert scorable[wide_found].all()  # a wide ectopic beat is not taken for noise
    assert template_distance[wide_found].min() > 3 * template_distance[normal_found].max()
    premature = np.asarray([beat.window[0, 2] for beat in beats])  # prematurity: how early, late beats 0
    assert premature[wide_found].min() > 0.15 > premature[normal_found].max()
    assert (premature >= 0).all() and (premature == 0).mean() > 0.3  # a beat later than usual is not premature


def test_noise_makes_beats_unscorable_and_a_flat_lead_too():
    fs = 250.0
    signal, truth = synthetic_ecg(fs, 120, seed=11)
    t = np.arange(len(signal)) / fs
    burst = (t > 60) & (t < 70)
    rng = np.random.default_rng(12)
    noisy = signal + np.where(burst, rng.normal(0, 0.4, len(signal)), 0.0)  # muscle noise for 10 s
    beats = cut_beats(noisy, fs, BeatSpec())
    inside = [beat for beat in beats if 61 * fs < beat.r_seq < 69 * fs]
    outside = [beat for beat in beats if beat.r_seq > 75 * fs or 10 * fs < beat.r_seq < 59 * fs]
    assert inside and sum(beat.reason == "noise" for beat in inside) >= 0.9 * len(inside)
    assert all(beat.scorable for beat in outside)


def test_alignment_to_the_template_on_a_record_whose_fiducial_point_jumps():
    """MIT-BIH 108 (large P waves, small QRS): the detector's fiducial point jumps by ~50 ms on some beats; aligned
    to the template, the spans of its normal beats match the template far better, and no span moves further."""
    recording = read_recording(VENDORED / "train" / "108.npy", 360, VENDORED / "train" / "108.csv")
    distances = {}
    for align in (0.0, 0.05):
        spec = BeatSpec(align_seconds=align)
        labelled = label_beats(recording, cut_beats(recording.signal, 360, spec))
        normal = (labelled.classes == "N") & labelled.scorable
        distances[align] = np.sqrt((labelled.windows[normal][:, :, 1] ** 2).mean(axis=1))
        moved = np.asarray([b.start_seq - b.r_seq for b in labelled.beats[1:]]) + round(spec.before_seconds * 360)
        assert np.abs(moved).max() <= round(align * 360)
        assert np.array_equal(labelled.r_seq, [b.r_seq for b in labelled.beats])  # beat_seq stays the R peak
    assert np.quantile(distances[0.05], 0.95) < 0.7 * np.quantile(distances[0.0], 0.95)


def test_a_model_from_before_alignment_cuts_at_the_fiducial_point_without_detrending():
    spec = BeatSpec.from_dict({"mode": "beats", "before_seconds": 0.25, "after_seconds": 0.45, "window": 64,
                               "channels": ["beat", "template_diff", "rr"]})  # fmt: skip
    assert spec.align_seconds == 0.0 and not spec.detrend and spec.channels == ("beat", "template_diff", "rr")
    with pytest.raises(ValueError, match="align_seconds"):
        BeatSpec(align_seconds=0.5)


def test_detrending_removes_a_baseline_slope_from_the_beat_window():
    fs = 360.0
    signal, _ = synthetic_ecg(fs, 60, seed=15)
    t = np.arange(len(signal)) / fs
    drifting = signal + 0.8 * np.sin(2 * np.pi * 0.3 * t)  # electrode motion: the baseline moves by ~the QRS
    for detrend, bound in ((True, 0.25), (False, None)):
        spec = BeatSpec(detrend=detrend)
        clean = {b.r_seq: b.window[:, 0] for b in cut_beats(signal, fs, spec)}
        moved = {b.r_seq: b.window[:, 0] for b in cut_beats(drifting, fs, spec)}
        common = sorted(set(clean) & set(moved))[10:]
        difference = np.median([np.sqrt(np.mean((clean[r] - moved[r]) ** 2)) for r in common])
        if bound is not None:
            assert difference < bound
        else:
            assert difference > 0.6  # without: a tilted, rescaled beat (4 times further from the clean one)


def test_the_dominant_rhythm_learns_the_normal_beats_of_a_bigeminy():
    """Half the beats ectopic from the first one: the dominant-rhythm template is the normal beat, so normal beats
    sit close to it and every ectopic beat far; a template of every clean beat sits between the two."""
    fs = 250.0
    signal, truth = synthetic_ecg(fs, 90, seed=3, wide_every=2)
    wide = np.zeros(len(truth), bool)
    wide[1::2] = True
    distance = {}
    for dominant in (False, True):
        beats = cut_beats(signal, fs, BeatSpec(dominant=dominant))
        match, _ = match_beats(np.asarray([beat.r_seq for beat in beats]), truth, int(0.15 * fs))
        scored = [(beat, wide[index]) for beat, index in zip(beats, match, strict=True) if index >= 0 and beat.scorable]
        assert len(scored) > 80
        rms = np.asarray([np.sqrt(np.mean(beat.window[:, 1] ** 2)) for beat, _ in scored])
        ectopic = np.asarray([is_wide for _, is_wide in scored])
        distance[dominant] = rms[~ectopic].mean()
        if dominant:
            assert all(beat.normal != is_wide for beat, is_wide in scored)  # judged: normal beats and only they
            assert rms[ectopic].min() > 3 * rms[~ectopic].max()
            premature = np.asarray([beat.prematurity for beat, _ in scored])
            assert premature[ectopic].min() > 0.15 > premature[~ectopic].max()  # RR reference: before normal beats
            assert beats[0].stretch == 0 and max(beat.stretch for beat, _ in scored) < 0.2  # ectopy is no stretch
    assert distance[True] < distance[False] / 3


def test_the_dominant_rhythm_is_learned_again_when_the_morphology_really_changes():
    """A lead whose beats change shape for good (here: inverted) is judged abnormal until fewer than
    `relearn_share` of the last `relearn_beats` clean beats were normal; then the new shape is learned, its first
    beat scored as in a noisy stretch."""
    fs = 250.0
    signal, truth = synthetic_ecg(fs, 180, seed=4)
    change = int(60 * fs)
    signal[change:] = -signal[change:]
    spec = BeatSpec(dominant=True, relearn_beats=32, relearn_share=0.1)
    stream = BeatStream(fs, spec)
    beats = stream.feed(signal)
    assert stream.relearns == 1
    after = [beat for beat in beats if beat.r_seq > change + 2 * fs]
    relearned = next(index for index, beat in enumerate(after) if beat.reason == "warmup")
    assert 24 <= relearned <= 32 and not any(beat.normal for beat in after[:relearned])
    assert all(beat.normal for beat in after[relearned + 10 :] if beat.scorable)
    # the warm-up beats have no distance from a template: the first beat after it is in the stretch of the beats that
    # made the sensor relearn (far from the old template); the next ones are measured against the new one
    first = next(index for index in range(relearned, len(after)) if after[index].scorable)
    assert after[first].stretch > 1.0 and max(beat.stretch for beat in after[first + 1 : first + 20]) < 0.2
    state = json.loads(json.dumps(stream.snapshot()))
    assert BeatStream.restore(state, spec).relearns == 1


def test_timing_scores_a_premature_beat_at_least_by_its_prematurity_over_the_sensors_rr_spread():
    spec = BeatSpec(stretch_limit=0.5, timing_gain=2.0, rr_spread_floor=0.05)
    errors, stretch = np.array([1.0, 1.0, 1.0, 1.0]), np.array([0.0, 1.0, 0.0, 0.0])
    correlation = np.zeros(4)
    scores = spec.beat_scores(
        errors, stretch, correlation, np.array([0.0, 0.0, 0.4, 0.4]), np.array([0.01, 0.01, 0.01, 0.2])
    )
    assert scores.tolist() == [1.0, 0.5, 16.0, 4.0]  # the spread below its floor counts as the floor
    one = np.array([1.0]), np.array([0.0]), np.array([1.0]), np.array([0.9]), np.array([0.0])
    assert BeatSpec().beat_scores(*one).tolist() == [1.0]
    old = BeatSpec.from_dict({key: value for key, value in spec.to_dict().items() if key != "dominant"})
    assert not old.dominant and old.timing_gain == 2.0  # an artifact from before the dominant rhythm
    older = BeatSpec.from_dict({key: value for key, value in spec.to_dict().items() if key != "rr_spread_floor"})
    assert older.timing_score(0.4, 0.2) == 0.8  # ... and from before the RR spread: prematurity as it is


def test_a_sensor_with_sinus_arrhythmia_needs_a_larger_departure_to_score_by_timing():
    """The RR spread is the sensor's own: with an RR that swings by 25 % over each breath, normal beats come up to
    a quarter early, and their timing (prematurity over the spread) stays at that of a regular sensor's normal
    beats instead of over twice it (as prematurity over a fixed spread would be); on the regular sensor, ectopic
    beats 30 % early stand far out."""
    fs, spec = 250.0, BeatSpec(dominant=True, timing_gain=1.0, rr_spread_floor=0.02)
    timing, spread, premature = {}, {}, {}
    for swing in (0.0, 0.25):
        signal, _ = synthetic_ecg(fs, 240, seed=5, wide_every=6, swing=swing)
        beats = [beat for beat in cut_beats(signal, fs, spec) if beat.scorable]
        normal = np.array([beat.normal for beat in beats])
        early = np.array([beat.prematurity for beat in beats])
        spread[swing] = float(np.median([beat.rr_spread for beat in beats]))
        score = spec.timing_score(early, np.array([beat.rr_spread for beat in beats]))
        timing[swing], premature[swing] = np.quantile(score[normal], 0.95), np.quantile(early[normal], 0.95)
        if not swing:
            assert np.quantile(score[~normal], 0.1) > 2 * timing[swing]
    assert spread[0.25] > 2 * spread[0.0] > 2 * spec.rr_spread_floor
    assert premature[0.25] > 2 * premature[0.0]  # normal beats come much earlier with the swing ...
    assert timing[0.25] < 1.2 * timing[0.0]  # ... but their timing does not grow


def test_the_timing_counts_a_premature_beat_followed_by_a_pause_not_a_rhythm_that_sped_up_or_an_extra_detection():
    """With `next_beat_seconds` a beat's earliness is at most 1 - RR / next RR: an ectopic beat followed by its
    compensatory pause keeps its prematurity; the first beats of a rhythm that sped up (and stays fast) lose it;
    after an extra detection halfway through an interval, the real beat is early only by the two intervals together."""
    fs = 250.0
    times = list(np.arange(0.5, 20.0, 0.8))  # 75/min
    times += [times[-1] + 0.55, times[-1] + 1.6]  # an ectopic beat 31 % early, then a full compensatory pause
    times += list(times[-1] + np.arange(0.8, 12.0, 0.8))
    stepped = times[-1]
    times += list(stepped + np.arange(0.64, 12.0, 0.64))  # the rate steps up by a quarter and stays
    signal = np.zeros(int((times[-1] + 2) * fs))
    ectopic = times.index(times[25])
    for number, beat_time in enumerate(times):
        draw(signal, fs, beat_time, WIDE_WAVES if number == ectopic else NORMAL_WAVES)
    extra_after = 12
    draw(signal, fs, times[extra_after] + 0.4, NORMAL_WAVES[2:3])  # a lone spike halfway: an extra detection
    for next_beat_seconds in (2.0, None):
        spec = BeatSpec(dominant=True, next_beat_seconds=next_beat_seconds)
        beats = {round(beat.r_seq / fs, 1): beat for beat in cut_beats(signal, fs, spec)}
        wide, first_fast = beats[round(times[ectopic], 1)], beats[round(stepped + 0.64, 1)]
        after_extra = beats[round(times[extra_after + 1], 1)]
        assert wide.prematurity > 0.25 and first_fast.prematurity > 0.15 and after_extra.prematurity > 0.4
        assert round(times[extra_after] + 0.4, 1) in beats  # the spike is detected
        if next_beat_seconds is None:  # a model from before: the timing is the prematurity
            assert all(beat.earliness == beat.prematurity for beat in beats.values())
        else:
            assert wide.earliness == wide.prematurity
            assert first_fast.earliness < 0.02 and after_extra.earliness < 0.02


def test_a_beat_waits_for_the_next_at_most_next_beat_seconds_plus_the_detectors_look_ahead():
    """A beat is cut once the next beat is detected; before a 3 s pause (no next beat) it is cut after at most
    `next_beat_seconds` plus the detector's look-ahead and fiducial search, not held until the rhythm comes back."""
    fs = 250.0
    signal, _ = synthetic_ecg(fs, 30, seed=7)
    pause = int(15 * fs)
    signal = np.concatenate([signal[:pause], np.full(int(3 * fs), signal[pause]), signal[pause:]])
    stream = BeatStream(fs, BeatSpec(next_beat_seconds=2.0))
    delays = []
    for index in range(len(signal)):
        delays += [(beat.r_seq, stream.received - beat.r_seq) for beat in stream.feed(signal[index : index + 1])]
    bound = 2.0 * fs + stream.lookahead + stream.detector.fiducial + 1
    assert len(delays) > 30 and max(delay for _, delay in delays) <= bound
    before_pause = max(r for r, _ in delays if r < pause)
    assert dict(delays)[before_pause] > 2.0 * fs  # it waited, then was cut without the next beat
    assert np.median([delay for _, delay in delays]) < 1.5 * fs  # the others: once the next beat is detected


def test_a_beat_too_noisy_to_learn_from_is_still_scored_and_a_wide_ectopic_beat_no_longer_goes_unscored():
    """MIT-BIH 208 (frequent PVCs): with learning limits stricter than the scoring ones, the template, RR reference
    and judgements are exactly those of the strict limits alone; the beats between the two are scored and marked
    noisy, and fewer V beats go unscored than with the strict limits."""
    recording = read_recording(VENDORED / "test" / "208_excerpt.npy", 360, VENDORED / "test" / "208_excerpt.csv")
    strict = BeatSpec(dominant=True, max_noise_ratio=0.25, relative_noise=2.0)
    lenient = BeatSpec(
        dominant=True, max_noise_ratio=0.3, relative_noise=3.0, learn_max_noise_ratio=0.25, learn_relative_noise=2.0
    )
    before, after = (label_beats(recording, cut_beats(recording.signal, 360, spec)) for spec in (strict, lenient))
    assert np.array_equal(before.windows, after.windows)
    assert [b.normal for b in before.beats] == [b.normal for b in after.beats]
    assert np.array_equal(before.earliness, after.earliness) and np.array_equal(before.stretch, after.stretch)
    newly = np.array([a.reason == "noise" and b.reason is None for a, b in zip(before.beats, after.beats, strict=True)])
    assert newly.sum() >= 5 and all(after.beats[i].noisy for i in np.flatnonzero(newly))
    assert not any(b.noisy for a, b in zip(before.beats, after.beats, strict=True) if a.reason is None)
    unscored_v = [int(((labelled.classes == "V") & ~labelled.scorable).sum()) for labelled in (before, after)]
    assert unscored_v[1] < unscored_v[0]
    with pytest.raises(ValueError, match="learning ones at most the scoring ones"):
        BeatSpec(max_noise_ratio=0.25, learn_max_noise_ratio=0.3)


def test_a_normal_qrs_in_electrode_motion_is_scored_leniently_and_a_wide_one_is_not():
    """The QRS scale looks at the QRS part alone: a normal beat with a slow swing across its ST segment (electrode
    motion) differs from the template, but its QRS still correlates with the template's, so its error is divided by
    more; a wide ectopic QRS does not correlate, so its error is scored as it is."""
    fs = 360.0
    signal, peaks = synthetic_ecg(fs, 120.0, wide_every=7)
    moved = peaks[10::7]  # normal beats (the wide ones are every 7th from the 7th on)
    for r in moved:
        draw(signal, fs, r / fs, [(0.8, 0.2, 0.06)])
    spec = BeatSpec(dominant=True, qrs_correlation=0.76)
    every = cut_beats(signal, fs, spec)
    warm_up = [beat for beat in every if beat.reason == "warmup"]  # no template yet: nothing to be lenient for
    assert warm_up and all(beat.qrs_correlation == 0.0 for beat in warm_up)
    assert np.all(spec.error_scale(np.zeros(len(warm_up)), [beat.qrs_correlation for beat in warm_up]) == 1.0)
    beats = [beat for beat in every if beat.scorable]
    r_seq = np.array([beat.r_seq for beat in beats])

    def near(targets: np.ndarray) -> np.ndarray:
        return np.abs(r_seq[:, None] - targets[None, :]).min(axis=1) <= 0.05 * fs

    correlation = np.array([beat.qrs_correlation for beat in beats])
    scale = spec.error_scale(np.zeros(len(beats)), correlation)
    wide, swung = near(peaks[6::7]), near(moved)
    assert wide.sum() > 10 and swung.sum() > 10
    assert np.all(scale[wide] == 1.0) and np.all(correlation[wide] < 0.76)
    assert np.all(correlation[swung] > 0.9) and np.all(scale[swung] > 2.0)
    distance = np.array([np.sqrt(np.mean(beat.window[:, 1] ** 2)) for beat in beats])
    assert np.median(distance[swung]) > 3 * np.median(distance[~wide & ~swung])  # its shape differs all the same
    assert np.all(BeatSpec(dominant=True).error_scale(np.zeros(3), [1.0, 0.5, 0.0]) == 1.0)  # without: as it is
    assert BeatSpec.from_dict(spec.to_dict()) == spec
    assert "qrs_correlation" not in BeatSpec().to_dict()  # a spec without one (a saved state's) reads as before


def test_a_normal_variant_that_persists_on_time_becomes_a_normal_class_and_premature_ectopic_beats_never_do():
    """Runs of five beats with another QRS (deeper Q and S waves: the lead's axis moving with breathing), on time:
    with `normal_classes` the first `class_run` of them form a class, and every later one is compared with it (its
    `template_diff` small, its QRS correlated). The wide beats of a bigeminy and of couplets come early and are
    followed by a pause: they never form a class and stay far from every template. The dominant rhythm (judgement,
    stretch, timing) is untouched, and a restart in the middle continues the classes exactly."""
    fs = 360.0
    variant = [(0.15, -0.2, 0.025), (-0.7, -0.035, 0.012), (1.6, 0.005, 0.02), (-1.1, 0.045, 0.015), (0.1, 0.25, 0.06)]
    rng = np.random.default_rng(5)
    signal, kinds, peaks = np.zeros(int(300 * fs)), [], []
    beat_time, number = 0.5, 0

    def ectopic(n: int) -> bool:  # a bigeminy, then isolated wide beats and couplets
        return (150 < n < 170 and n % 2 == 0) or n % 37 in (0, 1)

    while beat_time < 299:
        number += 1
        kind = "variant" if number % 25 in range(10, 15) else "wide" if ectopic(number) else "normal"
        draw(signal, fs, beat_time, {"variant": variant, "wide": WIDE_WAVES, "normal": NORMAL_WAVES}[kind])
        kinds.append(kind)
        peaks.append(int(round(beat_time * fs)))
        coupling = 0.65 if ectopic(number + 1) else 1.35 if kind == "wide" else 1.0  # early, then a pause
        beat_time += rng.uniform(0.82, 0.85) * coupling
    signal += rng.normal(0, 0.01, len(signal))
    spec = BeatSpec(dominant=True, next_beat_seconds=2.0, rr_spread_floor=0.02, normal_classes=2)
    cut = {classes: cut_beats(signal, fs, replace(spec, normal_classes=classes)) for classes in (0, 2)}
    beats = cut[2]
    match, _ = match_beats(np.asarray([beat.r_seq for beat in beats]), np.asarray(peaks), int(0.15 * fs))
    kind = np.full(len(beats), "", dtype=object)
    kind[match[match >= 0]] = np.asarray(kinds)[match >= 0]
    scorable = np.asarray([beat.scorable for beat in beats])
    distance = {n: np.asarray([np.sqrt(np.mean(beat.window[:, 1] ** 2)) for beat in cut[n]]) for n in cut}
    correlation = np.asarray([beat.qrs_correlation for beat in beats])
    variants = np.flatnonzero(scorable & (kind == "variant"))
    wide = scorable & (kind == "wide")
    assert len(variants) > 50 and wide.sum() > 10
    assert distance[0][variants].min() > spec.normal_distance  # off the template: not judged normal
    formed, later = variants[: spec.class_run], variants[spec.class_run :]
    assert distance[2][formed].min() > spec.normal_distance
    assert distance[2][later].max() < 0.3 and correlation[later].min() > 0.95  # compared with their own class
    assert distance[2][wide].min() > 3 * distance[2][later].max()
    assert [beat.normal for beat in beats] == [beat.normal for beat in cut[0]]
    assert [(beat.stretch, beat.earliness) for beat in beats] == [(beat.stretch, beat.earliness) for beat in cut[0]]
    half, stream = len(signal) // 2, BeatStream(fs, spec)
    first = stream.feed(signal[:half])
    assert stream._classes  # the restart below carries a class
    restarted = BeatStream.restore(json.loads(json.dumps(stream.snapshot())), spec)
    again = first + restarted.feed(signal[half:])
    assert len(again) == len(beats)
    assert all(np.array_equal(a.window, b.window) for a, b in zip(again, beats, strict=True))
    assert BeatSpec.from_dict(spec.to_dict()) == spec and "normal_classes" not in BeatSpec().to_dict()
    with pytest.raises(ValueError, match="class_run >= 2"):
        BeatSpec(normal_classes=1, class_run=1)  # one beat off the template is no class
