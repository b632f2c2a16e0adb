"""Continuous recordings as sensors: cut, normalise (model or per-sensor baseline), score, evaluate.

Each recording is one sensor's stream. Window k covers samples [k*S, k*S + W), as in the daemon with
`seq` starting at 0. With a per-sensor baseline the first N windows are the sensor's warm-up: they fit
its baseline and are not scored, exactly as the daemon does. Window figures count
the scored windows only; a window is anomalous when any of its samples is labelled anomalous.

With a score scale (a model trained with `--score-scale sensor`) the warm-up windows are scored too, once, and the
recording's scores are divided by the median of theirs (`baseline.score_scale`), as the daemon divides a sensor's.

Segments are maximal runs of anomalous samples. A segment is caught when a flagged window overlaps it;
its detection delay is the number of samples from the segment's first sample to the last sample of the
first flagged window that overlaps it, inclusive (the daemon decides only once that window is complete),
so at least 1. Segments that no scored window overlaps (inside the
warm-up, or past the last window) are not counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from monitor.errors import DataError
from monitor.model.baseline import normalise_recording, score_scale
from monitor.model.scoring import BatchScorer, top_channels
from monitor.training.datasets import Recording
from monitor.training.evaluation import Evaluation, evaluate_scores

TOP_CHANNELS = 3  # as many as an alert lists by default (alerts.top_channels)


def recording_windows(
    recording: Recording,
    window: int,
    stride: int,
    baseline_windows: int | None,
    follow_rate: float = 0.0,
    start: int = 0,
) -> tuple[np.ndarray, int, np.ndarray | None]:
    """The recording's windows as the model sees them, how many leading ones are warm-up, and with a sensor
    baseline each window's per-channel share of values at the clip (`[N, C]`).

    `baseline_windows` None: raw windows (the model's own normalisation applies), no warm-up, no clip.
    `start`: only the windows from that one on, as a sensor first seen there sees them (its warm-up begins there).
    """
    windows = recording.windows(window, stride)[start:]
    if baseline_windows is None:
        return windows, 0, None
    if len(windows) <= baseline_windows:
        raise DataError(
            f"{recording.source}: {len(windows)} windows{f' from window {start} on' if start else ''}, "
            f"not more than the {baseline_windows} baseline (warm-up) windows"
        )
    normalised, clipped = normalise_recording(windows, baseline_windows, follow_rate)
    return normalised, baseline_windows, clipped


@dataclass(frozen=True)
class ScoredRecording:
    """The scored (post warm-up) windows of one recording."""

    recording: Recording
    window: int
    stride: int
    starts: np.ndarray  # [N] first sample of each scored window
    scores: np.ndarray  # [N]
    warm_up: int  # windows not scored at the start
    channel_errors: np.ndarray | None  # [N, C] each channel's mean absolute error over the window
    clipped: np.ndarray | None  # [N, C] share of each channel's values at the baseline's clip (baseline: sensor)
    score_scale: float | None = None  # what `scores` were divided by (a model with a score scale)

    def anomalous(self) -> np.ndarray:
        return self.recording.window_anomalous(self.window, self.stride)[self.warm_up :]


def score_recording(
    scorer: BatchScorer,
    recording: Recording,
    window: int,
    stride: int,
    baseline_windows: int | None,
    follow_rate: float = 0.0,
    scaled: bool = False,
) -> ScoredRecording:
    """Score the recording's windows after its warm-up, as the daemon would see them; `scaled`: divided by the
    recording's score scale (needs a warm-up)."""
    windows, warm_up, clipped = recording_windows(recording, window, stride, baseline_windows, follow_rate)
    starts = recording.window_starts(window, stride)[warm_up:]
    scored = scorer.score_all(windows[warm_up:])
    scale = warm_up_scale(scorer, windows[:warm_up]) if scaled else None
    return ScoredRecording(
        recording,
        window,
        stride,
        starts,
        scored.errors.astype(np.float64) / (scale or 1.0),
        warm_up,
        scored.channels,
        None if clipped is None else clipped[warm_up:],
        scale,
    )


def warm_up_scale(scorer: BatchScorer, warm_up: np.ndarray) -> float:
    """A recording's score scale from its warm-up windows, normalised as the model sees them."""
    if not len(warm_up):
        raise DataError("a score scale needs a warm-up (baseline: sensor)")
    return score_scale(scorer.score_all(warm_up).errors)


def segments(labels: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of True as [start, end) sample ranges."""
    edges = np.diff(np.r_[0, labels.astype(np.int8), 0])
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))


def segment_figures(labels: np.ndarray, starts: np.ndarray, window: int, flagged: np.ndarray) -> dict[str, Any]:
    """Segments overlapped by a scored window, how many a flagged window caught, and their detection delays."""
    counted, delays = 0, []
    for seg_start, seg_end in segments(labels):
        overlapping = (starts < seg_end) & (starts + window > seg_start)
        if not overlapping.any():
            continue
        counted += 1
        hits = np.flatnonzero(overlapping & flagged)
        if hits.size:
            delays.append(int(starts[hits[0]] + window - seg_start))
    return {
        "segments": counted,
        "segments_caught": len(delays),
        "delays_samples": delays,
        "median_delay_samples": float(np.median(delays)) if delays else None,
    }


def evaluate_recording(
    scored: ScoredRecording, threshold: float, names: Sequence[str] | None = None, channels: int = TOP_CHANNELS
) -> dict[str, Any]:
    """Window figures and segment figures of one scored recording at `threshold`; each flagged window's top
    `channels` channels (as an alert names them) and, with a sensor baseline, the share of values at the clip."""
    anomalous = scored.anomalous()
    figures = evaluate_scores(scored.scores, anomalous, threshold).to_dict()
    labels = scored.recording.labels
    assert labels is not None
    flagged = scored.scores > threshold
    seg = segment_figures(labels, scored.starts, scored.window, flagged)
    extra: dict[str, Any] = {}
    if scored.channel_errors is not None:
        extra["flagged_top_channels"] = [top_channels(row, channels, names) for row in scored.channel_errors[flagged]]
    if scored.clipped is not None:
        by_channel = scored.clipped.mean(axis=0) if len(scored.clipped) else np.zeros(scored.clipped.shape[1])
        extra["clipped_share"] = float(by_channel.mean())
        extra["clipped_share_by_channel"] = by_channel.round(6).tolist()
    if scored.score_scale is not None:
        extra["score_scale"] = scored.score_scale
    return {
        "data": scored.recording.source,
        "warm_up_windows": scored.warm_up,
        **figures,
        **seg,
        "flagged_window_starts": scored.starts[flagged].tolist(),
        **extra,
    }


def pooled_evaluation(scored: list[ScoredRecording], threshold: float) -> Evaluation:
    """Window figures over the scored windows of all recordings together."""
    return evaluate_scores(
        np.concatenate([item.scores for item in scored]),
        np.concatenate([item.anomalous() for item in scored]),
        threshold,
    )
