"""`python -m bench.lifecycle`: what episodes, the drift statistic and a shadow model make of the ECG5000 replay.

In process, on the decisions the daemon would make (tests/e2e/test_lifecycle_e2e.py shows the daemon publishes the
same episode events and counts the same shadow disagreements through Mosquitto):
- per-window alerts against episode events, for a few lifecycle policies, with the test split's beats dealt
  round-robin to 20 sensors as `monitor replay --sensors 20` does;
- the PSI (default drift settings) on the whole test split, on its normal beats, and on those with gain x1.5 from
  half-way;
- with `--shadow DIR`, how often that model decides otherwise than the live one on every beat.

    python -m bench.lifecycle --splits data/ecg5000/splits --shadow /tmp/shadow --out bench/LIFECYCLE.md

The shadow of bench/LIFECYCLE.md, a smaller model of the same recipe (about 5 minutes on one thread):

    monitor train --config configs/train-ecg5000.yaml --embedding-dim 16 --seed 7 --epochs 60 --patience 15 \
        --name ecg5000-shadow --version 0.2.0-e16s7 --output /tmp/shadow --no-report
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

from monitor.alerts.drift import DriftMonitor
from monitor.alerts.episodes import Decision, EpisodeTracker
from monitor.config.schema import DriftSettings, LifecycleSettings, ModelSettings
from monitor.model.engine import Engine, load_engine
from monitor.training.datasets import read_ucr

SENSORS = 20
POLICIES = [
    {"open_anomalous": 3, "open_window": 5, "resolve_normal": 3},
    {"open_anomalous": 3, "open_window": 5, "resolve_normal": 10},
    {"open_anomalous": 1, "open_window": 1, "resolve_normal": 1},
]
GAIN = 1.5


def episode_events(errors: np.ndarray, threshold: float, window: int, policy: dict) -> dict[str, int]:
    settings = LifecycleSettings(enabled=True, update_interval_seconds=3600, **policy)
    tracker = EpisodeTracker(settings.policy())
    counts = {"opened": 0, "flapping": 0, "updated": 0, "resolved": 0}
    for index, score in enumerate(errors):
        start = (index // SENSORS) * window
        decision = Decision(start, start + window, None, float(score), bool(score > threshold))
        for event in tracker.decide(f"sensor-{index % SENSORS:04d}", decision, 0.0):
            counts[event.kind] += 1
    return counts


def psi_trace(engine: Engine, windows: np.ndarray, batch: int = 64) -> list[float]:
    settings = DriftSettings()
    assert engine.calibration is not None, "the model records no calibration_scores"
    monitor = DriftMonitor(engine.calibration, settings.window_count, settings.min_windows)
    trace = []
    for start in range(0, len(windows), batch):
        monitor.observe(engine.score(windows[start : start + batch]).errors)
        trace.append(monitor.psi())
    return [value for value in trace if not math.isnan(value)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=Path, default=Path("data/ecg5000/splits"), help="holds test.txt.xz")
    parser.add_argument("--model", type=Path, default=Path("models/ecg5000"), help="the live model")
    parser.add_argument("--shadow", type=Path, help="a second artifact to compare with the live one")
    parser.add_argument("--out", type=Path, help="also write the report here (Markdown)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    live = load_engine(ModelSettings(path=args.model, device="cpu", threads=1))
    data = read_ucr(args.splits / "test.txt.xz")
    errors = live.score(data.windows).errors
    flagged = errors > live.threshold
    lines = [
        f"# Alert lifecycle on the ECG5000 test split ({len(errors)} beats, {SENSORS} sensors)",
        "",
        f"Live model {live.model.name} {live.model.version}, threshold {live.threshold:.4f}.",
        "",
        "| k of n opens, m resolves | per-window alerts | opened | flapping | resolved | episode events |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for policy in POLICIES:
        counts = episode_events(errors, live.threshold, live.window, policy)
        label = f"{policy['open_anomalous']} of {policy['open_window']}, m={policy['resolve_normal']}"
        lines.append(
            f"| {label} | {int(flagged.sum())} | {counts['opened']} | {counts['flapping']} | "
            f"{counts['resolved']} | {sum(counts.values())} |"
        )
    normal = data.windows[~data.is_anomaly(1)]
    shifted = normal.copy()
    shifted[len(normal) // 2 :] *= GAIN
    lines += [
        "",
        "| drift (PSI, last 1000 scores, from 200 on) | first | min | max | last |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, windows in (
        ("whole test split", data.windows),
        ("normal beats", normal),
        (f"normal beats, gain x{GAIN} from half-way", shifted),
    ):
        trace = psi_trace(live, windows)
        lines.append(f"| {name} | {trace[0]:.3f} | {min(trace):.3f} | {max(trace):.3f} | {trace[-1]:.3f} |")
    if args.shadow is not None:
        shadow = load_engine(ModelSettings(path=args.shadow, device="cpu", threads=1))
        shadow_flagged = shadow.score(data.windows).errors > shadow.threshold
        live_only, shadow_only = int(np.sum(flagged & ~shadow_flagged)), int(np.sum(~flagged & shadow_flagged))
        anomalous = data.is_anomaly(1)
        lines += [
            "",
            f"Shadow {shadow.model.name} {shadow.model.version} (threshold {shadow.threshold:.4f}): "
            f"disagrees on {live_only + shadow_only} of {len(errors)} beats "
            f"({(live_only + shadow_only) / len(errors):.1%}): live only {live_only}, shadow only {shadow_only}. "
            f"Recall live {np.mean(flagged[anomalous]):.3f}, shadow {np.mean(shadow_flagged[anomalous]):.3f}; "
            f"false-positive rate live {np.mean(flagged[~anomalous]):.4f}, "
            f"shadow {np.mean(shadow_flagged[~anomalous]):.4f}.",
        ]
    lines += ["", f"Made by `python -m bench.lifecycle {' '.join(sys.argv[1:])}`."]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out is not None:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
