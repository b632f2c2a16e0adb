"""The model artifact: a faithful round trip, and one clear refusal for every broken directory."""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from monitor.errors import ArtifactError
from monitor.model.artifact import METADATA_FILE, WEIGHTS_FILE, load_artifact, read_metadata, save_artifact
from monitor.model.autoencoder import LSTMAutoencoder
from monitor.model.pca import PCA_FILE
from monitor.model.scoring import Scorer
from monitor.training.datasets import read_ucr
from monitor.training.trainer import TrainSettings, train
from tests.support import SPLITS, run_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained in-process on 80 real normal beats: the artifact `monitor train` writes."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("artifact")
    train_file = root / "train.txt"
    with lzma.open(SPLITS / "train_normal.txt.xz", "rt") as handle:
        train_file.write_text("".join(handle.readlines()[:80]))
    settings = TrainSettings(
        train_data=train_file,
        output=root / "model",
        name="tiny",
        version="0.0.1",
        embedding_dim=4,
        epochs=1,
        threads=1,
        seed=3,
        report=False,
    )
    result = train(settings)
    yield result, root / "model"
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def beats():
    return read_ucr(SPLITS / "test.txt.xz").windows[:40]


@pytest.fixture
def artifact_copy(trained, tmp_path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(trained[1], target)
    return target


def edit_metadata(directory: Path, change) -> None:
    path = directory / METADATA_FILE
    metadata = json.loads(path.read_text())
    change(metadata)
    path.write_text(json.dumps(metadata))


def refusal(directory: Path, match: str) -> str:
    with pytest.raises(ArtifactError, match=match) as error:
        load_artifact(directory)
    message = str(error.value)
    assert "\n" not in message and message.strip() == message
    return message


# --- round trip ---------------------------------------------------------------------------------


def test_round_trip_scores_and_metadata(trained, beats):
    result, directory = trained
    assert sorted(p.name for p in directory.iterdir()) == [METADATA_FILE, WEIGHTS_FILE, PCA_FILE]
    loaded = load_artifact(directory)
    assert (loaded.window, loaded.channels, loaded.name, loaded.version) == (140, 1, "tiny", "0.0.1")
    assert loaded.threshold == result.calibration.threshold
    np.testing.assert_array_equal(loaded.normalisation.mean, result.artifact.normalisation.mean)
    np.testing.assert_array_equal(loaded.normalisation.std, result.artifact.normalisation.std)
    for key, value in result.artifact.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    before = Scorer.from_artifact(result.artifact).score(beats).errors
    after = Scorer.from_artifact(loaded).score(beats).errors
    np.testing.assert_array_equal(after, before)
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_metadata_holds_the_documented_fields(trained):
    result, directory = trained
    metadata = json.loads((directory / METADATA_FILE).read_text())
    assert metadata == read_metadata(directory)
    assert metadata["format"] == "monitor-model" and metadata["format_version"] == 1
    assert metadata["architecture"] == {"type": "lstm_autoencoder", "window": 140, "channels": 1, "embedding_dim": 4}
    assert metadata["normalisation"]["type"] == "standard"
    assert metadata["normalisation"]["mean"] == pytest.approx(result.artifact.normalisation.mean.tolist())
    assert len(metadata["normalisation"]["std"]) == 1 and metadata["normalisation"]["std"][0] > 0
    assert metadata["error_measure"] == "mean_absolute_error"
    threshold = metadata["threshold"]
    assert threshold["value"] == result.calibration.threshold
    assert threshold["method"] == "quantile" and threshold["params"] == {"q": 0.99}
    assert threshold["n_windows"] == 12  # 15 % of 80 split off for calibration
    train_file = Path(metadata["training"]["data"])
    assert metadata["training"]["data_sha256"] == hashlib.sha256(train_file.read_bytes()).hexdigest()
    assert metadata["version"] == "0.0.1" and metadata["name"] == "tiny"
    assert metadata["created_at"].endswith("+00:00") and metadata["created_at"][:4].isdigit()
    assert "evaluation" in metadata
    weights = directory / WEIGHTS_FILE
    assert metadata["weights"] == {"file": WEIGHTS_FILE, "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}


def test_files_are_readable_by_the_service_user(trained):
    # The daemon runs as a systemd DynamicUser: files keep the usual umask mode, not a temp file's 0600.
    directory = trained[1]
    umask = os.umask(0)
    os.umask(umask)
    for name in (METADATA_FILE, WEIGHTS_FILE):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o666 & ~umask, name
    assert not list(directory.glob("*.tmp")) and not list(directory.glob(".*.tmp"))


def test_save_over_an_existing_artifact_replaces_it(tmp_path, trained):
    metadata = {
        key: value
        for key, value in json.loads((trained[1] / METADATA_FILE).read_text()).items()
        if key not in ("format", "format_version", "weights")
    }
    torch.manual_seed(0)
    first = LSTMAutoencoder(1, 4)
    save_artifact(tmp_path / "m", first, metadata)
    torch.manual_seed(1)
    second = LSTMAutoencoder(1, 4)
    save_artifact(tmp_path / "m", second, metadata)
    loaded = load_artifact(tmp_path / "m")
    assert torch.equal(loaded.model.output.weight, second.output.weight)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [METADATA_FILE, WEIGHTS_FILE]


# --- refusals -----------------------------------------------------------------------------------


def test_missing_directory(tmp_path):
    refusal(tmp_path / "nowhere", "model artifact directory not found")


def test_missing_metadata(artifact_copy):
    (artifact_copy / METADATA_FILE).unlink()
    refusal(artifact_copy, "incomplete model artifact: model.json is missing")


def test_missing_weights(artifact_copy):
    (artifact_copy / WEIGHTS_FILE).unlink()
    refusal(artifact_copy, "incomplete model artifact: model.safetensors is missing")


def test_truncated_weights(artifact_copy):
    weights = artifact_copy / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    refusal(artifact_copy, "checksum mismatch")


def test_flipped_byte_in_the_weights(artifact_copy):
    weights = artifact_copy / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # inside the tensor data: still a well-formed safetensors file
    weights.write_bytes(bytes(data))
    message = refusal(artifact_copy, "checksum mismatch: the weights are truncated or were altered")
    assert WEIGHTS_FILE in message


def test_invalid_json(artifact_copy):
    (artifact_copy / METADATA_FILE).write_text('{"format": "monitor-model", "format_version": 1,')
    refusal(artifact_copy, "model.json: not valid JSON")


def test_not_an_artifact(artifact_copy):
    (artifact_copy / METADATA_FILE).write_text("[1, 2, 3]")
    refusal(artifact_copy, "not a monitor model artifact")


def test_other_format_version(artifact_copy):
    edit_metadata(artifact_copy, lambda m: m.update(format_version=2))
    refusal(artifact_copy, "artifact format version 2 is not supported")


def test_missing_or_mistyped_fields(artifact_copy):
    edit_metadata(artifact_copy, lambda m: m["threshold"].pop("value"))
    refusal(artifact_copy, "lacks threshold.value")
    edit_metadata(artifact_copy, lambda m: m["threshold"].update(value=0.5))
    edit_metadata(artifact_copy, lambda m: m["architecture"].update(window="140"))
    refusal(artifact_copy, "field architecture.window has the wrong type")
    edit_metadata(artifact_copy, lambda m: m["architecture"].update(window=140, channels=2))
    refusal(artifact_copy, "normalisation does not fit 2 channel")


def test_weights_of_another_shape_with_a_matching_checksum(artifact_copy):
    # The weights are intact (checksum matches) but belong to an embedding_dim of 8, not 4.
    torch.manual_seed(0)
    other = LSTMAutoencoder(1, 8)
    metadata = json.loads((artifact_copy / METADATA_FILE).read_text())
    save_artifact(
        artifact_copy, other, {k: v for k, v in metadata.items() if k not in ("format", "format_version", "weights")}
    )
    edit_metadata(artifact_copy, lambda m: m["architecture"].update(embedding_dim=4))
    recorded = json.loads((artifact_copy / METADATA_FILE).read_text())["weights"]["sha256"]
    assert recorded == hashlib.sha256((artifact_copy / WEIGHTS_FILE).read_bytes()).hexdigest()
    message = refusal(artifact_copy, "weights do not fit the architecture")
    assert "size mismatch" in message


class _TouchOnUnpickle:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _plant(directory: Path, write) -> None:
    weights = directory / WEIGHTS_FILE
    write(weights)
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    edit_metadata(directory, lambda m: m["weights"].update(sha256=sha))


@pytest.mark.parametrize("style", ["pickle", "torch.save"])
def test_malicious_pickle_is_refused_and_never_executed(artifact_copy, tmp_path, style):
    import pickle

    marker = tmp_path / "pwned"
    control = tmp_path / "control"
    if style == "pickle":

        def write(path: Path, target: Path = marker) -> None:
            path.write_bytes(pickle.dumps({"encoder_wide.weight_ih_l0": _TouchOnUnpickle(target)}))

        def unsafe_load(path: Path) -> None:
            pickle.loads(path.read_bytes())
    else:

        def write(path: Path, target: Path = marker) -> None:
            torch.save({"encoder_wide.weight_ih_l0": _TouchOnUnpickle(target)}, path)

        def unsafe_load(path: Path) -> None:
            torch.load(path, weights_only=False)

    # Control: the payload is live; an unsafe loader would run it.
    write(tmp_path / "control.bin", control)
    unsafe_load(tmp_path / "control.bin")
    assert control.exists()

    _plant(artifact_copy, write)
    refusal(artifact_copy, "unreadable weights")
    assert not marker.exists()
    # The CLI refuses it the same way, without running it either.
    if style == "torch.save":
        process = run_cli(
            "evaluate",
            "--model",
            str(artifact_copy),
            "--data",
            str(SPLITS / "test.txt.xz"),
            env={"OMP_NUM_THREADS": "1"},
        )
        assert process.returncode == 2, process.stderr
        assert_one_error_line(process.stderr, "unreadable weights")
        assert not marker.exists()


def assert_one_error_line(stderr: str, contains: str) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("monitor: error: ")
    assert contains in lines[0]
    assert "Traceback" not in stderr
