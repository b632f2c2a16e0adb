"""A CSV recording with a header line, through `monitor train` and `monitor evaluate` in this process: the header's
channel names are recorded in the model, and a recording whose header names other channels is one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monitor.cli import main
from monitor.model.artifact import read_metadata


@pytest.fixture(autouse=True)
def unconfigured_logging(monkeypatch):
    """The commands run in this process would configure structlog for the whole session (its loggers cache that
    configuration), and later tests that capture log lines would see none."""
    monkeypatch.setattr("monitor.telemetry.log.configure_logging", lambda *args, **kwargs: None)


def write_csv(path, header: str | None, samples: np.ndarray) -> None:
    rows = "".join(",".join(f"{value:.5f}" for value in row) + "\n" for row in samples)
    path.write_text(("" if header is None else header + "\n") + rows)


def test_header_names_recorded_by_train_and_checked_by_evaluate(tmp_path, capsys):
    t = np.arange(3000)
    samples = np.stack([np.sin(t / 7), np.cos(t / 11)], 1) + np.random.default_rng(0).normal(0, 0.05, (3000, 2))
    write_csv(tmp_path / "train.csv", "flow,pressure", samples)
    write_csv(tmp_path / "test.csv", "flow,pressure", samples[:600])
    write_csv(tmp_path / "other.csv", "flow,temperature", samples[:600])
    (tmp_path / "labels.txt").write_text("0\n" * 600)
    previous = torch.get_num_threads()
    try:
        model = tmp_path / "pumps"
        common = ["--embedding-dim", "4", "--epochs", "1", "--no-report"]
        assert (
            main(
                [
                    "train",
                    "--train-data",
                    str(tmp_path / "train.csv"),
                    "--window",
                    "20",
                    "--output",
                    str(model),
                    *common,
                ]
            )
            == 0
        )
        assert read_metadata(model)["architecture"]["channel_names"] == ["flow", "pressure"]
        assert read_metadata(model)["name"] == "pumps"
        capsys.readouterr()
        evaluate = ["evaluate", "--model", str(model), "--labels", str(tmp_path / "labels.txt"), "--json", "--data"]
        torch.set_num_threads(2)
        assert main([*evaluate, str(tmp_path / "test.csv")]) == 0
        assert torch.get_num_threads() == 1  # evaluate's default, as train's
        assert main([*evaluate, str(tmp_path / "other.csv")]) == 2
    finally:
        torch.set_num_threads(previous)
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"monitor: error: {tmp_path / 'other.csv'}: the header names the channels flow,temperature, the model's are "
        "flow,pressure"
    )
