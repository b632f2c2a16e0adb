"""The model artifact: a directory with `model.safetensors` and a human-readable `model.json`.

Weights are read with safetensors, which never executes code; `model.json` records the
architecture, window, channels, normalisation, error measure, threshold and its calibration,
the training data's fingerprint, evaluation figures and a version. The weights' SHA-256 is kept in
`model.json`, so a truncated or altered weights file is refused before it is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from monitor.errors import ArtifactError
from monitor.model.autoencoder import LSTMAutoencoder

FORMAT = "monitor-model"
FORMAT_VERSION = 1
METADATA_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"
ERROR_MEASURE = "mean_absolute_error"


@dataclass(frozen=True)
class Normalisation:
    """Per-channel standardisation learned from the training windows: `(x - mean) / std`."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, windows: np.ndarray) -> Normalisation:
        flat = windows.reshape(-1, windows.shape[-1]).astype(np.float64)
        std = flat.std(axis=0)
        return cls(flat.mean(axis=0).astype(np.float32), np.where(std > 1e-8, std, 1.0).astype(np.float32))

    @classmethod
    def identity(cls, channels: int) -> Normalisation:
        return cls(np.zeros(channels, np.float32), np.ones(channels, np.float32))

    def apply(self, windows: np.ndarray) -> np.ndarray:
        return ((windows - self.mean) / self.std).astype(np.float32, copy=False)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "standard", "mean": self.mean.tolist(), "std": self.std.tolist()}


@dataclass(frozen=True)
class ModelArtifact:
    """A loaded model: the network, its normalisation, threshold and the metadata it came with."""

    model: LSTMAutoencoder
    normalisation: Normalisation
    threshold: float
    window: int
    channels: int
    name: str
    version: str
    metadata: dict[str, Any]
    path: Path | None = None


def channel_names(metadata: dict[str, Any], channels: int) -> tuple[str, ...] | None:
    """The names a model was trained with for its channels (`architecture.channel_names`), or None."""
    names = metadata.get("architecture", {}).get("channel_names")
    if isinstance(names, list) and len(names) == channels and all(isinstance(name, str) for name in names):
        return tuple(names)
    return None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_artifact(directory: str | Path, model: LSTMAutoencoder, metadata: dict[str, Any]) -> Path:
    """Write weights and metadata atomically (temp files, then rename) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    # Serialised here and written by us: safetensors' save_file (like tempfile) creates files with
    # mode 0600, which survives the rename and `cp -r` on install, so the service's dynamic user
    # could not read the weights. write_bytes honours the umask, as model.json does.
    temp_weights = directory / f".{WEIGHTS_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    temp_weights.write_bytes(save(state))
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, **metadata}
    full["weights"] = {"file": WEIGHTS_FILE, "sha256": _sha256(temp_weights)}
    temp_meta = directory / (METADATA_FILE + ".tmp")
    temp_meta.write_text(json.dumps(full, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(temp_weights, directory / WEIGHTS_FILE)
    os.replace(temp_meta, directory / METADATA_FILE)
    return directory


def _require(metadata: dict[str, Any], dotted: str, kind: type | tuple[type, ...], where: Path) -> Any:
    value: Any = metadata
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            raise ArtifactError(f"{where}: {METADATA_FILE} lacks {dotted}")
        value = value[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ArtifactError(f"{where}: {METADATA_FILE} field {dotted} has the wrong type ({value!r})")
    return value


def read_metadata(directory: str | Path) -> dict[str, Any]:
    """Read and check `model.json` of an artifact directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: model artifact directory not found")
    meta_path = directory / METADATA_FILE
    if not meta_path.is_file():
        raise ArtifactError(f"{directory}: incomplete model artifact: {METADATA_FILE} is missing")
    try:
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArtifactError(f"{meta_path}: not valid JSON ({error})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ArtifactError(f"{meta_path}: not a monitor model artifact")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{meta_path}: artifact format version {metadata.get('format_version')!r} is not supported "
            f"(this monitor reads version {FORMAT_VERSION})"
        )
    return metadata


def load_artifact(directory: str | Path, device: torch.device | str = "cpu") -> ModelArtifact:
    """Load and verify an artifact; any problem is one `ArtifactError` line."""
    directory = Path(directory)
    metadata = read_metadata(directory)
    architecture = _require(metadata, "architecture.type", str, directory)
    if architecture != "lstm_autoencoder":
        raise ArtifactError(f"{directory}: architecture {architecture!r} is not supported")
    window = _require(metadata, "architecture.window", int, directory)
    channels = _require(metadata, "architecture.channels", int, directory)
    embedding_dim = _require(metadata, "architecture.embedding_dim", int, directory)
    level_dim = metadata["architecture"].get("level_dim", 0)
    if not isinstance(level_dim, int) or not (level_dim == 0 or 0 < level_dim < channels):
        raise ArtifactError(f"{directory}: architecture.level_dim {level_dim!r} does not fit {channels} channel(s)")
    threshold = float(_require(metadata, "threshold.value", (int, float), directory))
    mean = np.asarray(_require(metadata, "normalisation.mean", list, directory), dtype=np.float32)
    std = np.asarray(_require(metadata, "normalisation.std", list, directory), dtype=np.float32)
    expected_sha = _require(metadata, "weights.sha256", str, directory)
    measure = _require(metadata, "error_measure", str, directory)
    if measure != ERROR_MEASURE:
        raise ArtifactError(f"{directory}: error measure {measure!r} is not supported")
    if mean.shape != (channels,) or std.shape != (channels,) or not (std > 0).all():
        raise ArtifactError(f"{directory}: normalisation does not fit {channels} channel(s)")
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ArtifactError(f"{directory}: incomplete model artifact: {WEIGHTS_FILE} is missing")
    if _sha256(weights_path) != expected_sha:
        raise ArtifactError(f"{weights_path}: checksum mismatch: the weights are truncated or were altered")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ArtifactError(f"{weights_path}: unreadable weights ({error})") from None
    model = LSTMAutoencoder(channels, embedding_dim, level_dim)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        raise ArtifactError(f"{weights_path}: weights do not fit the architecture ({' '.join(first[:2])})") from None
    model.eval().requires_grad_(False).to(device)
    return ModelArtifact(
        model=model,
        normalisation=Normalisation(mean, std),
        threshold=threshold,
        window=window,
        channels=channels,
        name=str(metadata.get("name", directory.name)),
        version=str(metadata.get("version", "unknown")),
        metadata=metadata,
        path=directory,
    )


def artifact_problem(directory: Path) -> str | None:
    """Why `directory` is not a model artifact (the cheap part of the check), or None."""
    if not directory.is_dir():
        return f"{str(directory)!r}: no such model directory"
    missing = [name for name in (METADATA_FILE, WEIGHTS_FILE) if not (directory / name).is_file()]
    if missing:
        return f"{str(directory)!r}: not a model artifact ({' and '.join(missing)} missing)"
    return None
