"""Machines with many channels: the LSTM and its PCA yardstick on four Server Machine Dataset machines (38 channels).

    .venv/bin/python -m bench.smd_multichannel --data-dir DIR [--level-dims 0 16 24 32] [--seeds 0 1 2]
        [--epochs 30] [--jobs N] [--out FILE.json] [--markdown FILE.md] [--reuse FILE.json]

Each run is `monitor train` (RECIPE, one model on the four train halves, level path of width K; 0: none), then
`monitor evaluate --stride 10` on the four test halves, which scores the LSTM and the PCA yardstick on the same
windows. Every K is trained with the first seed; the K with the lowest validation loss (normal data, no test labels)
is trained again with the other seeds, then with every seed and `--score-scale sensor`. `--reuse` takes the matching
runs of an earlier results file (training is deterministic per seed). Results: JSON and two Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import structlog  # noqa: E402
import torch  # noqa: E402

from monitor.training.evaluate import EvaluateRequest, evaluate  # noqa: E402
from monitor.training.settings import TrainSettings  # noqa: E402
from monitor.training.trainer import train  # noqa: E402

MACHINES = ("machine-1-3", "machine-2-1", "machine-2-4", "machine-3-10")
RECIPE: dict[str, Any] = {
    "window": 30,
    "stride": 10,
    "baseline": "sensor",
    "baseline_windows": 100,
    "embedding_dim": 32,
    "batch_size": 64,
    "learning_rate": 0.003,
    "threads": 1,
    "report": False,
}


def figures(summary: dict[str, Any]) -> dict[str, Any]:
    """Pooled and per-machine ROC AUC and false-positive rate from one model's part of an evaluate summary."""
    return {
        "auc": summary["auc"],
        "fpr": summary["fpr"],
        "machines": {
            Path(item["data"]).name.removesuffix("_test.npy"): {"auc": item["auc"], "fpr": item["fpr"]}
            for item in summary["recordings"]
        },
    }


def by_machine(recordings: list[dict[str, Any]], key: str) -> dict[str, Any]:
    return {Path(item["data"]).name.removesuffix("_train.npy"): item[key] for item in recordings}


def row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


Job = tuple[Path, int, int, int, str]


def run(job: Job) -> dict[str, Any]:
    """Train one model and evaluate it with its yardstick on the test halves."""
    data_dir, level_dim, seed, epochs, score_scale = job
    torch.set_num_threads(1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory:
        settings = TrainSettings(
            train_data=[data_dir / f"{m}_train.npy" for m in MACHINES],
            output=Path(directory) / "model",
            level_dim=level_dim,
            score_scale=score_scale,
            seed=seed,
            epochs=epochs,
            **RECIPE,
        )
        metadata = train(settings).artifact.metadata
        request = EvaluateRequest(
            model=settings.output,
            data=[data_dir / f"{m}_test.npy" for m in MACHINES],
            labels=[data_dir / f"{m}_test_labels.npy" for m in MACHINES],
            stride=RECIPE["stride"],
        )
        summary = evaluate(request).summary
    held_out = metadata["held_out_false_alarms"]
    return {
        "level_dim": level_dim,
        "seed": seed,
        "score_scale": score_scale,
        "epochs": epochs,
        "epochs_run": metadata["training"]["epochs_run"],
        "best_epoch": metadata["training"]["best_epoch"],
        "validation_loss": metadata["training"]["best_validation_loss"],
        "false_alarms_validation": {
            "nominal": held_out["nominal"],
            "realised": held_out["realised"],
            "machines": by_machine(held_out["recordings"], "realised"),
            "machines_nominal": by_machine(held_out["recordings"], "nominal"),
            "calibration_share": held_out["calibration_share"],
        },
        "lstm": figures(summary),
        "pca": {"components": summary["pca"]["components"], **figures(summary["pca"])},
        "seconds": round(time.perf_counter() - started, 1),
    }


def scaled(item: dict[str, Any]) -> bool:
    return item.get("score_scale", "none") == "sensor"


def name_of(item: dict[str, Any]) -> str:
    return f"LSTM, level path K {item['level_dim']}{', score scale' if scaled(item) else ''}, seed {item['seed']}"


def yardsticks(runs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """PCA (the same windows in every run), without and with the score scale: (name, figures, validation alarms)."""
    chosen = [next((item for item in runs if scaled(item) == flag), None) for flag in (False, True)]
    return [
        (
            f"PCA yardstick ({item['pca']['components']} components){', score scale' if scaled(item) else ''}",
            item["pca"],
            item["false_alarms_validation"],
        )
        for item in chosen
        if item is not None
    ]


def table(runs: list[dict[str, Any]]) -> list[str]:
    """One row per run (the LSTM), then the PCA yardstick without and with the score scale."""
    header = ["model", "validation loss", "pooled ROC AUC", *(m.removeprefix("machine-") for m in MACHINES)]
    header += ["false alarms, test halves: pooled (most on a machine)", "nominal -> realised, validation"]

    def cells(part: dict[str, Any], nominal: float, realised: float) -> list[str]:
        machines = part["machines"]
        worst = max(item["fpr"] for item in machines.values())
        return [
            f"{part['auc']:.3f}",
            *(f"{machines[m]['auc']:.3f}" for m in MACHINES),
            f"{part['fpr']:.2%} ({worst:.2%})",
            f"{nominal:.2%} -> {realised:.2%}",
        ]

    lines = [row(header), "|" + "---|" * len(header)]
    for item in runs:
        held = item["false_alarms_validation"]
        rates = cells(item["lstm"], held["nominal"]["lstm"], held["realised"]["lstm"])
        lines.append(row([name_of(item), f"{item['validation_loss']:.4f}", *rates]))
    for name, pca, held in yardsticks(runs):
        rates = cells(pca, held["nominal"]["pca"], held["realised"]["pca"])
        lines.append(row([name, "", *rates]))
    return lines


def false_alarm_table(runs: list[dict[str, Any]], level_dim: int) -> list[str]:
    """Per machine, false alarms on the test halves, nominal (its calibration windows) and realised on its validation
    windows, for the first seed of `level_dim` without and with the score scale, and the PCA yardstick beside each;
    pooled, the nominal rate (the machines' median) and the share of all calibration windows above the threshold."""
    header = ["model", "nominal, pooled (all calibration windows)"]
    header += [f"{m.removeprefix('machine-')}: test, nominal -> realised" for m in MACHINES]
    lines = [row(header), "|" + "---|" * len(header)]
    for flag in (False, True):
        item = next((i for i in runs if i["level_dim"] == level_dim and scaled(i) == flag), None)
        if item is None:
            continue
        held = item["false_alarms_validation"]
        for model, name in (("lstm", name_of(item)), ("pca", f"PCA yardstick{', score scale' if flag else ''}")):
            rates = [
                f"{item[model]['machines'][m]['fpr']:.2%}, "
                f"{held['machines_nominal'][m][model]:.2%} -> {held['machines'][m][model]:.2%}"
                for m in MACHINES
            ]
            pooled = f"{held['nominal'][model]:.2%} ({held['calibration_share'][model]:.2%})"
            lines.append(row([name, pooled, *rates]))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="machine-*_{train,test,test_labels}.npy")
    parser.add_argument("--level-dims", type=int, nargs="+", default=[0, 16, 24, 32])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--jobs", type=int, default=1, help="models trained at once (default: 1)")
    parser.add_argument("--reuse", type=Path, help="an earlier results file whose matching runs are taken as they are")
    parser.add_argument("--out", type=Path, default=Path("bench/smd_multichannel.json"))
    parser.add_argument("--markdown", type=Path, default=Path("bench/smd_multichannel.md"))
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    previous = (
        {"recipe": {"epochs": args.epochs}, "runs": []} if args.reuse is None else json.loads(args.reuse.read_text())
    )
    reused = {key(item, previous["recipe"]["epochs"]): item for item in previous["runs"]}
    first, *others = args.seeds
    with multiprocessing.get_context("fork").Pool(max(1, args.jobs)) as pool:

        def runs_of(jobs: list[Job]) -> list[dict[str, Any]]:
            todo = [job for job in jobs if job_key(job) not in reused]
            done = dict(zip(map(job_key, todo), pool.map(run, todo, chunksize=1), strict=True))
            return [reused.get(job_key(job)) or done[job_key(job)] for job in jobs]

        runs = runs_of([(args.data_dir, k, first, args.epochs, "none") for k in args.level_dims])
        chosen = min(runs, key=lambda item: item["validation_loss"])["level_dim"]
        runs += runs_of([(args.data_dir, chosen, seed, args.epochs, "none") for seed in others])
        runs += runs_of([(args.data_dir, chosen, seed, args.epochs, "sensor") for seed in args.seeds])
    results = {"recipe": {**RECIPE, "epochs": args.epochs}, "chosen_level_dim": chosen, "runs": runs}
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    command = (
        f"python -m bench.smd_multichannel --level-dims {' '.join(map(str, args.level_dims))} "
        f"--seeds {' '.join(map(str, args.seeds))} --epochs {args.epochs}"
        + ("" if args.reuse is None else f" --reuse {args.reuse}")
    )
    markdown = [f"`{command}`", "", *table(runs), "", *false_alarm_table(runs, chosen)]
    args.markdown.write_text("\n".join(markdown) + "\n")
    print("\n".join(markdown))


def key(item: dict[str, Any], epochs: int) -> tuple[int, int, int, str]:
    """A run's identity: K, seed, epochs, score scale (runs recorded before these two were recorded: the file's
    epochs, no scale)."""
    return item["level_dim"], item["seed"], item.get("epochs", epochs), item.get("score_scale", "none")


def job_key(job: Job) -> tuple[int, int, int, str]:
    _, level_dim, seed, epochs, score_scale = job
    return level_dim, seed, epochs, score_scale


if __name__ == "__main__":
    main()
