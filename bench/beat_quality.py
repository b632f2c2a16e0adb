"""Beat mode on MIT-BIH: the detector's sensitivity and PPV, and beat-level quality of the LSTM autoencoder next to PCA.

    .venv/bin/python -m bench.beat_quality --data-dir PATH/TO/mitdb-dev --out bench/beat_quality.json

Per record of the dev set (PROVENANCE.md there; records 100, 106, 119, 200, 223 are reserved and never read):
the beats the streaming detector finds are matched to the annotated beats (150 ms). The first third of each
record (600 s; 100 s of the 5-minute 208 excerpt) is the training part: its scorable normal (AAMI N) beats
are pooled; 15 % of them (seeded) are held out for early stopping and the threshold (the 99th percentile of
their scores: threshold from normal beats only). The rest of every record is the test part. Figures on the
test part, per record and pooled:

- auc: ROC AUC of the score, anomalous (S, V, F) against normal (N), over the matched scorable beats;
- f1, precision, recall at the threshold, with unscorable beats counted as not flagged;
- normal_flagged: flagged N beats / all N beats of the part (the false-alarm share a user sees);
- unscorable: share of beats marked unscorable by the signal-quality measure, per AAMI class.

Variants: the model input channels (`beat`; `beat,template_diff`; `beat,template_diff,rr`), each scored by
PCA (4 components, the issue's anchor) and, for the variants named by --ae, by the LSTM autoencoder trained
as `monitor train` trains it. Results: a JSON file and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from monitor.artifact import Normalisation  # noqa: E402
from monitor.beatdata import LabelledBeats, Recording, cut_recording, label_beats  # noqa: E402
from monitor.beats import CHANNELS, BeatSpec  # noqa: E402
from monitor.evaluation import roc_auc  # noqa: E402

RECORDS = ("105", "108", "114", "116", "121", "123", "208_excerpt")
RESERVED = {"100", "106", "119", "200", "223"}
TRAIN_SECONDS = {"208_excerpt": 100.0}
DEFAULT_TRAIN_SECONDS = 600.0
VARIANTS = {
    "beat": ("beat",),
    "template": ("template_diff",),
    "template+rr": ("template_diff", "rr"),
    "beat+template": ("beat", "template_diff"),
    "beat+template+rr": CHANNELS,
}


def load_record(data_dir: Path, name: str) -> Recording:
    if name.split("_")[0] in RESERVED:
        raise SystemExit(f"record {name} is reserved for evaluation and is never read")
    with np.load(data_dir / f"{name}.npz") as z:
        return Recording(z["signal"].astype(np.float64), float(z["fs"]), name, "", z["ann_sample"], z["ann_symbol"])


def pca_scorer(train: np.ndarray, components: int = 4):
    mean = train.mean(axis=0)
    _, _, vt = np.linalg.svd(train - mean, full_matrices=False)
    basis = vt[:components]

    def score(x: np.ndarray) -> np.ndarray:
        centred = x - mean
        return np.abs(centred - centred @ basis.T @ basis).mean(axis=1)

    return score


def ae_scorer(train: np.ndarray, validation: np.ndarray, epochs: int, seed: int):
    from monitor.training import TrainSettings, fit_model

    settings = TrainSettings(
        train_data=Path("unused"),
        embedding_dim=32,
        epochs=epochs,
        batch_size=32,
        learning_rate=0.002,
        patience=10,
        lr_patience=4,
        noise_std=0.15,
        seed=seed,
        threads=1,
    )
    normalisation = Normalisation.fit(train)
    model, _, _, best_epoch = fit_model(settings, normalisation.apply(train), normalisation.apply(validation))

    def score(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            batch = torch.from_numpy(normalisation.apply(x))
            return torch.cat([(model(b) - b).abs().mean(dim=(1, 2)) for b in batch.split(512)]).numpy()

    return score, best_epoch


def figures(score: np.ndarray, classes: np.ndarray, scorable: np.ndarray, threshold: float) -> dict[str, Any]:
    labelled = np.isin(classes, ["N", "S", "V", "F"])
    anomalous = np.isin(classes, ["S", "V", "F"])
    normal = classes == "N"
    flagged = (score > threshold) & scorable
    use = labelled & scorable
    tp = int((flagged & anomalous).sum())
    fp = int((flagged & normal).sum())
    fn = int((~flagged & anomalous).sum())
    out = {
        "auc": roc_auc(score[use], anomalous[use]) if use.any() else float("nan"),
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else float("nan"),
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan"),
        "normal_flagged": fp / max(1, int(normal.sum())),
        "n_normal": int(normal.sum()),
        "n_anomalous": int(anomalous.sum()),
    }
    for name in ("S", "V", "F"):
        members = classes == name
        if members.any():
            out[f"recall_{name}"] = float((flagged & members).sum() / members.sum())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="the mitdb-dev directory (.npz files)")
    parser.add_argument("--out", type=Path, default=Path("bench/beat_quality.json"))
    parser.add_argument(
        "--ae", default="beat+template+rr", help="comma-separated variants also scored by the autoencoder"
    )
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = BeatSpec()
    started = time.perf_counter()
    records: dict[str, tuple[Recording, LabelledBeats]] = {}
    for name in RECORDS:
        recording = load_record(args.data_dir, name)
        records[name] = (recording, label_beats(recording, cut_recording(recording, spec)))
    detector = {}
    for name, (_, labelled) in records.items():
        sens = labelled.detected / (labelled.detected + labelled.missed)
        ppv = labelled.detected / (labelled.detected + labelled.extra)
        detector[name] = {"sensitivity": sens, "ppv": ppv, "missed": labelled.missed, "extra": labelled.extra}
    totals = np.array([[lb.detected, lb.missed, lb.extra] for _, lb in records.values()]).sum(axis=0)
    detector["pooled"] = {
        "sensitivity": totals[0] / (totals[0] + totals[1]),
        "ppv": totals[0] / (totals[0] + totals[2]),
    }
    cut_seconds = time.perf_counter() - started

    parts: dict[str, dict[str, np.ndarray]] = {}
    for name, (recording, labelled) in records.items():
        split = int(TRAIN_SECONDS.get(name, DEFAULT_TRAIN_SECONDS) * recording.fs)
        in_train = labelled.r_seq < split
        parts[name] = {
            "train": in_train,
            "windows": labelled.windows,
            "classes": labelled.classes,
            "scorable": labelled.scorable,
        }
    unscorable = {}
    for name, part in parts.items():
        test = ~part["train"]
        unscorable[name] = {
            cls: float((~part["scorable"][test & (part["classes"] == cls)]).mean())
            for cls in ("N", "S", "V", "F")
            if (test & (part["classes"] == cls)).any()
        }
    rng = np.random.default_rng(args.seed)
    results: dict[str, Any] = {
        "detector": detector,
        "unscorable_test": unscorable,
        "cut_seconds": round(cut_seconds, 1),
        "models": {},
    }
    for variant, channels in VARIANTS.items():
        index = [CHANNELS.index(c) for c in channels]
        normal_train = np.concatenate(
            [p["windows"][p["train"] & (p["classes"] == "N") & p["scorable"]][:, :, index] for p in parts.values()]
        )
        order = rng.permutation(len(normal_train))
        n_hold = int(0.15 * len(order))
        fit_w, hold_w = normal_train[order[n_hold:]], normal_train[order[:n_hold]]
        scorers = {}
        norm = Normalisation.fit(fit_w)
        pca = pca_scorer(norm.apply(fit_w).reshape(len(fit_w), -1))
        scorers["pca"] = lambda x, pca=pca, norm=norm: pca(norm.apply(x).reshape(len(x), -1))
        if variant in args.ae.split(","):
            t0 = time.perf_counter()
            scorers["lstm_ae"], best = ae_scorer(fit_w, hold_w, args.epochs, args.seed)
            print(f"{variant}: autoencoder trained in {time.perf_counter() - t0:.0f} s (best epoch {best})", flush=True)
        for kind, scorer in scorers.items():
            threshold = float(np.quantile(scorer(hold_w), 0.99))
            per_record, pooled_scores, pooled_classes, pooled_scorable = {}, [], [], []
            for name, part in parts.items():
                test = ~part["train"]
                score = scorer(part["windows"][test][:, :, index])
                per_record[name] = figures(score, part["classes"][test], part["scorable"][test], threshold)
                pooled_scores.append(score)
                pooled_classes.append(part["classes"][test])
                pooled_scorable.append(part["scorable"][test])
            per_record["pooled"] = figures(
                np.concatenate(pooled_scores),
                np.concatenate(pooled_classes),
                np.concatenate(pooled_scorable),
                threshold,
            )
            results["models"][f"{kind}:{variant}"] = {
                "threshold": threshold,
                "train_beats": len(fit_w),
                "records": per_record,
            }
    args.out.write_text(json.dumps(results, indent=1, default=float) + "\n")
    print_table(results)


def print_table(results: dict[str, Any]) -> None:
    det = results["detector"]
    print("detector  " + "  ".join(f"{name}: Se {v['sensitivity']:.4f} PPV {v['ppv']:.4f}" for name, v in det.items()))
    for name, rows in results["unscorable_test"].items():
        print(f"unscorable {name}: " + ", ".join(f"{cls} {share:.3f}" for cls, share in rows.items()))
    for model, data in results["models"].items():
        print(f"\n{model} (threshold {data['threshold']:.4g}, {data['train_beats']} training beats)")
        print(
            f"{'record':12} {'AUC':>6} {'F1':>6} {'prec':>6} {'recall':>6} {'N flagged':>9} "
            f"{'rec S':>6} {'rec V':>6} {'rec F':>6}"
        )
        for name, f in data["records"].items():
            print(
                f"{name:12} {f['auc']:6.3f} {f['f1']:6.3f} {f['precision']:6.3f} {f['recall']:6.3f} "
                f"{100 * f['normal_flagged']:8.2f}% "
                + " ".join(f"{f.get('recall_' + c, float('nan')):6.3f}" for c in "SVF")
            )


if __name__ == "__main__":
    main()
