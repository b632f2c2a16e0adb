"""The scoring engine: normalise a batch of windows, one forward pass, the error of every window.

Training, `monitor evaluate` and the daemon all score through this class, so the same windows
get the same scores everywhere. The threshold decision is not made here (see `alerts`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from monitor.artifact import ModelArtifact
from monitor.autoencoder import reconstruction_errors
from monitor.errors import ConfigError


@dataclass(frozen=True)
class Scores:
    """`errors[i]` is window i's score (mean absolute error); `profiles[i]` its error per timestep."""

    errors: np.ndarray
    profiles: np.ndarray


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when a GPU is present, else the CPU; `cuda` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device: {name!r} was asked for, but no CUDA device is available")
    if name != "cpu" and not name.startswith("cuda"):
        raise ConfigError(f"model.device: {name!r} is not one of auto, cpu, cuda")
    return torch.device(name)


class ScoringEngine(ABC):
    """What every backend shares: an artifact's shape, and scoring any number of windows in batches.

    Subclasses implement `score`, one batch in one pass.
    """

    artifact: ModelArtifact

    @property
    def window(self) -> int:
        return self.artifact.window

    @property
    def channels(self) -> int:
        return self.artifact.channels

    @abstractmethod
    def score(self, windows: np.ndarray) -> Scores:
        """Score one `[B, W, C]` batch."""

    def score_all(self, windows: np.ndarray, batch_size: int = 256) -> Scores:
        """Score any number of windows in batches of `batch_size`."""
        parts = [self.score(windows[start : start + batch_size]) for start in range(0, len(windows), batch_size)]
        if not parts:
            return Scores(np.zeros(0, np.float32), np.zeros((0, self.window), np.float32))
        return Scores(np.concatenate([p.errors for p in parts]), np.concatenate([p.profiles for p in parts]))


class Scorer(ScoringEngine):
    """Scores `[B, W, C]` float windows with a loaded artifact on one device."""

    def __init__(self, artifact: ModelArtifact, device: torch.device | str = "cpu") -> None:
        self.artifact = artifact
        self.device = torch.device(device)
        self.model = artifact.model.to(self.device)
        self._mean = torch.as_tensor(artifact.normalisation.mean, device=self.device)
        self._std = torch.as_tensor(artifact.normalisation.std, device=self.device)

    def score(self, windows: np.ndarray) -> Scores:
        """Score one batch in a single forward pass."""
        with torch.inference_mode():
            batch = torch.as_tensor(np.ascontiguousarray(windows, dtype=np.float32), device=self.device)
            batch = (batch - self._mean) / self._std
            profiles = reconstruction_errors(batch, self.model(batch))
            errors = profiles.mean(dim=1)
            return Scores(errors.cpu().numpy(), profiles.cpu().numpy())
