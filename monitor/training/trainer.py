"""Offline training: fit the autoencoder on normal windows, calibrate its threshold, write the artifact."""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from tqdm import tqdm

from monitor import __version__
from monitor.errors import ArtifactError, DataError
from monitor.model.artifact import (
    ERROR_MEASURE,
    METADATA_FILE,
    WEIGHTS_FILE,
    ModelArtifact,
    Normalisation,
    save_artifact,
)
from monitor.model.autoencoder import LSTMAutoencoder, reconstruction_errors, window_scores
from monitor.model.baseline import SCORE_SCALE_KEY, describe_score_scale
from monitor.model.baseline import describe as describe_baseline
from monitor.model.calibration import (
    CALIBRATION_KEY,
    MIN_ERRORS,
    SMALL_CALIBRATION,
    Calibration,
    CalibrationScores,
    ThresholdUncertainty,
    calibrate_recordings,
    threshold_uncertainty,
)
from monitor.model.engine import use_threads
from monitor.model.pca import METADATA_KEY as PCA_METADATA_KEY
from monitor.model.pca import PCA_FILE, VARIANCE, PcaModel
from monitor.model.scoring import BatchScorer, Scorer
from monitor.training.datasets import (
    WindowSet,
    read_labelled_recording,
    read_windows,
    require_window,
    same_channel_names,
)
from monitor.training.evaluation import Evaluation, evaluate_scores
from monitor.training.recordings import recording_windows, warm_up_scale
from monitor.training.settings import TrainSettings

log = structlog.get_logger("monitor.training")
REPORT_DIRECTORY = "report"


def refuse_overwrite(directory: Path) -> None:
    """Refuse to train into a directory that already holds an artifact (`monitor train --force` skips this)."""
    existing = [name for name in (METADATA_FILE, WEIGHTS_FILE) if (directory / name).exists()]
    if existing:
        raise ArtifactError(f"{directory}: holds a model already ({', '.join(existing)}); use --force to replace it")


@dataclass
class TrainingResult:
    artifact: ModelArtifact
    calibration: Calibration
    train_losses: list[float]
    validation_losses: list[float]
    best_epoch: int
    seconds: float
    evaluation: Evaluation | None = None
    evaluation_data: WindowSet | None = None
    calibration_windows: np.ndarray = field(default_factory=lambda: np.zeros(0))
    pca_evaluation: Evaluation | None = None


def _read(path: Path, settings: TrainSettings, channel_names: tuple[str, ...] | None = None) -> WindowSet:
    return read_windows(path, settings.window, settings.stride, channel_names)


Split = tuple[WindowSet, np.ndarray, np.ndarray, dict[str, Any], dict[str, list[np.ndarray]]]
PARTS = ("validation", "calibration")


def split_recordings(settings: TrainSettings) -> Split:
    """Split every recording in time: the first windows train, the next validate, the last calibrate (each
    recording's own threshold, the model's their median).

    With `baseline: sensor` each recording is normalised by its own first N windows (as the daemon will), and its
    calibration part once more as a sensor first seen N windows before it: a baseline (and score scale) fitted on
    those N windows, following from there, as a daemon starting there would normalise it. Fitted at the recording's
    start, the baseline and score scale of the calibration part would be a whole recording old, and the threshold
    would hold for scores that far from their warm-up only. Windows with a labelled anomalous sample are left out
    everywhere. Calibrating on the end of every recording (not a random sample of overlapping windows) keeps the
    threshold honest. The last item holds each recording's warm-up windows, normalised, for each of `PARTS`: the
    validation windows' (the recording's start) and the calibration part's (none without a sensor baseline).
    """
    if settings.window is None:
        raise DataError("training on recordings needs --window (and --stride)")
    stride = settings.stride or settings.window
    labels: list[Path | None] = [*settings.train_labels] if settings.train_labels else [None] * len(settings.train_data)
    parts: dict[str, list[np.ndarray]] = {"fit": [], "validation": [], "calibration": []}
    described: list[dict[str, Any]] = []
    validation_start = calibration_start = 0
    warm_ups: dict[str, list[np.ndarray]] = {part: [] for part in PARTS}
    named: list[tuple[str, tuple[str, ...] | None]] = []
    for path, label_path in zip(settings.train_data, labels, strict=True):
        recording = read_labelled_recording(path, label_path)
        named.append((recording.source, recording.channel_names))
        cut = (settings.window, stride, settings.baseline_windows, settings.baseline_follow_rate)
        windows, warm_up, clipped = recording_windows(recording, *cut)
        n = len(windows)
        keep = np.ones(n, bool) if recording.labels is None else ~recording.window_anomalous(settings.window, stride)
        n_cal = int(round(n * settings.calibration_fraction))
        n_val = int(round(n * settings.validation_fraction))
        fit_end = n - n_val - n_cal
        calibration_warm_up: dict[str, Any] = {}
        if warm_up:
            warm_ups["validation"].append(windows[:warm_up])
        if warm_up and n_cal:  # the calibration part as a daemon starting `warm_up` windows before it sees it
            if n - n_cal < warm_up:
                raise DataError(
                    f"{path}: {n - n_cal} windows before its calibration part (the last "
                    f"{settings.calibration_fraction:.0%}); its calibration baseline needs {warm_up}"
                )
            restart = n - n_cal - warm_up
            restarted, _, clipped = recording_windows(recording, *cut, start=restart)
            windows = np.concatenate([windows[: n - n_cal], restarted[warm_up:]])
            warm_ups["calibration"].append(restarted[:warm_up])
            calibration_warm_up = {"calibration_warm_up_windows": [restart, restart + warm_up]}
        bounds = {"fit": (0, fit_end), "validation": (fit_end, n - n_cal), "calibration": (n - n_cal, n)}
        for part, (start, end) in bounds.items():
            parts[part].append(windows[start:end][keep[start:end]])
        if len(parts["calibration"][-1]) < MIN_ERRORS:
            raise DataError(
                f"{path}: {len(parts['calibration'][-1])} normal windows in its calibration part (the last "
                f"{settings.calibration_fraction:.0%}); each recording's own threshold needs at least {MIN_ERRORS}"
            )
        validation_end = validation_start + len(parts["validation"][-1])
        calibration_end = calibration_start + len(parts["calibration"][-1])
        described.append(
            {
                "data": str(path),
                "sha256": recording.sha256,
                "labels": None if label_path is None else str(label_path),
                "windows": n,
                "anomalous_windows_left_out": int((~keep).sum()),
                "validation_windows": [validation_start, validation_end],
                "calibration_windows": [calibration_start, calibration_end],
                **calibration_warm_up,
                **({} if clipped is None else {"calibration_clipped_share": float(clipped[-n_cal:].mean())}),
            }
        )
        validation_start, calibration_start = validation_end, calibration_end
    fit, validation, calibration = (np.concatenate(parts[part]) for part in ("fit", "validation", "calibration"))
    if len(fit) < 2 or len(validation) < 1:
        raise DataError(f"{len(fit)}/{len(validation)} normal windows are too few to train/validate")
    digest = hashlib.sha256("".join(str(item["sha256"]) for item in described).encode()).hexdigest()
    normalised = (
        f", normalised as by a daemon starting {settings.baseline_windows} windows before it (its baseline, and its "
        "score scale with one, fitted on those: calibration_warm_up_windows, [start, end) in the recording's windows)"
        if settings.baseline_windows
        else ""
    )
    split = {
        "recordings": described,
        "validation": "the windows before each recording's calibration part (validation_windows: [start, end) of "
        "each recording's in the validation set; calibration_windows likewise)",
        "calibration": f"the last {settings.calibration_fraction:.0%} of each recording's windows{normalised}; the "
        "threshold is the median of the thresholds each recording's calibration windows give alone",
    }
    sources = ", ".join(str(path) for path in settings.train_data)
    return WindowSet(fit, None, sources, digest, same_channel_names(named)), validation, calibration, split, warm_ups


def split_normal(settings: TrainSettings) -> Split:
    """Return (train data, validation windows, calibration windows, a description of the split, warm-ups).

    With a separate calibration file, it serves both early stopping and calibration (the model
    never trains on it). Without one, the normal training windows are split with the seed.
    """
    if settings.from_recordings:
        return split_recordings(settings)
    train = _read(settings.train_data[0], settings).normal(settings.normal_label)
    if settings.calibration_data is not None:
        held_out = _read(settings.calibration_data, settings, train.channel_names).normal(settings.normal_label)
        require_window(held_out, train.window, train.channels)
        split = {
            "validation": "calibration file",
            "calibration_file": str(held_out.source),
            "calibration_sha256": held_out.sha256,
        }
        return train, held_out.windows, held_out.windows, split, {part: [] for part in PARTS}
    order = np.random.default_rng(settings.seed).permutation(len(train.windows))
    n_val = int(round(len(order) * settings.validation_fraction))
    n_cal = int(round(len(order) * settings.calibration_fraction))
    if len(order) - n_val - n_cal < 2 or n_val < 1 or n_cal < 10:
        raise DataError(
            f"{train.source}: {len(order)} normal windows are too few to split train/validation/calibration"
        )
    val_idx, cal_idx, fit_idx = order[:n_val], order[n_val : n_val + n_cal], order[n_val + n_cal :]
    fit = WindowSet(train.windows[fit_idx], None, train.source, train.sha256, train.channel_names)
    split = {
        "validation": f"{n_val} windows split off the training data",
        "calibration": f"{n_cal} windows split off (seed {settings.seed})",
    }
    return fit, train.windows[val_idx], train.windows[cal_idx], split, {part: [] for part in PARTS}


def _mean_error(model: LSTMAutoencoder, windows: torch.Tensor, batch_size: int = 512) -> float:
    model.eval()
    total = 0.0
    with torch.inference_mode():
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size]
            total += float(window_scores(reconstruction_errors(batch, model(batch))).sum())
    return total / len(windows)


def fit_model(
    settings: TrainSettings, train: np.ndarray, validation: np.ndarray
) -> tuple[LSTMAutoencoder, list[float], list[float], int]:
    """Mini-batch Adam on L1 loss with input noise; early stopping restores the best weights."""
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    model = LSTMAutoencoder(train.shape[2], settings.embedding_dim, settings.level_dim_for(train.shape[2]))
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimiser, factor=settings.lr_factor, patience=settings.lr_patience
    )
    train_t = torch.from_numpy(train)
    val_t = torch.from_numpy(validation)
    best_state, best_loss, best_epoch = copy.deepcopy(model.state_dict()), float("inf"), 0
    train_losses: list[float] = []
    val_losses: list[float] = []
    progress = tqdm(range(1, settings.epochs + 1), desc="training", unit="epoch", dynamic_ncols=True)
    for epoch in progress:
        model.train()
        order = torch.randperm(len(train_t), generator=generator)
        running = 0.0
        for start in range(0, len(order), settings.batch_size):
            clean = train_t[order[start : start + settings.batch_size]]
            noisy = (
                clean + settings.noise_std * torch.randn(clean.shape, generator=generator)
                if settings.noise_std
                else clean
            )
            loss = (model(noisy) - clean).abs().mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimiser.step()
            running += loss.item() * len(clean)
        train_losses.append(running / len(train_t))
        val_losses.append(_mean_error(model, val_t))
        scheduler.step(val_losses[-1])
        if val_losses[-1] < best_loss:
            best_state, best_loss, best_epoch = copy.deepcopy(model.state_dict()), val_losses[-1], epoch
        progress.set_postfix(
            train=f"{train_losses[-1]:.4f}", val=f"{val_losses[-1]:.4f}", best=f"{best_loss:.4f}@{best_epoch}"
        )
        if epoch - best_epoch >= settings.patience:
            break
    progress.close()
    model.load_state_dict(best_state)
    return model.eval(), train_losses, val_losses, best_epoch


def warn_small_calibration(calibration: Calibration, uncertainty: ThresholdUncertainty, unit: str) -> None:
    """Below `SMALL_CALIBRATION` calibration windows (or beats) the threshold's false-alarm rate is uncertain: say
    how much, in both modes."""
    if calibration.n_windows < SMALL_CALIBRATION:
        log.warning(
            "calibration_set_small",
            **{unit: calibration.n_windows},
            below=SMALL_CALIBRATION,
            message=f"{uncertainty.describe(calibration.threshold)}; give more held-out normal data",
        )


def train(settings: TrainSettings) -> TrainingResult:
    """Train, calibrate, evaluate (when labelled data is given) and write the artifact directory."""
    use_threads(settings.threads)
    started = time.perf_counter()
    fit, validation, calibration_windows, split, warm_ups = split_normal(settings)
    settings = settings.resolved(fit.channels)  # recorded as used
    if settings.channel_names is not None and len(settings.channel_names) != fit.channels:
        raise DataError(f"channel_names: {len(settings.channel_names)} names for {fit.channels} channels")
    if settings.level_dim and settings.level_dim >= fit.channels:
        raise DataError(
            f"level_dim {settings.level_dim}: a level path needs fewer dimensions than the {fit.channels} channel(s) "
            "(0: none)"
        )
    recorded_channel_names(settings, fit)  # refused before training, not after
    # With a per-sensor baseline the windows are already normalised: the model's own stage is the identity.
    sensor = settings.baseline == "sensor"
    normalisation = Normalisation.identity(fit.channels) if sensor else Normalisation.fit(fit.windows)
    log.info(
        "training_started",
        windows=len(fit.windows),
        validation=len(validation),
        calibration=len(calibration_windows),
        window=fit.window,
        channels=fit.channels,
        embedding_dim=settings.embedding_dim,
    )
    model, train_losses, val_losses, best_epoch = fit_model(
        settings, normalisation.apply(fit.windows), normalisation.apply(validation)
    )
    seconds = time.perf_counter() - started
    scorer = Scorer(model, normalisation)
    pca = PcaModel.fit(fit.windows, normalisation)
    scales = {
        name: recording_scales(model_scorer, warm_ups, split) if settings.score_scale == "sensor" else None
        for name, model_scorer in (("lstm", scorer), ("pca", pca))
    }
    calibration_errors = scorer.score_all(calibration_windows).errors / divisors(scales["lstm"], "calibration")
    calibration = calibrate_recordings(
        by_recording(calibration_errors, split), settings.threshold.method, settings.threshold.params
    )
    # With several recordings the threshold is no quantile of the pooled errors: its uncertainty is that of the
    # share of them it passes.
    level = None if calibration.recording_thresholds else calibration.params.get("q")
    uncertainty = threshold_uncertainty(calibration_errors, calibration.threshold, level)
    warn_small_calibration(calibration, uncertainty, "windows")
    pca_errors = pca.score_all(calibration_windows).errors / divisors(scales["pca"], "calibration")
    pca_calibration = calibrate_recordings(
        by_recording(pca_errors, split), settings.threshold.method, settings.threshold.params
    )
    evaluation, evaluation_data, pca_evaluation = None, None, None
    if settings.evaluate_data is not None:
        evaluation_data = _read(settings.evaluate_data, settings, fit.channel_names)
        require_window(evaluation_data, fit.window, fit.channels)
        anomalous = evaluation_data.is_anomaly(settings.normal_label)
        scores = scorer.score_all(evaluation_data.windows).errors
        evaluation = evaluate_scores(scores, anomalous, calibration.threshold)
        pca_evaluation = evaluate_scores(
            pca.score_all(evaluation_data.windows).errors, anomalous, pca_calibration.threshold
        )
    held_out = held_out_false_alarms(
        split,
        {
            "lstm": (scorer, calibration_errors, calibration.threshold),
            "pca": (pca, pca_errors, pca_calibration.threshold),
        },
        validation,
        {name: divisors(scale, "validation") for name, scale in scales.items()},
    )
    metadata = model_record(
        settings,
        fit,
        normalisation,
        calibration,
        uncertainty,
        split,
        evaluation,
        evaluation_data,
        train_losses,
        val_losses,
        best_epoch,
        seconds,
    )
    metadata[CALIBRATION_KEY] = CalibrationScores.from_errors(calibration_errors, calibration.threshold).to_dict()
    metadata["held_out_false_alarms"] = held_out
    if settings.score_scale == "sensor":
        recorded = {
            key: {name: [item[part][1] for item in scale or []] for name, scale in scales.items()}
            for key, part in (("training_recordings", "validation"), ("calibration_warm_ups", "calibration"))
        }
        metadata[SCORE_SCALE_KEY] = {**describe_score_scale(), **recorded}
    metadata[PCA_METADATA_KEY] = {
        "type": "pca",
        "file": PCA_FILE,
        "fitted_on": "the model's training windows, normalised as the model sees them",
        "variance": VARIANCE,
        "components": int(len(pca.components)),
        "threshold": {"value": pca_calibration.threshold, **pca_calibration.to_dict()},
        "evaluation": None if pca_evaluation is None else pca_evaluation.to_dict(),
    }
    # The old report describes the old weights: gone before the new ones land, whether or not a new report follows.
    shutil.rmtree(settings.output / REPORT_DIRECTORY, ignore_errors=True)
    pca.save(settings.output)  # before model.json, which is written last: an artifact naming its PCA part has it
    save_artifact(settings.output, model, metadata)
    artifact = ModelArtifact(
        model,
        normalisation,
        calibration.threshold,
        fit.window,
        fit.channels,
        settings.name,
        metadata["version"],
        metadata,
        settings.output,
    )
    log.info(
        "model_written",
        path=str(settings.output),
        threshold=calibration.threshold,
        best_epoch=best_epoch,
        seconds=round(seconds, 1),
        **({"auc": round(evaluation.auc, 4)} if evaluation else {}),
    )
    return TrainingResult(
        artifact,
        calibration,
        train_losses,
        val_losses,
        best_epoch,
        seconds,
        evaluation,
        evaluation_data,
        calibration_windows,
        pca_evaluation,
    )


def recording_scales(
    scorer: BatchScorer, warm_ups: dict[str, list[np.ndarray]], split: dict[str, Any]
) -> list[dict[str, tuple[list[int], float]]]:
    """Per training recording and part (validation, calibration): the part's window range and the score scale its
    scores are divided by (the validation windows': the warm-up at the recording's start; the calibration part's: the
    warm-up just before it)."""
    return [
        {
            part: (item[f"{part}_windows"], warm_up_scale(scorer, warm_up))
            for part, warm_up in zip(PARTS, ups, strict=True)
        }
        for item, *ups in zip(split["recordings"], *(warm_ups[part] for part in PARTS), strict=True)
    ]


def divisors(scales: list[dict[str, tuple[list[int], float]]] | None, part: str) -> np.ndarray | float:
    """Per window of `part` (validation or calibration, in split order), its score scale; 1 without."""
    if scales is None:
        return 1.0
    return np.concatenate([np.full(end - start, scale) for (start, end), scale in (item[part] for item in scales)])


def by_recording(errors: np.ndarray, split: dict[str, Any], part: str = "calibration") -> list[np.ndarray]:
    """`errors` of `part`'s windows (validation or calibration, in split order) cut into each training recording's;
    one piece when the windows do not come from recordings."""
    recordings = split.get("recordings")
    if not recordings:
        return [errors]
    return [errors[start:end] for start, end in (item[f"{part}_windows"] for item in recordings)]


def held_out_false_alarms(
    split: dict[str, Any],
    models: dict[str, tuple[BatchScorer, np.ndarray, float]],
    validation: np.ndarray,
    validation_divisors: dict[str, np.ndarray | float],
) -> dict[str, Any]:
    """Each model's nominal false-alarm rate beside the realised one on held-out normal windows (each recording's
    validation windows, which no threshold saw, their scores divided by `validation_divisors`), pooled and per
    recording. A recording's nominal rate is the share of its calibration windows above the threshold; the pooled
    one is the median of the recordings' (as the threshold is the median of their own); `calibration_share` is the
    share of all calibration windows above it."""
    realised = {
        name: by_recording(scorer.score_all(validation).errors / validation_divisors[name], split, "validation")
        for name, (scorer, _, _) in models.items()
    }
    nominal = {
        name: [float((part > limit).mean()) for part in by_recording(errors, split)]
        for name, (_, errors, limit) in models.items()
    }
    recordings = []
    for index, item in enumerate(split.get("recordings", [])):
        start, end = item["validation_windows"]
        if end > start:
            shares = {name: float((realised[name][index] > models[name][2]).mean()) for name in models}
            own = {name: nominal[name][index] for name in models}
            recordings.append({"data": item["data"], "windows": end - start, "nominal": own, "realised": shares})
    return {
        "data": "validation windows",
        "means": {
            "nominal": "per recording, the share of its calibration windows above the threshold (normalised as "
            "training.calibration says); pooled, the median of the recordings' shares, as the threshold is the median "
            "of their own thresholds",
            "realised": "the share of the validation windows above the threshold, normalised from each recording's "
            "start (as by a daemon running since then); pooled, all recordings' windows together",
            "calibration_share": "the share of all recordings' calibration windows together above the threshold",
        },
        "nominal": {name: float(np.median(values)) for name, values in nominal.items()},
        "realised": {name: float((np.concatenate(realised[name]) > models[name][2]).mean()) for name in models},
        "calibration_share": {name: float((errors > limit).mean()) for name, (_, errors, limit) in models.items()},
        "recordings": recordings,
    }


def recorded_channel_names(settings: TrainSettings, fit: WindowSet) -> list[str] | None:
    """The channel names the model records: `--channel-names`, else the training CSVs' header; both must agree."""
    given = tuple(settings.channel_names) if settings.channel_names else None
    if given and fit.channel_names and given != fit.channel_names:
        raise DataError(
            f"--channel-names {','.join(given)}: the training CSVs' header names {','.join(fit.channel_names)}"
        )
    chosen = given or fit.channel_names
    return list(chosen) if chosen else None


def model_record(
    settings: TrainSettings,
    fit: WindowSet,
    normalisation: Normalisation,
    calibration: Calibration,
    uncertainty: ThresholdUncertainty,
    split: dict[str, Any],
    evaluation: Evaluation | None,
    evaluation_data: WindowSet | None,
    train_losses: list[float],
    val_losses: list[float],
    best_epoch: int,
    seconds: float,
) -> dict[str, Any]:
    """The `model.json` record of a fixed-window model (beat training extends it with its segmentation)."""
    now = dt.datetime.now(dt.UTC)
    excluded = {
        "channel_names",
        "train_data",
        "train_labels",
        "calibration_data",
        "evaluate_data",
        "output",
        "name",
        "version",
        "report",
    }
    hyper = settings.model_dump(mode="json", exclude=excluded)
    names = recorded_channel_names(settings, fit)
    return {
        "name": settings.name,
        "version": settings.version or now.strftime("%Y.%m.%d"),
        "created_at": now.isoformat(timespec="seconds"),
        "created_by": f"monitor {__version__}, torch {torch.__version__}",
        "architecture": {
            "type": "lstm_autoencoder",
            "window": fit.window,
            "channels": fit.channels,
            "embedding_dim": settings.embedding_dim,
            **({"level_dim": settings.level_dim} if settings.level_dim else {}),
            **({"channel_names": names} if names else {}),
        },
        "normalisation": normalisation.to_dict(),
        "baseline": describe_baseline(settings.baseline_windows, settings.baseline_follow_rate)
        if settings.baseline_windows
        else {"type": "model"},
        "error_measure": ERROR_MEASURE,
        "error_measure_note": "mean over the window of |x - reconstruction|, in normalised units, channels averaged",
        "threshold": {
            "value": calibration.threshold,
            "decision": "anomaly when score > value",
            **calibration.to_dict(),
            "uncertainty": uncertainty.to_dict(),
        },
        "training": {
            "data": ", ".join(str(path) for path in settings.train_data),
            "data_sha256": fit.sha256,
            "normal_label": settings.normal_label,
            "windows": int(len(fit.windows)),
            **split,
            "hyperparameters": hyper,
            "epochs_run": len(train_losses),
            "best_epoch": best_epoch,
            "best_validation_loss": min(val_losses),
            "seconds": round(seconds, 1),
        },
        "evaluation": None
        if evaluation is None
        else {
            "data": str(settings.evaluate_data),
            "data_sha256": evaluation_data.sha256 if evaluation_data else None,
            **evaluation.to_dict(),
        },
    }
