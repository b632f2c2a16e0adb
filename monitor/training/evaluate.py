"""`monitor evaluate`: score labelled data with a trained artifact, the way the daemon would, and report.

Three kinds of data, chosen by the model and the files given: UCR-style labelled windows (one file), continuous
recordings with per-sample labels (fixed-window models, optionally with per-sensor baselines), and recordings
with beat annotations (beat-mode models). Each returns a `Report`: the JSON summary and the text a person reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monitor.ecg.beats import BeatSpec, beat_spec
from monitor.errors import MonitorError
from monitor.model.artifact import ModelArtifact, channel_names, load_artifact
from monitor.model.baseline import follow_rate, resolve_baseline, scaled_scores, trained_baseline
from monitor.model.engine import resolve_device, resolve_dtype, use_threads
from monitor.model.pca import METADATA_KEY as PCA_METADATA_KEY
from monitor.model.pca import PcaModel
from monitor.model.scoring import BatchScorer, Scorer
from monitor.training.beat_data import pair_files
from monitor.training.beat_trainer import evaluate_beats, format_beat_evaluation
from monitor.training.datasets import input_channel_names, read_labelled_recording, read_ucr, require_window
from monitor.training.evaluation import evaluate_scores, format_evaluation, format_side_by_side
from monitor.training.recordings import evaluate_recording, pooled_evaluation, score_recording


@dataclass(frozen=True)
class EvaluateRequest:
    """What to evaluate: the command line's options, without argparse."""

    model: Path
    data: list[Path]
    labels: list[Path] | None = None  # per-sample labels, one file per recording
    window: int | None = None
    stride: int | None = None
    baseline: str | None = None
    baseline_windows: int | None = None
    annotations: list[Path] | None = None  # beat mode: sample,symbol CSV per recording
    sample_rate: float | None = None  # beat mode
    normal_label: int = 1
    device: str = "cpu"
    dtype: str = "float32"  # what the autoencoder computes in, as the daemon's `model.dtype`
    threads: int = 1  # torch threads; 0 = one per core


@dataclass
class Report:
    """One evaluation: `summary` is what `--json` prints, `lines` the human-readable report."""

    summary: dict[str, Any]
    lines: list[str] = field(default_factory=list)

    def render(self, as_json: bool) -> str:
        return json.dumps(self.summary) if as_json else "\n".join(self.lines)


def evaluate(request: EvaluateRequest) -> Report:
    """Loads the artifact and evaluates the data the request names; a `MonitorError` for a mismatch."""
    if request.threads < 0:
        raise MonitorError("--threads must be >= 0")
    use_threads(request.threads)
    device = resolve_device(request.device)
    artifact = load_artifact(request.model, device)
    spec = beat_spec(artifact.metadata, request.model)
    scorer = Scorer.from_artifact(artifact, device, resolve_dtype(request.dtype, device, "--dtype"))
    if spec is not None:
        return evaluate_beat_recordings(request, artifact, spec, scorer)
    if request.annotations or request.sample_rate:
        raise MonitorError(
            f"{request.model}: a fixed-window model; --annotations and --sample-rate are for beat-mode models"
        )
    if request.labels is not None:
        return evaluate_recordings(request, artifact, scorer)
    if len(request.data) != 1 or request.window or request.stride or request.baseline or request.baseline_windows:
        raise MonitorError("several --data files, --window, --stride and --baseline are for recordings with --labels")
    return evaluate_windows(request, artifact, scorer)


def _header(artifact: ModelArtifact) -> dict[str, Any]:
    return {"model": {"name": artifact.name, "version": artifact.version}}


def evaluate_windows(request: EvaluateRequest, artifact: ModelArtifact, scorer: BatchScorer) -> Report:
    """Labelled windows (UCR text): ROC/PR AUC and the confusion at the model's threshold."""
    path = request.data[0]
    data = read_ucr(path)
    require_window(data, artifact.window, artifact.channels)
    result = evaluate_scores(
        scorer.score_all(data.windows).errors, data.is_anomaly(request.normal_label), artifact.threshold
    )
    lines = [f"model {artifact.name} {artifact.version} on {path}", format_evaluation(result)]
    return Report({**_header(artifact), "data": str(path), **result.to_dict()}, lines)


def evaluate_recordings(request: EvaluateRequest, artifact: ModelArtifact, scorer: BatchScorer) -> Report:
    """Continuous recordings with per-sample labels, cut and normalised as the daemon cuts them; beside the model,
    its PCA yardstick on the same windows when the artifact holds one."""
    labels = request.labels or []
    if len(labels) != len(request.data):
        raise MonitorError(f"--labels: {len(labels)} label files for {len(request.data)} recordings (one each)")
    if request.window is not None and request.window != artifact.window:
        raise MonitorError(f"--window {request.window}: the model takes windows of {artifact.window}")
    if request.stride is not None and request.stride < 1:
        raise MonitorError("--stride must be >= 1")
    baseline = trained_baseline(artifact.metadata)
    warm_up = resolve_baseline(baseline, request.baseline, request.baseline_windows, "--baseline")
    rate = follow_rate(artifact.metadata)
    scaled = scaled_scores(artifact.metadata)
    stride = request.stride or artifact.window
    models: dict[str, tuple[BatchScorer, float]] = {"lstm": (scorer, artifact.threshold)}
    pca = PcaModel.load(artifact)
    if pca is not None:
        models["pca"] = (pca, float(artifact.metadata[PCA_METADATA_KEY]["threshold"]["value"]))
    recordings = []
    expected = input_channel_names(artifact.metadata)
    for data, label_file in zip(request.data, labels, strict=True):
        recording = read_labelled_recording(data, label_file, expected)
        if recording.samples.shape[1] != artifact.channels:
            raise MonitorError(f"{data}: {recording.samples.shape[1]} channels, the model takes {artifact.channels}")
        recordings.append(recording)
    names = channel_names(artifact.metadata, artifact.channels)
    figures = {}
    for name, (model, threshold) in models.items():
        scored = [score_recording(model, item, artifact.window, stride, warm_up, rate, scaled) for item in recordings]
        figures[name] = (
            pooled_evaluation(scored, threshold),
            [evaluate_recording(item, threshold, names) for item in scored],
        )
    pooled, per_recording = figures["lstm"]
    caught = sum(item["segments_caught"] for item in per_recording)
    counted = sum(item["segments"] for item in per_recording)
    summary = {
        **_header(artifact),
        "data": [str(path) for path in request.data],
        "window": artifact.window,
        "stride": stride,
        "baseline": "model" if warm_up is None else "sensor",
        "baseline_windows": warm_up,
        "baseline_follow_rate": None if warm_up is None else rate,
        "score_scale": "sensor" if scaled else "none",
        "nominal_false_alarm_rate": nominal_false_alarms(artifact.metadata, "lstm"),
        **pooled.to_dict(),
        "segments": counted,
        "segments_caught": caught,
        "recordings": per_recording,
    }
    warm_up_note = f" ({warm_up} warm-up windows per recording, not scored)" if warm_up else ""
    lines = [
        f"model {artifact.name} {artifact.version}, window {artifact.window}, stride {stride}, "
        f"baseline {summary['baseline']}{warm_up_note}",
        format_evaluation(pooled),
        f"\nanomaly segments caught: {caught} of {counted}",
    ]
    if summary["nominal_false_alarm_rate"] is not None:
        lines.append(
            f"nominal false-alarm rate {summary['nominal_false_alarm_rate']:.2%}; "
            "a recording's realised one is its false-positive rate"
        )
    for item in per_recording:
        delay = item["median_delay_samples"]
        delay_note = f", median delay {delay:g} samples" if delay is not None else ""
        segments = f"segments {item['segments_caught']}/{item['segments']}{delay_note}"
        numbers = f"ROC AUC {item['auc']:.4f}  F1 {item['f1']:.4f}  false-positive rate {item['fpr']:.4f}"
        clipped = f"  at the clip {item['clipped_share']:.2%}" if "clipped_share" in item else ""
        scale = f"  score scale {item['score_scale']:.4g}" if "score_scale" in item else ""
        lines.append(f"  {item['data']}: {numbers}  {segments}{clipped}{scale}")
    if pca is not None:
        pca_pooled, pca_recordings = figures["pca"]
        summary["pca"] = {
            "components": len(pca.components),
            "nominal_false_alarm_rate": nominal_false_alarms(artifact.metadata, "pca"),
            **pca_pooled.to_dict(),
            "recordings": [{key: item[key] for key in RECORDING_FIGURES if key in item} for item in pca_recordings],
        }
        lines += [
            f"\nbeside the PCA yardstick ({len(pca.components)} components), on the same windows:",
            format_side_by_side({"lstm": pooled, "pca": pca_pooled}),
        ]
        for ours, yardstick in zip(per_recording, pca_recordings, strict=True):
            lines.append(
                f"  {ours['data']}: ROC AUC lstm {ours['auc']:.4f} pca {yardstick['auc']:.4f}, "
                f"false-positive rate lstm {ours['fpr']:.4f} pca {yardstick['fpr']:.4f}"
            )
    return Report(summary, lines)


RECORDING_FIGURES = (
    "data",
    "auc",
    "pr_auc",
    "f1",
    "precision",
    "recall",
    "fpr",
    "segments",
    "segments_caught",
    "score_scale",
)


def nominal_false_alarms(metadata: dict[str, Any], model: str) -> float | None:
    """The share of calibration windows above the threshold, as training recorded it (None for older artifacts)."""
    held_out = metadata.get("held_out_false_alarms")
    return held_out["nominal"].get(model) if isinstance(held_out, dict) else None


def evaluate_beat_recordings(
    request: EvaluateRequest, artifact: ModelArtifact, spec: BeatSpec, scorer: BatchScorer
) -> Report:
    """Recordings with beat annotations, cut beat by beat as the daemon cuts them (beat-mode models)."""
    if not request.annotations:
        raise MonitorError(
            f"{request.model}: a beat-mode model; evaluation needs --annotations, one file per recording"
        )
    fs = request.sample_rate or artifact.metadata["segmentation"].get("trained_at_sample_rate_hz")
    if not fs or fs <= 0:
        raise MonitorError("--sample-rate: give the recordings' sampling rate in Hz")
    pairs = pair_files(request.data, request.annotations)
    lead = input_channel_names(artifact.metadata)
    result, _ = evaluate_beats(scorer, artifact.threshold, pairs, float(fs), spec, lead)
    lines = [
        f"model {artifact.name} {artifact.version} on {len(request.data)} recording(s) at {fs:g} Hz",
        format_beat_evaluation(result),
    ]
    return Report({**_header(artifact), "data": [str(path) for path in request.data], **result.to_dict()}, lines)
