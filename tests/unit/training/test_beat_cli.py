"""`monitor train --segmentation beats` and `monitor evaluate --annotations` on vendored MIT-BIH data, and the one-line
errors of bad input: an annotation file with bad rows, a bad sampling rate, a model of the other mode."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from monitor.ecg.beats import BeatSpec
from monitor.model.artifact import read_metadata
from monitor.training.beat_data import aami_counts, cut_recording, label_beats, read_recording
from monitor.training.beat_trainer import (
    BeatSettings,
    BeatTrainSettings,
    TrainingBeats,
    calibrate_beats,
    split_training_beats,
)
from tests.support import DEFAULT_MODEL, REPO, run_cli

TRAIN = REPO / "data" / "mitdb-dev" / "train"
TEST = REPO / "data" / "mitdb-dev" / "test"
BUNDLED = REPO / "models" / "mitdb-beats"


@pytest.fixture(scope="module")
def beat_model(tmp_path_factory):
    output = tmp_path_factory.mktemp("beat-model") / "model"
    result = run_cli(
        "train",
        "--segmentation",
        "beats",
        "--sample-rate",
        "360",
        "--train-data",
        str(TRAIN / "123.npy"),
        str(TRAIN / "121.npy"),
        "--annotations",
        str(TRAIN / "123.csv"),
        str(TRAIN / "121.csv"),
        "--output",
        str(output),
        "--epochs",
        "2",
        "--embedding-dim",
        "8",
        "--threads",
        "1",
        "--no-report",
        env={"TQDM_DISABLE": ""},  # importing bench modules elsewhere in the session turns progress bars off
    )
    assert result.returncode == 0, result.stderr
    assert "cutting beats" in result.stderr  # the progress bar
    return output


def test_the_artifact_records_how_beats_were_cut(beat_model):
    metadata = read_metadata(beat_model)
    segmentation = metadata["segmentation"]
    assert segmentation["mode"] == "beats" and segmentation["trained_at_sample_rate_hz"] == 360
    assert (segmentation["before_seconds"], segmentation["after_seconds"], segmentation["window"]) == (0.25, 0.45, 64)
    assert segmentation["channels"] == ["beat", "template_diff", "prematurity"]
    assert segmentation["align_seconds"] == 0.05
    assert segmentation["dominant"] is True and segmentation["timing_gain"] > 0  # set from the fit beats' timing
    assert (segmentation["rr_spread_beats"], segmentation["rr_spread_floor"]) == (32, 0.02)
    assert metadata["architecture"]["window"] == 64 and metadata["architecture"]["channels"] == 3
    assert metadata["training"]["normal_symbols"] == ["N", "L", "R", "e", "j"] and metadata["training"]["beats"] > 700


def test_evaluate_prints_detector_and_beat_figures(beat_model):
    result = run_cli(
        "evaluate",
        "--model",
        str(beat_model),
        "--data",
        str(TEST / "116.npy"),
        str(TEST / "208_excerpt.npy"),
        "--annotations",
        str(TEST / "116.csv"),
        str(TEST / "208_excerpt.csv"),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    for key in (
        "auc",
        "pr_auc",
        "precision",
        "recall",
        "f1",
        "tp",
        "fp",
        "fn",
        "tn",
        "detector_sensitivity",
        "detector_ppv",
    ):
        assert key in figures
    assert figures["detector_sensitivity"] > 0.98 and figures["detector_ppv"] > 0.99
    assert figures["scored_by_class"]["V"] > 100 and figures["n_anomalies"] == sum(
        figures["scored_by_class"][c] for c in "SVF"
    )
    aami = figures["aami"]
    assert len(aami["records"]) == 2
    for row in (*aami["records"].values(), aami["gross"]):
        assert row["V_se"] == row["V_flagged"] / row["V_beats"]
        assert row["normal_flagged"] == row["N_flagged"] / row["N_beats"]
        assert row["alert_ppv"] == sum(row[f"{c}_flagged"] for c in "SVF") / row["flagged"]
        assert row["qrs_se"] == row["qrs_detected"] / row["qrs_annotated"]
    assert aami["gross"]["V_beats"] == sum(row["V_beats"] for row in aami["records"].values()) > 100
    assert aami["gross"]["qrs_se"] == figures["detector_sensitivity"] and aami["gross"]["F_se"] is not None
    text = run_cli(
        "evaluate", "--model", str(beat_model), "--data", str(TEST / "123.npy"), "--annotations", str(TEST / "123.csv")
    )
    assert text.returncode == 0 and "detector: sensitivity" in text.stdout and "confusion matrix" in text.stdout
    assert "record | beats | QRS Se | QRS +P | V Se | S Se | F Se | N flagged | alert +P" in text.stdout
    assert "\n123.npy | " in text.stdout and "\ngross | " in text.stdout


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("sample,symbol\n100,N\nabc,N\n", "line 3: sample 'abc' is not a whole number"),
        ("sample,symbol\n100,N\n50,N\n", "line 3: sample 50 comes before the previous row's 100"),
        ("sample,symbol\n100\n", "line 2: needs a sample and a symbol"),
        ("time,label\n100,N\n", "line 1: the header must start with sample,symbol"),
    ],
)
def test_an_annotation_file_with_bad_rows_is_one_line(beat_model, tmp_path, rows, message):
    annotations = tmp_path / "bad.csv"
    annotations.write_text(rows)
    result = run_cli(
        "evaluate", "--model", str(beat_model), "--data", str(TEST / "123.npy"), "--annotations", str(annotations)
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"monitor: error: {annotations}: {message}")


def test_a_bad_sample_rate_is_one_line(tmp_path):
    result = run_cli(
        "train",
        "--segmentation",
        "beats",
        "--sample-rate",
        "20",
        "--train-data",
        str(TRAIN / "123.npy"),
        "--output",
        str(tmp_path / "m"),
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "sample_rate" in lines[0] and "between 50 and 10000 Hz" in lines[0]


def test_a_model_of_the_other_mode_is_one_line(beat_model):
    fixed = run_cli(
        "evaluate",
        "--model",
        str(DEFAULT_MODEL),
        "--data",
        str(TEST / "123.npy"),
        "--annotations",
        str(TEST / "123.csv"),
    )
    assert fixed.returncode == 2
    assert fixed.stderr.strip().splitlines() == [
        f"monitor: error: {DEFAULT_MODEL}: a fixed-window model; "
        "--annotations and --sample-rate are for beat-mode models"
    ]
    beats = run_cli("evaluate", "--model", str(beat_model), "--data", str(TEST / "123.npy"))
    assert beats.returncode == 2
    assert beats.stderr.strip().splitlines() == [
        f"monitor: error: {beat_model}: a beat-mode model; evaluation needs --annotations, one file per recording"
    ]


@pytest.mark.skipif(not (BUNDLED / "model.json").is_file(), reason="the bundled beat model is not built")
def test_the_bundled_beat_model_reproduces_its_recorded_figures():
    metadata = read_metadata(BUNDLED)
    files = [TEST / f"{name}.npy" for name in ("105", "108", "114", "116", "121", "123", "208_excerpt")]
    result = run_cli(
        "evaluate",
        "--model",
        str(BUNDLED),
        "--data",
        *map(str, files),
        "--annotations",
        *(str(f.with_suffix(".csv")) for f in files),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    recorded = metadata["evaluation"]
    for key in ("auc", "f1", "tp", "fp", "fn", "tn", "detector_sensitivity", "detector_ppv"):
        assert figures[key] == pytest.approx(recorded[key], abs=1e-9), key


def test_training_beats_are_split_in_time_order_within_each_recording():
    """Fit, validation and calibration beats are each recording's first, middle and last normal scorable beats."""
    spec = BeatSpec()
    labelled = []
    for name in ("121", "123"):
        recording = read_recording(TRAIN / f"{name}.npy", 360, TRAIN / f"{name}.csv")
        labelled.append((recording, label_beats(recording, cut_recording(recording, spec))))
    split = split_training_beats(labelled, ["N"], 0.15, 0.15)
    expected: dict[str, list[np.ndarray]] = {
        name: [] for name in ("fit", "validation", "calibration", "fs", "cs", "fp", "cp", "fr", "cr")
    }
    for _, beats in labelled:
        keep = beats.scorable & (beats.symbols == "N")
        windows, stretch, prematurity = beats.windows[keep], beats.stretch[keep], beats.prematurity[keep]
        n = len(windows)
        n_cal, n_val = round(0.15 * n), round(0.15 * n)
        expected["fit"].append(windows[: n - n_val - n_cal])
        expected["validation"].append(windows[n - n_val - n_cal : n - n_cal])
        expected["calibration"].append(windows[n - n_cal :])
        expected["fs"].append(stretch[: n - n_val - n_cal])
        expected["cs"].append(stretch[n - n_cal :])
        expected["fp"].append(prematurity[: n - n_val - n_cal])
        expected["cp"].append(prematurity[n - n_cal :])
        expected["fr"].append(beats.rr_spread[keep][: n - n_val - n_cal])
        expected["cr"].append(beats.rr_spread[keep][n - n_cal :])
    for name, got in (
        ("fit", split.fit),
        ("validation", split.validation),
        ("calibration", split.calibration),
        ("fs", split.fit_stretch),
        ("cs", split.calibration_stretch),
        ("fp", split.fit_prematurity),
        ("cp", split.calibration_prematurity),
        ("fr", split.fit_rr_spread),
        ("cr", split.calibration_rr_spread),
    ):
        assert np.array_equal(got, np.concatenate(expected[name])), name
    assert len(split.calibration) > 100


def test_the_timing_gain_is_set_from_the_fit_beats_prematurity_over_their_rr_spread():
    """The gain scores the fit beats' timing at `timing_quantile` as much as the threshold: a population whose
    normal beats come early only where their sensor's RR spreads widely gets the gain of a regular one."""
    settings = BeatSettings(timing_quantile=0.5, rr_spread_floor=0.05)
    spec = settings.spec()
    regular = settings.with_timing_gain(spec, 1.0, np.array([0.02, 0.05, 0.1]), np.array([0.01, 0.05, 0.1]))
    assert regular.timing_gain == pytest.approx(1.0)  # median of 0.02/0.05, 0.05/0.05, 0.1/0.1
    swinging = settings.with_timing_gain(spec, 1.0, np.array([0.04, 0.1, 0.2]), np.array([0.02, 0.1, 0.2]))
    assert swinging.timing_gain == pytest.approx(1.0)
    unscaled = BeatSettings(timing_quantile=0.5, rr_spread_floor=None)
    assert unscaled.with_timing_gain(unscaled.spec(), 1.0, np.array([0.04, 0.1, 0.2]), np.zeros(3)).timing_gain == 10


def test_the_threshold_is_the_reconstruction_scores_quantile_and_timing_has_its_own_share():
    """The threshold is the calibration beats' reconstruction score (error / error scale) at its quantile; the gain
    scores the fit beats' timing at `timing_quantile` as that threshold, so each cue flags about its own share."""
    rng = np.random.default_rng(0)
    n = 4000
    windows = np.zeros((n, 4, 3), np.float32)
    early, spread = (lambda: rng.uniform(0, 0.3, n)), (lambda: rng.uniform(0, 0.1, n))
    beats = TrainingBeats(
        windows, windows, windows, np.zeros(n), rng.uniform(0, 2, n), early(), early(), spread(), spread()
    )
    settings = BeatTrainSettings(
        train_data=[Path("unused.npy")], sample_rate=360, output=Path("unused"),
        threshold={"method": "quantile", "params": {"q": 0.995}},
    )  # fmt: skip
    errors = rng.gamma(2.0, 0.2, n)
    spec, calibration, _ = calibrate_beats(settings, replace(settings.beats.spec(), stretch_limit=1.0), beats, errors)
    assert calibration.threshold == np.quantile(errors / np.maximum(1.0, beats.calibration_stretch), 0.995)
    timing = beats.fit_prematurity / np.maximum(0.02, beats.fit_rr_spread)
    assert spec.timing_gain is not None
    assert spec.timing_gain * np.quantile(timing, 0.995) == pytest.approx(calibration.threshold)
    scores = replace(spec, qrs_correlation=None).beat_scores(
        errors, beats.calibration_stretch, np.ones(n), beats.calibration_prematurity, beats.calibration_rr_spread
    )
    assert 0.007 < (scores > calibration.threshold).mean() < 0.013  # about 0.5 % by shape, 0.5 % by timing


def test_a_found_beat_matching_no_annotation_counts_as_flagged_but_not_as_a_normal_beat():
    """An extra detection (no annotated beat within 150 ms) has no AAMI class: flagged, it lowers the alerts' +P,
    not the share of normal beats flagged."""
    recording = read_recording(TRAIN / "123.npy", 360, TRAIN / "123.csv")
    beats = cut_recording(recording, BeatSpec())
    assert recording.ann_samples is not None and recording.ann_symbols is not None
    dropped = int(np.flatnonzero(recording.ann_symbols == "N")[100])  # as if the annotator had not marked it
    keep = np.arange(len(recording.ann_samples)) != dropped
    unannotated = replace(recording, ann_samples=recording.ann_samples[keep], ann_symbols=recording.ann_symbols[keep])
    full, extra = label_beats(recording, beats), label_beats(unannotated, beats)
    assert extra.extra == full.extra + 1 and (extra.symbols == "").sum() == (full.symbols == "").sum() + 1
    flagged = np.ones(len(beats), bool)
    counts, reference = aami_counts(extra, flagged), aami_counts(full, flagged)
    assert counts["N_beats"] == counts["N_flagged"] == reference["N_beats"] - 1
    assert counts["flagged"] == reference["flagged"] == len(beats)


def test_training_leaves_out_the_beats_too_noisy_to_learn_from():
    """Beats scored though above the learning noise limits (`beats.Beat.noisy`) are never fitted or calibrated on."""
    spec = BeatSpec(
        dominant=True, max_noise_ratio=0.3, relative_noise=3.0, learn_max_noise_ratio=0.25, learn_relative_noise=2.0
    )
    recording = read_recording(TEST / "208_excerpt.npy", 360, TEST / "208_excerpt.csv")
    beats = label_beats(recording, cut_recording(recording, spec))
    noisy = np.array([beat.noisy for beat in beats.beats])
    normal = beats.scorable & (beats.symbols == "N")
    assert (normal & noisy).any()
    split = split_training_beats([(recording, beats)], ["N"], 0.15, 0.15)
    assert len(split.fit) + len(split.validation) + len(split.calibration) == (normal & ~noisy).sum()
