"""Training and evaluation in beat mode: recordings in, one window per detected beat.

`monitor train --segmentation beats` cuts every recording with the daemon's own code path (`beats.BeatStream`),
keeps the scorable beats (with annotations: only those matched to a normal symbol), splits each recording's
beats in time order into fit, validation and calibration beats, and trains, calibrates and writes the artifact as
fixed mode does; the artifact's `segmentation` records how the beats were cut, so the daemon and `monitor evaluate` cut
them the same way (and refuse a model of the other mode).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import structlog
from pydantic import Field, field_validator, model_validator

from monitor.config.loading import Strict
from monitor.ecg.beats import Beat, BeatSpec
from monitor.errors import DataError
from monitor.model.artifact import ModelArtifact, Normalisation, save_artifact
from monitor.model.calibration import Calibration, ThresholdUncertainty, calibrate, threshold_uncertainty
from monitor.model.scoring import BatchScorer, Scorer
from monitor.training.beat_data import (
    DEFAULT_NORMAL_SYMBOLS,
    SCORED_CLASSES,
    LabelledBeats,
    aami_counts,
    aami_figures,
    gross_counts,
    load_labelled,
    pair_files,
)
from monitor.training.datasets import INPUT_CHANNEL_NAMES, WindowSet, same_channel_names
from monitor.training.evaluation import Evaluation, evaluate_scores
from monitor.training.settings import BEAT_DEFAULTS, BEAT_THRESHOLD_QUANTILE
from monitor.training.trainer import TrainingResult, TrainSettings, fit_model, model_record, warn_small_calibration

log = structlog.get_logger("monitor.beattraining")


class BeatSettings(Strict):
    """How beats are cut (`beats.BeatSpec`); the defaults are the measured ones (bench/beat_quality.py)."""

    before_seconds: float = Field(default=0.25, gt=0, le=1)
    after_seconds: float = Field(default=0.45, gt=0, le=1)
    window: int = Field(default=64, ge=8, le=1024)
    channels: list[Literal["beat", "template_diff", "rr", "prematurity"]] = Field(
        default=["beat", "template_diff", "prematurity"], min_length=1
    )
    template_beats: int = Field(default=16, ge=1)
    warmup_beats: int = Field(default=8, ge=0)
    max_noise_ratio: float = Field(default=0.3, gt=0)
    relative_noise: float = Field(default=3.0, gt=0)
    # a beat noisier than these (but within the two above) is scored, not learned from (beats.py); null: as above
    learn_max_noise_ratio: float | None = Field(default=0.25, gt=0)
    learn_relative_noise: float | None = Field(default=2.0, gt=0)
    align_seconds: float = Field(default=0.05, ge=0, le=0.2)
    detrend: bool = True
    # the stretch limit (beats.py) is this quantile of the fit beats' stretch; null: scores are not scaled
    stretch_quantile: float | None = Field(default=0.95, gt=0, lt=1)
    dominant: bool = True  # template and RR reference from the beats judged normal (beats.py)
    normal_distance: float = Field(default=0.6, gt=0)
    relearn_beats: int = Field(default=64, ge=1)
    relearn_share: float = Field(default=0.1, ge=0, le=1)
    # the timing gain (beats.py) scores the fit beats' timing at this quantile as the threshold's error;
    # null: no timing score
    timing_quantile: float | None = Field(default=0.995, gt=0, lt=1)
    # prematurity is divided by the sensor's normal RR spread over its last rr_spread_beats normal beats, at least
    # rr_spread_floor (beats.py); null: not divided
    rr_spread_beats: int = Field(default=32, ge=1)
    rr_spread_floor: float | None = Field(default=0.02, gt=0)
    # the timing looks at the interval after the beat, waiting for the next beat up to this long (beats.py); null:
    # no wait, the timing is the prematurity
    next_beat_seconds: float | None = Field(default=2.0, gt=0, le=5)
    # a beat whose QRS correlates with the template's more than this has its shape error divided by
    # (1 - qrs_correlation) / (1 - its correlation) (beats.py); null: not
    qrs_correlation: float | None = Field(default=0.77, gt=-1, lt=1)
    # besides the dominant rhythm's template, up to normal_classes other normal classes, each formed by class_run
    # similar beats in a row off the template, each early and followed by a longer interval by at most class_timing
    # RR spreads (beats.py); 0: the template alone
    normal_classes: int = Field(default=3, ge=0)
    class_run: int = Field(default=3, ge=2)
    class_timing: float = Field(default=3.0, gt=0)

    def spec(self) -> BeatSpec:
        """The spec to cut with; its `stretch_limit` and `timing_gain` are set after cutting and fitting."""
        values = self.model_dump(exclude={"stretch_quantile", "timing_quantile"})
        try:
            return BeatSpec(**{**values, "channels": tuple(self.channels)})
        except ValueError as error:
            raise DataError(f"beats: {error}") from None

    def with_stretch_limit(self, spec: BeatSpec, fit_stretch: np.ndarray) -> BeatSpec:
        if self.stretch_quantile is None:
            return spec
        limit = float(np.quantile(fit_stretch, self.stretch_quantile))
        if not limit > 0:
            raise DataError(f"beats: the fit beats' stretch at quantile {self.stretch_quantile} is {limit}, not > 0")
        return replace(spec, stretch_limit=limit)

    def with_timing_gain(
        self, spec: BeatSpec, threshold: float, fit_prematurity: np.ndarray, fit_rr_spread: np.ndarray
    ) -> BeatSpec:
        """The spec with its timing gain: the reconstruction errors' threshold over the fit beats' timing (the timing
        score at gain 1) at `timing_quantile`, so that timing scores as much as that error (unchanged without a
        quantile)."""
        if self.timing_quantile is None:
            return spec
        timing = replace(spec, timing_gain=1.0).timing_score(fit_prematurity, fit_rr_spread)
        early = float(np.quantile(timing, self.timing_quantile))
        if not early > 0:
            raise DataError(f"beats: the fit beats' timing at quantile {self.timing_quantile} is {early}, not > 0")
        return replace(spec, timing_gain=threshold / early)


class BeatTrainSettings(TrainSettings):
    """`monitor train --segmentation beats`: several recordings (and annotation files) instead of one window file."""

    segmentation: Literal["beats"] = "beats"
    train_data: list[Path] = Field(min_length=1)
    annotations: list[Path] | None = None
    evaluate_data: list[Path] | None = None  # type: ignore[assignment]
    evaluate_annotations: list[Path] | None = None
    sample_rate: float = Field(gt=0)
    normal_symbols: list[str] = Field(default_factory=lambda: list(DEFAULT_NORMAL_SYMBOLS), min_length=1)
    beats: BeatSettings = Field(default_factory=BeatSettings)
    epochs: int = Field(default=BEAT_DEFAULTS["epochs"], ge=1)
    batch_size: int = Field(default=BEAT_DEFAULTS["batch_size"], ge=1)
    patience: int = Field(default=BEAT_DEFAULTS["patience"], ge=1)
    lr_patience: int = Field(default=BEAT_DEFAULTS["lr_patience"], ge=1)

    @property
    def from_recordings(self) -> bool:
        """Beat recordings are cut into beats, not fixed windows: fixed mode's recording rules do not apply."""
        return False

    @model_validator(mode="after")
    def _no_fixed_mode_options(self) -> BeatTrainSettings:
        if self.baseline != "model" or self.train_labels is not None:
            raise ValueError(
                "baseline/train_labels: not in beat mode (beats are normalised one by one, annotations label them)"
            )
        if self.threshold.method == "quantile" and "q" not in self.threshold.params:
            self.threshold.params = {**self.threshold.params, "q": BEAT_THRESHOLD_QUANTILE}
        return self

    @field_validator("sample_rate")
    @classmethod
    def _detectable(cls, value: float) -> float:
        if not 50 <= value <= 10000:
            raise ValueError("must be between 50 and 10000 Hz (beat detection needs the QRS band, 5-15 Hz)")
        return value


@dataclass(frozen=True)
class BeatEvaluation:
    """Beat-mode figures: the detector's, then the beat-level ones on matched, scorable N/S/V/F beats."""

    detector_sensitivity: float
    detector_ppv: float
    annotated_beats: int
    found_beats: int
    unscorable: dict[str, int]  # per AAMI class, matched beats the signal-quality measure left unscored
    classes: dict[str, int]  # scored beats per AAMI class
    flagged: dict[str, int]  # flagged beats per AAMI class
    evaluation: Evaluation
    records: dict[str, dict[str, Any]]  # per recording, its figures in ANSI/AAMI EC57 terms (beat_data.aami_figures)
    gross: dict[str, Any]  # the same over every recording's beats

    def to_dict(self) -> dict[str, Any]:
        return {
            "aami": {"records": self.records, "gross": self.gross},
            **self.evaluation.to_dict(),
            "detector_sensitivity": self.detector_sensitivity,
            "detector_ppv": self.detector_ppv,
            "annotated_beats": self.annotated_beats,
            "found_beats": self.found_beats,
            "scored_by_class": self.classes,
            "flagged_by_class": self.flagged,
            "unscorable_by_class": self.unscorable,
        }


@dataclass(frozen=True)
class TrainingBeats:
    """Scorable training windows split in time order within each recording, with the fit and calibration beats'
    stretch, prematurity and RR spread (`beats.Beat`)."""

    fit: np.ndarray
    validation: np.ndarray
    calibration: np.ndarray
    fit_stretch: np.ndarray
    calibration_stretch: np.ndarray
    fit_prematurity: np.ndarray
    calibration_prematurity: np.ndarray
    fit_rr_spread: np.ndarray
    calibration_rr_spread: np.ndarray


def split_training_beats(
    labelled: list, normal_symbols: list[str], validation_fraction: float, calibration_fraction: float
) -> TrainingBeats:
    """(fit, validation, calibration) scorable training windows, split in time order within each recording.

    With annotations only beats matched to a normal symbol; never a beat too noisy to learn from (`beats.Beat.noisy`).
    As for fixed-mode recordings, each recording's validation beats come after its fit beats and its calibration
    beats last: a model scores beats of the minutes it was fitted on lower than later ones, and the daemon only ever
    scores later ones, so a threshold from beats drawn at random among the fit beats' neighbours flags more than its
    share of later normal beats.
    """
    parts: dict[str, list[Beat]] = {"fit": [], "validation": [], "calibration": []}
    for _, beats in labelled:
        if isinstance(beats, LabelledBeats):
            kept = [beat for beat, symbol in zip(beats.beats, beats.symbols, strict=True) if symbol in normal_symbols]
        else:
            kept = list(beats)
        kept = [beat for beat in kept if beat.scorable and not beat.noisy]
        n = len(kept)
        n_cal, n_val = int(round(n * calibration_fraction)), int(round(n * validation_fraction))
        fit_end = n - n_val - n_cal
        parts["fit"] += kept[:fit_end]
        parts["validation"] += kept[fit_end : n - n_cal]
        parts["calibration"] += kept[n - n_cal :]
    if not parts["fit"]:
        raise DataError("no scorable training beats found in the recordings")
    fit, validation, calibration = parts["fit"], parts["validation"], parts["calibration"]
    if len(fit) < 2 or len(validation) < 1 or len(calibration) < 10:
        raise DataError(
            f"{len(fit)}/{len(validation)}/{len(calibration)} scorable normal beats are too few to "
            "train/validate/calibrate"
        )
    return TrainingBeats(
        *(np.stack([beat.window for beat in part]) for part in (fit, validation, calibration)),
        *(np.array([beat.stretch for beat in part]) for part in (fit, calibration)),
        *(np.array([beat.prematurity for beat in part]) for part in (fit, calibration)),
        *(np.array([beat.rr_spread for beat in part]) for part in (fit, calibration)),
    )


@dataclass(frozen=True)
class FittedBeats:
    """A model fitted on training beats, with the spec it scores by and its calibrated threshold."""

    scorer: Scorer
    spec: BeatSpec  # with the stretch limit and timing gain training set
    calibration: Calibration
    uncertainty: ThresholdUncertainty
    beats: TrainingBeats
    train_losses: list[float]
    val_losses: list[float]
    best_epoch: int


def fit_beats(settings: BeatTrainSettings, labelled: list, spec: BeatSpec) -> FittedBeats:
    """Splits the cut recordings' beats, fits the model on the fit beats, sets the spec's stretch limit and timing
    gain, and calibrates the threshold on the calibration beats' scores (`beats.BeatSpec.beat_scores`)."""
    beats = split_training_beats(
        labelled, settings.normal_symbols, settings.validation_fraction, settings.calibration_fraction
    )
    spec = settings.beats.with_stretch_limit(spec, beats.fit_stretch)
    normalisation = Normalisation.fit(beats.fit)
    log.info(
        "training_started",
        beats=len(beats.fit),
        validation=len(beats.validation),
        calibration=len(beats.calibration),
        window=spec.window,
        channels=len(spec.channels),
    )
    model, train_losses, val_losses, best_epoch = fit_model(
        settings, normalisation.apply(beats.fit), normalisation.apply(beats.validation)
    )
    scorer = Scorer(model, normalisation)
    spec, calibration, uncertainty = calibrate_beats(settings, spec, beats, scorer.score_all(beats.calibration).errors)
    return FittedBeats(scorer, spec, calibration, uncertainty, beats, train_losses, val_losses, best_epoch)


def calibrate_beats(
    settings: BeatTrainSettings, spec: BeatSpec, beats: TrainingBeats, errors: np.ndarray
) -> tuple[BeatSpec, Calibration, ThresholdUncertainty]:
    """The threshold, calibrated on the calibration beats' reconstruction `errors` (each divided by its error scale),
    and the spec with its timing gain, which scores the fit beats' timing at `timing_quantile` as that threshold.

    Each cue has its own share of the false alarms: with both quantiles at 0.995, about 0.5 % of normal training
    beats score above the threshold by their shape and about as many by their timing. A threshold calibrated on
    the combined scores instead depends on how far the training population's early normal beats and its odd
    shapes coincide: the more early normal beats, the higher it comes out for shapes too."""
    method, params = settings.threshold.method, settings.threshold.params
    morphology = errors / spec.stretch_scale(beats.calibration_stretch)
    calibration = calibrate(morphology, method, params)
    spec = settings.beats.with_timing_gain(spec, calibration.threshold, beats.fit_prematurity, beats.fit_rr_spread)
    uncertainty = threshold_uncertainty(morphology, calibration.threshold, calibration.params.get("q"))
    return spec, calibration, uncertainty


def train_beats(settings: BeatTrainSettings) -> tuple[TrainingResult, BeatEvaluation | None]:
    """Cut, split, train, calibrate, evaluate (with evaluation recordings) and write the artifact."""
    from monitor.model.engine import use_threads

    use_threads(settings.threads)
    started = time.perf_counter()
    spec = settings.beats.spec()
    labelled = load_labelled(pair_files(settings.train_data, settings.annotations), settings.sample_rate, spec)
    lead = same_channel_names([(recording.source, recording.channel_names) for recording, _ in labelled])
    fitted = fit_beats(settings, labelled, spec)
    seconds = time.perf_counter() - started
    spec, calibration, beats = fitted.spec, fitted.calibration, fitted.beats
    fit, n_val, n_cal = beats.fit, len(beats.validation), len(beats.calibration)
    warn_small_calibration(calibration, fitted.uncertainty, "beats")
    evaluation, evaluation_data = None, None
    if settings.evaluate_data:
        files = pair_files(settings.evaluate_data, settings.evaluate_annotations)
        if settings.evaluate_annotations is None:
            raise DataError("evaluate_data in beat mode needs evaluate_annotations, one file per recording")
        evaluation, evaluation_data = evaluate_beats(
            fitted.scorer, calibration.threshold, files, settings.sample_rate, spec, lead
        )
    sources = [str(path) for path in settings.train_data]
    split = {
        "validation": f"{n_val} beats: the {settings.validation_fraction:.0%} before each recording's calibration part",
        "calibration": f"{n_cal} beats: the last {settings.calibration_fraction:.0%} of each recording's beats",
    }
    fit_set = WindowSet(fit, None, ", ".join(sources), "")
    model, normalisation = fitted.scorer.model, fitted.scorer.normalisation
    metadata = model_record(
        settings, fit_set, normalisation, calibration, fitted.uncertainty, split, None, None,
        fitted.train_losses, fitted.val_losses, fitted.best_epoch, seconds,
    )  # fmt: skip
    metadata["segmentation"] = {**spec.to_dict(), "trained_at_sample_rate_hz": settings.sample_rate}
    if lead is not None:
        metadata["architecture"][INPUT_CHANNEL_NAMES] = list(lead)
    metadata["training"].update(
        data=sources,
        data_sha256=[recording.sha256 for recording, _ in labelled],
        annotations=[str(path) for path in settings.annotations or []],
        normal_symbols=settings.normal_symbols,
        beats=int(len(fit)),
    )
    metadata["training"].pop("normal_label", None)
    metadata["training"].pop("windows", None)
    if evaluation is not None:
        metadata["evaluation"] = {
            "data": [str(path) for path in settings.evaluate_data or []],
            "annotations": [str(path) for path in settings.evaluate_annotations or []],
            **evaluation.to_dict(),
        }
    save_artifact(settings.output, model, metadata)
    artifact = ModelArtifact(
        model, normalisation, calibration.threshold, spec.window, len(spec.channels), settings.name,
        metadata["version"], metadata, settings.output,
    )  # fmt: skip
    log.info("model_written", path=str(settings.output), threshold=calibration.threshold, seconds=round(seconds, 1))
    result = TrainingResult(
        artifact, calibration, fitted.train_losses, fitted.val_losses, fitted.best_epoch, seconds, None,
        evaluation_data, beats.calibration,
    )  # fmt: skip
    return result, evaluation


def score_beats(scorer: BatchScorer, spec: BeatSpec, beats: LabelledBeats) -> np.ndarray:
    """Scores a recording's scorable beats as the daemon does (`beats.BeatSpec.beat_scores`); NaN for the others."""
    scores = np.full(len(beats.beats), np.nan)
    use = beats.scorable
    if use.any():
        errors = scorer.score_all(beats.windows[use]).errors
        scores[use] = spec.beat_scores(
            errors, beats.stretch[use], beats.qrs_correlation[use], beats.earliness[use], beats.rr_spread[use]
        )
    return scores


def evaluate_beats(
    scorer: BatchScorer,
    threshold: float,
    files: list[tuple[Path, Path | None]],
    fs: float,
    spec: BeatSpec,
    lead: Sequence[str] | None = None,
) -> tuple[BeatEvaluation, WindowSet]:
    """Detector figures and beat-level figures of recordings with annotations, per recording and pooled; a CSV
    recording's header must name the model's `lead` when it recorded one.

    Returns the figures and the scored beats as a labelled WindowSet (label 1 normal, 0 anomalous).
    """
    labelled = load_labelled(files, fs, spec, "cutting beats", lead)
    records: dict[str, dict[str, Any]] = {}
    counts, windows, classes, scores, found = [], [], [], [], 0
    for recording, beats in labelled:
        if not isinstance(beats, LabelledBeats):
            raise DataError(f"{recording.source}: evaluation needs its annotation file")
        score = score_beats(scorer, spec, beats)
        found += len(beats.beats)
        counts.append(aami_counts(beats, score > threshold))
        records[recording.source] = aami_figures(counts[-1])
        use = np.isin(beats.classes, SCORED_CLASSES) & beats.scorable
        if use.any():
            windows.append(beats.windows[use])
            classes.append(beats.classes[use])
            scores.append(score[use])
    if not windows:
        raise DataError("no scorable N, S, V or F beats in the evaluation recordings")
    total = gross_counts(counts)
    scored_classes, all_scores = np.concatenate(classes), np.concatenate(scores)
    anomalous = scored_classes != "N"
    flagged = all_scores > threshold
    beat_eval = BeatEvaluation(
        detector_sensitivity=total["qrs_detected"] / max(1, total["qrs_annotated"]),
        detector_ppv=total["qrs_detected"] / max(1, total["qrs_detected"] + total["qrs_extra"]),
        annotated_beats=total["qrs_annotated"],
        found_beats=found,
        unscorable={name: total[f"{name}_unscorable"] for name in SCORED_CLASSES},
        classes={name: int((scored_classes == name).sum()) for name in SCORED_CLASSES},
        flagged={name: int((flagged & (scored_classes == name)).sum()) for name in SCORED_CLASSES},
        evaluation=evaluate_scores(all_scores, anomalous, threshold),
        records=records,
        gross=aami_figures(total),
    )
    data = WindowSet(
        np.concatenate(windows), np.where(anomalous, 0, 1).astype(np.int64), ", ".join(str(p) for p, _ in files), ""
    )
    return beat_eval, data


def aami_table(records: dict[str, dict[str, Any]], gross: dict[str, Any]) -> str:
    """Per recording and gross, in the style of an ANSI/AAMI EC57 report (percentages; '-' where undefined)."""

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.2f}"

    head = "record", "beats", "QRS Se", "QRS +P", "V Se", "S Se", "F Se", "N flagged", "alert +P"
    rows = [" | ".join(head)]
    for name, row in (*records.items(), ("gross", gross)):
        cells = [Path(name).name if name != "gross" else name, str(row["qrs_annotated"])]
        cells += [pct(row[key]) for key in ("qrs_se", "qrs_ppv", "V_se", "S_se", "F_se", "normal_flagged", "alert_ppv")]
        rows.append(" | ".join(cells))
    return "\n".join(rows)


def format_beat_evaluation(result: BeatEvaluation) -> str:
    """The detector's figures, the beats per class, then the usual report."""
    from monitor.training.evaluation import format_evaluation

    per_class = "   ".join(
        f"{name}: {result.classes[name]} scored, {result.flagged[name]} flagged, {result.unscorable[name]} unscorable"
        for name in result.classes
    )
    return "\n".join(
        [
            f"detector: sensitivity {result.detector_sensitivity:.4f}   "
            f"positive predictivity {result.detector_ppv:.4f}   "
            f"({result.annotated_beats} annotated beats, {result.found_beats} found, 150 ms match window)",
            f"AAMI classes (anomalous = S, V, F): {per_class}",
            format_evaluation(result.evaluation).replace("windows:", "beats:", 1),
            "ANSI/AAMI EC57 terms (%; a class's Se: its beats flagged; alert +P: flagged S, V, F beats / flagged):",
            aami_table(result.records, result.gross),
        ]
    )
