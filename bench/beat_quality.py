"""Beat mode on MIT-BIH: the detector, the bundled beat model and the PCA anchor, per record and pooled.

    .venv/bin/python -m bench.beat_quality [--model models/mitdb-beats] [--data-dir data/mitdb-dev]
                                           [--out bench/beat_quality.json]

Data: the vendored splits of the seven dev records (data/mitdb-dev/PROVENANCE.md; records 100, 106, 119, 200
and 223 are reserved and never read): `train/` holds the first 600 s of each record (100 s of the 208 excerpt),
`test/` the rest. Everything is cut with the daemon's code path (`beats.BeatStream`) and the model's own
segmentation; the train and test parts are separate streams, as `monitor train` and `monitor evaluate` see them.

- Detector, per record: sensitivity and positive predictivity against the annotated beats (150 ms match window),
  on the whole record (its train and test parts as one stream) and on the test part.
- Beat level, on the test parts: the model's score against its own threshold (set from normal beats only), and
  PCA (4 components) fitted on exactly the beats the model was fitted on (`beattraining.split_training_beats`: the
  normal scorable beats of the train parts, each recording's last beats held out) with its threshold the same
  quantile of its scores on the same calibration beats. Two anchors: PCA on the z-normalised beat alone (the
  anchor beat mode was asked to beat) and PCA on the model's channels.
- Figures (anomalous = AAMI S, V, F; normal = N; Q and unmatched beats are left out): ROC AUC over the scorable
  beats; precision, recall and F1 at the threshold and the share of normal beats flagged, with unscorable beats
  counted as not flagged (what a user sees); unscorable share of the normal and of the anomalous beats (the
  signal-quality measure must not hide the anomalies).

- Every score (model and anchors) is divided by the beat's error scale, as the daemon does
  (`beats.BeatSpec.error_scale`: beats in noisy stretches and beats whose QRS matches the template are scored
  leniently), the calibration beats' by their stretch scale only, as training does;
  the model's score is then at least the beat's timing score, as the daemon's (`beats.BeatSpec.beat_scores`).
- Where the model's false alarms come from (normal beats flagged, test parts): in a noisy stretch (the beat's
  `stretch`, the distance from the template of the 4 beats before, is above 0.5: its neighbours differ from
  the template too, so the stretch rather than the beat is odd), else early (the earliness its timing scores,
  `beats.Beat.earliness`, above 0.15), else other.
- `--context-gate TAU` (an experiment, not the product's rule): beats in a stretch whose distance is above TAU count
  as unscorable, for the model and the anchors alike; shows what such a signal-quality rule would cost.

Results: a JSON file and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from monitor.ecg.beats import BeatSpec, beat_spec  # noqa: E402
from monitor.model.artifact import Normalisation, load_artifact  # noqa: E402
from monitor.model.scoring import Scorer  # noqa: E402
from monitor.training.beat_data import (  # noqa: E402
    LabelledBeats,
    Recording,
    cut_recording,
    label_beats,
    read_recording,
)
from monitor.training.beat_trainer import split_training_beats  # noqa: E402
from monitor.training.evaluation import roc_auc  # noqa: E402

RECORDS = ("105", "108", "114", "116", "121", "123", "208_excerpt")
RESERVED = {"100", "106", "119", "200", "223"}
NORMAL_SYMBOLS = ["N", "L", "R", "e", "j"]
PCA_COMPONENTS = 4
NOISY_STRETCH = 0.5
EARLY = 0.15

Score = Callable[[np.ndarray], np.ndarray]


def read_part(data_dir: Path, part: str, name: str, fs: float) -> Recording:
    if name.split("_")[0] in RESERVED:
        raise SystemExit(f"record {name} is reserved for evaluation and is never read")
    return read_recording(data_dir / part / f"{name}.npy", fs, data_dir / part / f"{name}.csv")


def whole(train: Recording, test: Recording) -> Recording:
    """The record as one stream: the train part, then the test part (its annotations moved along)."""
    assert train.ann_samples is not None and test.ann_samples is not None
    assert train.ann_symbols is not None and test.ann_symbols is not None
    return Recording(
        np.concatenate((train.signal, test.signal)),
        train.fs,
        train.source.replace("/train/", "/"),
        "",
        np.concatenate((train.ann_samples, test.ann_samples + len(train.signal))),
        np.concatenate((train.ann_symbols, test.ann_symbols)),
    )


def detector_figures(labelled: LabelledBeats) -> dict[str, Any]:
    found = labelled.detected + labelled.extra
    return {
        "sensitivity": labelled.detected / max(1, labelled.detected + labelled.missed),
        "ppv": labelled.detected / max(1, found),
        "annotated": labelled.detected + labelled.missed,
        "missed": labelled.missed,
        "extra": labelled.extra,
    }


def pooled_detector(rows: list[dict[str, Any]]) -> dict[str, Any]:
    annotated = sum(row["annotated"] for row in rows)
    missed = sum(row["missed"] for row in rows)
    extra = sum(row["extra"] for row in rows)
    detected = annotated - missed
    return {
        "sensitivity": detected / annotated,
        "ppv": detected / (detected + extra),
        "annotated": annotated,
        "missed": missed,
        "extra": extra,
    }


def pca_scorer(train: np.ndarray, components: int = PCA_COMPONENTS) -> Score:
    """Mean absolute PCA reconstruction error of `[N, W, C]` windows, standardised per channel as the model is."""
    normalisation = Normalisation.fit(train)
    flat = normalisation.apply(train).reshape(len(train), -1)
    mean = flat.mean(axis=0)
    basis = np.linalg.svd(flat - mean, full_matrices=False)[2][:components]

    def score(x: np.ndarray) -> np.ndarray:
        centred = normalisation.apply(x).reshape(len(x), -1) - mean
        return np.abs(centred - centred @ basis.T @ basis).mean(axis=1)

    return score


def false_alarm_causes(labelled: LabelledBeats, score: np.ndarray, threshold: float) -> dict[str, int]:
    """The normal beats flagged, by cause (module docstring): noisy stretch, else early, else other."""
    flagged = (labelled.classes == "N") & labelled.scorable & (score > threshold)
    noisy = flagged & (labelled.stretch > NOISY_STRETCH)
    early = flagged & ~noisy & (labelled.earliness > EARLY)
    return {
        "noisy_stretch": int(noisy.sum()),
        "early": int(early.sum()),
        "other": int((flagged & ~noisy & ~early).sum()),
    }


def beat_figures(score: np.ndarray, classes: np.ndarray, scorable: np.ndarray, threshold: float) -> dict[str, Any]:
    """Beat-level figures of one record (or the pooled records); see the module docstring."""
    anomalous = np.isin(classes, ["S", "V", "F"])
    normal = classes == "N"
    use = (anomalous | normal) & scorable
    flagged = (score > threshold) & scorable
    tp, fp = int((flagged & anomalous).sum()), int((flagged & normal).sum())
    fn = int(anomalous.sum()) - tp
    out: dict[str, Any] = {
        "auc": roc_auc(score[use], anomalous[use]) if anomalous[use].any() and normal[use].any() else None,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None,
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
        "normal_flagged": fp / max(1, int(normal.sum())),
        "normal": int(normal.sum()),
        "anomalous": int(anomalous.sum()),
        "unscorable_normal": float((~scorable & normal).sum() / max(1, int(normal.sum()))),
        "unscorable_anomalous": float((~scorable & anomalous).sum() / max(1, int(anomalous.sum()))),
    }
    for name in ("S", "V", "F"):
        members = classes == name
        if members.any():
            out[f"recall_{name}"] = float((flagged & members).sum() / members.sum())
    return out


def scorers(artifact: Any, spec: BeatSpec, train_parts: list[tuple[Recording, LabelledBeats]]) -> dict[str, Any]:
    """(score function, threshold) of the model and of the PCA anchors fitted on the model's own training beats."""
    model = Scorer.from_artifact(artifact)
    hyper = artifact.metadata["training"]["hyperparameters"]
    quantile = float(artifact.metadata["threshold"]["params"].get("q", 0.99))
    beats = split_training_beats(
        train_parts,
        hyper.get("normal_symbols", NORMAL_SYMBOLS),
        hyper["validation_fraction"],
        hyper["calibration_fraction"],
    )
    out: dict[str, Any] = {"model": (lambda x: model.score_all(x).errors, artifact.threshold)}
    beat = [spec.channels.index("beat")]
    for name, channels in (("pca_beat", beat), ("pca_model_channels", list(range(len(spec.channels))))):
        pca = pca_scorer(beats.fit[:, :, channels])

        def score(x: np.ndarray, pca: Score = pca, channels: list[int] = channels) -> np.ndarray:
            return pca(x[:, :, channels])

        calibration_scores = score(beats.calibration) / spec.stretch_scale(beats.calibration_stretch)
        out[name] = (score, float(np.quantile(calibration_scores, quantile)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/mitdb-beats"))
    parser.add_argument("--data-dir", type=Path, default=Path("data/mitdb-dev"), help="train/ and test/ splits")
    parser.add_argument("--out", type=Path, default=Path("bench/beat_quality.json"))
    parser.add_argument("--context-gate", type=float, help="experiment: beats in a stretch above this are unscorable")
    args = parser.parse_args()
    torch.set_num_threads(1)
    artifact = load_artifact(args.model)
    spec = beat_spec(artifact.metadata, args.model)
    if spec is None:
        raise SystemExit(f"{args.model} is not a beat-mode model")
    fs = float(artifact.metadata["segmentation"]["trained_at_sample_rate_hz"])
    train_parts, test_parts, detector_whole, detector_test = [], {}, {}, {}
    for name in RECORDS:
        train, test = read_part(args.data_dir, "train", name, fs), read_part(args.data_dir, "test", name, fs)
        record = whole(train, test)
        detector_whole[name] = detector_figures(label_beats(record, cut_recording(record, spec)))
        train_parts.append((train, label_beats(train, cut_recording(train, spec))))
        test_parts[name] = label_beats(test, cut_recording(test, spec))
        detector_test[name] = detector_figures(test_parts[name])
    detector_whole["pooled"] = pooled_detector(list(detector_whole.values()))
    detector_test["pooled"] = pooled_detector(list(detector_test.values()))
    results: dict[str, Any] = {
        "model": str(args.model),
        "model_version": artifact.metadata.get("version"),
        "segmentation": artifact.metadata["segmentation"],
        "detector_whole_records": detector_whole,
        "detector_test_parts": detector_test,
        "context_gate": args.context_gate,
        "scorers": {},
    }
    for kind, (score_fn, threshold) in scorers(artifact, spec, train_parts).items():
        per_record: dict[str, Any] = {}
        pooled: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for name, labelled in test_parts.items():
            score = score_fn(labelled.windows) / spec.error_scale(labelled.stretch, labelled.qrs_correlation)
            if kind == "model":  # the model's score as the daemon's: at least its timing score
                score = np.maximum(score, spec.timing_score(labelled.earliness, labelled.rr_spread))
            scorable = labelled.scorable
            if args.context_gate is not None:
                scorable = scorable & (labelled.stretch <= args.context_gate)
            per_record[name] = beat_figures(score, labelled.classes, scorable, threshold)
            if kind == "model" and args.context_gate is None:
                per_record[name]["false_alarm_causes"] = false_alarm_causes(labelled, score, threshold)
            pooled.append((score, labelled.classes, scorable))
        per_record["pooled"] = beat_figures(
            *(np.concatenate(column) for column in zip(*pooled, strict=True)), threshold
        )
        if kind == "model" and args.context_gate is None:
            per_record["pooled"]["false_alarm_causes"] = {
                cause: sum(per_record[name]["false_alarm_causes"][cause] for name in test_parts)
                for cause in ("noisy_stretch", "early", "other")
            }
        results["scorers"][kind] = {"threshold": threshold, "records": per_record}
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _causes(row: dict[str, Any]) -> str:
    causes = row.get("false_alarm_causes")
    return "-" if causes is None else " / ".join(str(causes[name]) for name in ("noisy_stretch", "early", "other"))


def table(results: dict[str, Any]) -> str:
    """Markdown: one row per record and pooled; the model's figures with the PCA anchors' AUC and flagged share."""
    model, beat, channels = (
        results["scorers"][name]["records"] for name in ("model", "pca_beat", "pca_model_channels")
    )
    lines = [
        "| record | detector Se / PPV (whole) | Se / PPV (test part) | AUC | F1 | normal flagged | unscorable N / SVF "
        "| PCA beat: AUC, flagged | PCA model channels: AUC, flagged | false alarms: noisy stretch / early / other |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in (*RECORDS, "pooled"):
        whole_, test, row = results["detector_whole_records"][name], results["detector_test_parts"][name], model[name]
        lines.append(
            f"| {name} | {_pct(whole_['sensitivity'])} / {_pct(whole_['ppv'])} | {_pct(test['sensitivity'])} / "
            f"{_pct(test['ppv'])} | {_num(row['auc'])} | {_num(row['f1'])} | {_pct(row['normal_flagged'])} | "
            f"{_pct(row['unscorable_normal'])} / {_pct(row['unscorable_anomalous'])} | "
            f"{_num(beat[name]['auc'])}, {_pct(beat[name]['normal_flagged'])} | "
            f"{_num(channels[name]['auc'])}, {_pct(channels[name]['normal_flagged'])} | {_causes(row)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
