"""Beat mode leave-one-record-out over the seven MIT-BIH dev records, in ANSI/AAMI EC57 terms.

    .venv/bin/python -m bench.beat_loro [--config configs/train-mitdb-beats.yaml] [--data-dir data/mitdb-dev]
        [--epochs N] [--set KEY=VALUE ...] [--jobs N] [--out bench/beat_loro.json] [--markdown bench/beat_loro.md]

For each record: a model is trained as `monitor train` trains the recipe (`beat_trainer.fit_beats`), on the
normal beats of the other six records' `train/` parts (the first 600 s; 100 s of the 208 excerpt), and scores the
held-out record whole (its train and test parts as one stream) as `monitor evaluate` and the daemon do. Each record
is thus scored by a model that never saw it. `--set` overrides the recipe's `beats:` settings (YAML values, e.g.
`--set dominant=false --set timing_quantile=null` cuts and scores beats as models before the dominant rhythm did);
`--epochs` overrides its epochs; `--jobs` trains that many folds at once, one process (and one thread) each.
Records 100, 106, 119, 200 and 223 are reserved and never read.

Results: the per-record and gross figures (`beat_data.aami_figures`) as JSON, and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

from bench.beat_quality import whole  # noqa: E402
from monitor.config.loading import read_yaml, validate  # noqa: E402
from monitor.ecg.beats import BeatSpec  # noqa: E402
from monitor.training.beat_data import (  # noqa: E402
    aami_counts,
    aami_figures,
    cut_recording,
    gross_counts,
    label_beats,
    read_recording,
)
from monitor.training.beat_trainer import BeatTrainSettings, aami_table, fit_beats, score_beats  # noqa: E402

RECORDS = ("105", "108", "114", "116", "121", "123", "208_excerpt")


def settings_of(config: Path, epochs: int | None, overrides: list[str]) -> BeatTrainSettings:
    data: dict[str, Any] = read_yaml(config)
    if epochs is not None:
        data["epochs"] = epochs
    for item in overrides:
        key, _, value = item.partition("=")
        data.setdefault("beats", {})[key] = yaml.safe_load(value)
    return validate(BeatTrainSettings, data, str(config))


def fold(
    held: str, settings: BeatTrainSettings, spec: BeatSpec, train_parts: dict[str, Any], records: dict[str, Any]
) -> tuple[dict[str, int], dict[str, Any]]:
    """The held-out record's counts, scored by a model trained on the other records, and the fold's settings."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    fitted = fit_beats(settings, [train_parts[name] for name in RECORDS if name != held], spec)
    threshold = fitted.calibration.threshold
    counts = aami_counts(records[held], score_beats(fitted.scorer, fitted.spec, records[held]) > threshold)
    return counts, {
        "threshold": threshold,
        "stretch_limit": fitted.spec.stretch_limit,
        "timing_gain": fitted.spec.timing_gain,
        "best_epoch": fitted.best_epoch,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/train-mitdb-beats.yaml"))
    parser.add_argument("--data-dir", type=Path, default=Path("data/mitdb-dev"), help="train/ and test/ splits")
    parser.add_argument("--epochs", type=int, help="default: the recipe's")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a beats: setting")
    parser.add_argument("--jobs", type=int, default=1, help="folds trained at once (default: 1)")
    parser.add_argument("--out", type=Path, default=Path("bench/beat_loro.json"))
    parser.add_argument("--markdown", type=Path, default=Path("bench/beat_loro.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = settings_of(args.config, args.epochs, args.set)
    spec, fs = settings.beats.spec(), settings.sample_rate
    train_parts, records = {}, {}
    for name in RECORDS:
        train, test = (read_recording(args.data_dir / part / f"{name}.npy", fs, args.data_dir / part / f"{name}.csv")
                       for part in ("train", "test"))  # fmt: skip
        train_parts[name] = (train, label_beats(train, cut_recording(train, spec)))
        record = whole(train, test)
        records[name] = label_beats(record, cut_recording(record, spec))
    run = partial(fold, settings=settings, spec=spec, train_parts=train_parts, records=records)
    with multiprocessing.get_context("fork").Pool(max(1, args.jobs)) as pool:
        outcomes = dict(zip(RECORDS, pool.map(run, RECORDS, chunksize=1), strict=True))
    counts = [outcomes[name][0] for name in RECORDS]
    rows = {name: aami_figures(outcomes[name][0]) for name in RECORDS}
    folds = {name: outcomes[name][1] for name in RECORDS}
    results = {
        "config": str(args.config),
        "epochs": settings.epochs,
        "overrides": args.set,
        "beats": settings.beats.model_dump(mode="json"),
        "records": rows,
        "gross": aami_figures(gross_counts(counts)),
        "folds": folds,
    }
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    command = " ".join(["python -m bench.beat_loro", f"--epochs {settings.epochs}", *(f"--set {s}" for s in args.set)])
    table = aami_table(rows, results["gross"]).splitlines()
    markdown = [f"`{command}`", "", f"| {table[0]} |", "|" + "---|" * len(table[0].split(" | "))]
    markdown += [f"| {line} |" for line in table[1:]]
    args.markdown.write_text("\n".join(markdown) + "\n")
    print("\n".join(markdown))


if __name__ == "__main__":
    main()
