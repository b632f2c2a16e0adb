"""What `monitor train` and `monitor evaluate` do with only data arguments: one torch thread, the bundled beat
recipe's hyperparameters in beat mode, a model named after its directory, the small-calibration warning in both
modes; and no --help text that points at documents the repository does not hold."""

from __future__ import annotations

import re

import numpy as np
import pytest
import structlog
import torch
import yaml
from structlog.testing import LogCapture

from monitor.cli import build_parser, train_settings
from monitor.model.artifact import read_metadata
from monitor.training import trainer
from monitor.training.beat_trainer import BeatTrainSettings, train_beats
from monitor.training.trainer import TrainSettings, train
from tests.support import REPO

BEAT_RECIPE = REPO / "configs" / "train-mitdb-beats.yaml"
TRAIN = REPO / "data" / "mitdb-dev" / "train"
DATA_AND_IDENTITY = {
    "segmentation",
    "sample_rate",
    "train_data",
    "annotations",
    "evaluate_data",
    "evaluate_annotations",
    "normal_symbols",
    "output",
    "name",
    "version",
}


def settings_of(*argv: str) -> TrainSettings:
    return train_settings(build_parser().parse_args(["train", *argv]))


def test_beat_mode_with_only_data_arguments_trains_as_the_bundled_beat_recipe():
    settings = settings_of(
        "--segmentation", "beats", "--sample-rate", "360", "--train-data", "a.npy", "--annotations", "a.csv"
    )
    assert isinstance(settings, BeatTrainSettings)
    recipe = yaml.safe_load(BEAT_RECIPE.read_text())
    for key in recipe.keys() - DATA_AND_IDENTITY - {"beats", "threshold"}:
        assert getattr(settings, key) == recipe[key], key
    assert settings.beats.model_dump() == recipe["beats"]
    assert settings.threshold.method == recipe["threshold"]["method"]
    assert settings.threshold.params == recipe["threshold"]["params"] == {"q": 0.995}  # not fixed mode's 0.99
    assert (settings.epochs, settings.patience, settings.batch_size, settings.noise_std) == (30, 10, 32, 0.15)
    # the recipe with the data overridden on the command line gives the same settings
    overridden = settings_of("--config", str(BEAT_RECIPE), "--train-data", "a.npy", "--annotations", "a.csv")
    assert overridden.model_dump(exclude=DATA_AND_IDENTITY) == settings.model_dump(exclude=DATA_AND_IDENTITY)


def test_fixed_mode_defaults_one_thread_and_names_the_model_after_its_directory():
    settings = settings_of("--train-data", "x.txt", "--output", "models/pumps")
    assert (settings.threads, settings.name, settings.epochs, settings.patience) == (1, "pumps", 150, 30)
    assert settings_of("--train-data", "x.txt").name == "model"  # models/model, the default output
    assert settings_of("--train-data", "x.txt", "--output", "m/p", "--name", "n").name == "n"


def test_help_gives_the_defaults_of_both_modes_and_cites_no_missing_document():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    train_help = " ".join(commands["train"].format_help().split())
    assert "(default: 150; with --segmentation beats: 30)" in train_help
    assert "(default: 30; with --segmentation beats: 10)" in train_help
    assert "0 = one per core (default: 1)" in train_help
    evaluate_help = " ".join(commands["evaluate"].format_help().split())
    assert "--threads" in evaluate_help and "(default 1)" in evaluate_help
    watch_help = " ".join(commands["watch"].format_help().split())
    assert "(default 3)" in watch_help
    run_help = " ".join(commands["run"].format_help().split())
    assert "retries with backoff" in run_help
    for name, command in commands.items():
        text = command.format_help().lower()
        assert not re.search(r"contract\W+section|\bissues?\s*#?\d", text), name


def test_training_runs_on_one_thread_and_records_it(tmp_path):
    windows = np.sin(np.linspace(0, 60, 80 * 20)).reshape(80, 20).astype(np.float32)
    windows += np.random.default_rng(0).normal(0, 0.05, windows.shape).astype(np.float32)
    np.save(tmp_path / "windows.npy", windows)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train(
            TrainSettings(
                train_data=tmp_path / "windows.npy", output=tmp_path / "tiny", embedding_dim=4, epochs=1, report=False
            )
        )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)
    metadata = read_metadata(tmp_path / "tiny")
    assert metadata["training"]["hyperparameters"]["threads"] == 1
    assert (metadata["name"], metadata["version"][:2]) == ("tiny", "20")


@pytest.mark.slow
def test_beat_training_warns_of_a_small_calibration_set(tmp_path, monkeypatch):
    signal = np.load(TRAIN / "123.npy")[: 150 * 360]
    np.save(tmp_path / "short.npy", signal)
    annotations = [line for line in (TRAIN / "123.csv").read_text().splitlines()]
    kept = [annotations[0]] + [line for line in annotations[1:] if int(line.split(",")[0]) < len(signal)]
    (tmp_path / "short.csv").write_text("\n".join(kept) + "\n")
    settings = BeatTrainSettings(
        train_data=[tmp_path / "short.npy"],
        annotations=[tmp_path / "short.csv"],
        sample_rate=360,
        output=tmp_path / "beats",
        embedding_dim=4,
        epochs=1,
        report=False,
    )
    logs = LogCapture()  # the trainer's own logger, whatever an earlier test configured structlog to
    monkeypatch.setattr(trainer, "log", structlog.wrap_logger(None, processors=[logs]))
    result, _ = train_beats(settings)
    warnings = [entry for entry in logs.entries if entry["event"] == "calibration_set_small"]
    assert len(warnings) == 1 and warnings[0]["beats"] == result.calibration.n_windows < 200
    assert "calibration windows" in warnings[0]["message"]
