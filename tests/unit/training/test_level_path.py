"""The model's level path for machines with many channels: `monitor train --level-dim` records it, the artifact
loads it back and scores as the trained model did, and a path as wide as the channels is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from monitor.errors import ArtifactError
from monitor.model.artifact import METADATA_FILE, load_artifact
from monitor.model.scoring import Scorer
from monitor.training.trainer import TrainSettings, train
from tests.support import REPO, run_cli

EXCERPT = REPO / "data" / "smd-excerpt"
MACHINES = ("machine-1-3", "machine-2-4")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    output = tmp_path_factory.mktemp("level-path") / "model"
    settings = TrainSettings(
        train_data=[EXCERPT / f"{m}_train.npy" for m in MACHINES],
        window=30,
        stride=10,
        baseline="sensor",
        baseline_windows=20,
        output=output,
        embedding_dim=4,
        level_dim=8,
        score_scale="none",  # the threshold below is on the scores as the model gives them
        epochs=1,
        threads=1,
        report=False,
    )
    yield train(settings), output
    torch.set_num_threads(previous)


def test_the_artifact_records_the_level_path_and_scores_as_trained(trained):
    result, output = trained
    metadata = json.loads((output / METADATA_FILE).read_text())
    assert metadata["architecture"]["level_dim"] == 8
    assert metadata["training"]["hyperparameters"]["level_dim"] == 8
    loaded = load_artifact(output)
    assert loaded.model.level_dim == 8
    windows = result.calibration_windows
    trained_scores = Scorer(result.artifact.model, result.artifact.normalisation).score_all(windows).errors
    np.testing.assert_array_equal(Scorer.from_artifact(loaded).score_all(windows).errors, trained_scores)
    ranges = [item["calibration_windows"] for item in metadata["training"]["recordings"]]
    own = [np.quantile(trained_scores[start:end], 0.99) for start, end in ranges]
    assert float(np.median(own)) == pytest.approx(loaded.threshold)


def test_a_level_path_that_does_not_fit_the_channels_is_refused(trained, tmp_path):
    _, output = trained
    copy = tmp_path / "model"
    copy.mkdir()
    for item in output.iterdir():
        if item.is_file():
            (copy / item.name).write_bytes(item.read_bytes())
    metadata = json.loads((copy / METADATA_FILE).read_text())
    metadata["architecture"]["level_dim"] = 38
    (copy / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(ArtifactError, match="level_dim 38 does not fit 38 channel"):
        load_artifact(copy)

    data = [str(EXCERPT / f"{m}_train.npy") for m in MACHINES]
    shape = ("--window", "30", "--stride", "10", "--baseline", "sensor", "--baseline-windows", "20")
    done = run_cli(
        "train", "--train-data", *data, *shape, "--level-dim", "38", "--epochs", "1", "--output", str(tmp_path / "x")
    )
    assert done.returncode != 0
    assert "level_dim 38" in done.stderr and "38 channel" in done.stderr
    assert not (tmp_path / "x" / METADATA_FILE).exists()


def test_the_onnx_backend_scores_a_level_path_model_as_torch_does(trained):
    pytest.importorskip("onnxruntime")
    from monitor.model.onnx_backend import OnnxScorer

    result, output = trained
    artifact = load_artifact(output)
    windows = result.calibration_windows
    np.testing.assert_allclose(
        OnnxScorer(artifact).score_all(windows).errors,
        Scorer.from_artifact(artifact).score_all(windows).errors,
        rtol=1e-5,
        atol=1e-5,
    )


def test_by_default_a_sensor_baseline_model_of_many_channels_gets_a_level_path_and_score_scales():
    """38 channels: 32 (a sixth fewer) and scales; 8 channels, or a pooled baseline: neither; given values kept."""
    sensor = TrainSettings(train_data=[EXCERPT / "x.npy"], window=30, baseline="sensor", baseline_windows=20)
    assert sensor.resolved(38).level_dim == 32 and sensor.resolved(38).score_scale == "sensor"
    assert sensor.resolved(16).level_dim == 14
    assert (sensor.resolved(8).level_dim, sensor.resolved(8).score_scale) == (0, "none")
    pooled = TrainSettings(train_data=[EXCERPT / "x.npy"], window=30).resolved(38)
    assert (pooled.level_dim, pooled.score_scale) == (0, "none")
    given = TrainSettings(
        train_data=[EXCERPT / "x.npy"],
        window=30,
        baseline="sensor",
        baseline_windows=20,
        level_dim=0,
        score_scale="none",
    ).resolved(38)
    assert (given.level_dim, given.score_scale) == (0, "none")
