"""Machines with many channels: the LSTM and its PCA yardstick on four Server Machine Dataset machines (38 channels).

    .venv/bin/python -m bench.smd_multichannel --data-dir ../shared/data/smd-dev [--level-dims 0 16 24 32]
        [--seeds 0 1 2] [--epochs 30] [--jobs N] [--out bench/smd_multichannel.json]
        [--markdown bench/smd_multichannel.md]

Each run is `monitor train` (the library's `train`, as the command runs it) with one model on the four machines'
train halves: windows 30 / stride 10, `--baseline sensor --baseline-windows 100`, embedding 32, batch 64, learning
rate 0.003, one thread, the level path of width K (`--level-dims`; 0: none). Then `monitor evaluate --stride 10`
(the library's `evaluate`) on the four test halves, which gives the LSTM's and the PCA yardstick's figures on the
same windows. Every K is trained with the first seed; the K with the lowest validation loss (the last windows
before each train half's calibration part: normal data, no test labels) is trained again with the other seeds.

Results: every run's validation loss, realised false alarms on the validation windows against the nominal rate,
and per machine and pooled ROC AUC and false-positive rate on the test halves, as JSON and a Markdown table.
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


def run(job: tuple[Path, int, int, int]) -> dict[str, Any]:
    """Train one model and evaluate it with its yardstick on the test halves."""
    data_dir, level_dim, seed, epochs = job
    torch.set_num_threads(1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory:
        settings = TrainSettings(
            train_data=[data_dir / f"{m}_train.npy" for m in MACHINES],
            output=Path(directory) / "model",
            level_dim=level_dim,
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
        "epochs_run": metadata["training"]["epochs_run"],
        "best_epoch": metadata["training"]["best_epoch"],
        "validation_loss": metadata["training"]["best_validation_loss"],
        "false_alarms_validation": {
            "nominal": held_out["nominal"],
            "realised": held_out["realised"],
            "machines": {
                Path(item["data"]).name.removesuffix("_train.npy"): item["realised"] for item in held_out["recordings"]
            },
        },
        "lstm": figures(summary),
        "pca": {"components": summary["pca"]["components"], **figures(summary["pca"])},
        "seconds": round(time.perf_counter() - started, 1),
    }


def table(runs: list[dict[str, Any]]) -> list[str]:
    """One row per run (the LSTM), then the PCA yardstick (the same windows in every run)."""
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

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for item in runs:
        name = f"LSTM, level path K {item['level_dim']}, seed {item['seed']}"
        held = item["false_alarms_validation"]
        rates = cells(item["lstm"], held["nominal"]["lstm"], held["realised"]["lstm"])
        lines.append("| " + " | ".join([name, f"{item['validation_loss']:.4f}", *rates]) + " |")
    pca, held = runs[0]["pca"], runs[0]["false_alarms_validation"]
    rates = cells(pca, held["nominal"]["pca"], held["realised"]["pca"])
    lines.append("| " + " | ".join([f"PCA yardstick ({pca['components']} components)", "", *rates]) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="machine-*_{train,test,test_labels}.npy")
    parser.add_argument("--level-dims", type=int, nargs="+", default=[0, 16, 24, 32])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--jobs", type=int, default=1, help="models trained at once (default: 1)")
    parser.add_argument("--out", type=Path, default=Path("bench/smd_multichannel.json"))
    parser.add_argument("--markdown", type=Path, default=Path("bench/smd_multichannel.md"))
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    first, *others = args.seeds
    with multiprocessing.get_context("fork").Pool(max(1, args.jobs)) as pool:
        runs = pool.map(run, [(args.data_dir, k, first, args.epochs) for k in args.level_dims], chunksize=1)
        chosen = min(runs, key=lambda item: item["validation_loss"])["level_dim"]
        runs += pool.map(run, [(args.data_dir, chosen, seed, args.epochs) for seed in others], chunksize=1)
    results = {"recipe": {**RECIPE, "epochs": args.epochs}, "chosen_level_dim": chosen, "runs": runs}
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    command = (
        f"python -m bench.smd_multichannel --level-dims {' '.join(map(str, args.level_dims))} "
        f"--seeds {' '.join(map(str, args.seeds))} --epochs {args.epochs}"
    )
    markdown = [f"`{command}`", "", *table(runs)]
    args.markdown.write_text("\n".join(markdown) + "\n")
    print("\n".join(markdown))


if __name__ == "__main__":
    main()
