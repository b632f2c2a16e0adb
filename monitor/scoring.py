"""The scoring engine: normalise a batch of windows, one forward pass, the error of every window.

Training, `monitor evaluate` and the daemon all score through this class, so the same windows
get the same scores everywhere. The threshold decision is not made here (see `alerts`).

`Scorer` runs the whole pass (`ScoringGraph`) as a TorchScript trace: one call from Python per
batch, during which the GIL is released. Run op by op from Python, the pass takes the GIL back
after each of its ~20 operations, and in the daemon, where paho's thread is busy with Python, each
of those waits can last the interpreter's switch interval (5 ms). Next to a busy Python thread, at
batch 64 on one thread: 632 windows/s op by op, 2,568 for the trace (bench/RESULTS.md, "GIL").
The trace runs the same kernels on the same inputs, so its scores are the eager model's, bit for bit
(tests/test_autoencoder.py checks it).
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from monitor.artifact import ModelArtifact
from monitor.autoencoder import LSTMAutoencoder, reconstruction_errors
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


class ScoringGraph(nn.Module):
    """The whole scoring pass as one module: raw windows in, (mean error, per-timestep error profile) out."""

    def __init__(self, model: LSTMAutoencoder, mean: np.ndarray, std: np.ndarray) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean, dtype=np.float32)))
        self.register_buffer("std", torch.as_tensor(np.asarray(std, dtype=np.float32)))

    def forward(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = (windows - self.mean) / self.std
        profiles = reconstruction_errors(batch, self.model(batch))
        return profiles.mean(dim=1), profiles


class Scorer(ScoringEngine):
    """Scores `[B, W, C]` float windows with a loaded artifact on one device, any batch size."""

    def __init__(self, artifact: ModelArtifact, device: torch.device | str = "cpu") -> None:
        self.artifact = artifact
        self.device = torch.device(device)
        self.model = artifact.model.to(self.device)
        graph = ScoringGraph(self.model, artifact.normalisation.mean, artifact.normalisation.std).to(self.device).eval()
        with torch.inference_mode(), warnings.catch_warnings():
            # nn.LSTM's input and state shape checks warn when traced; they are checks, not computation, and the
            # batch size is read from the input at run time (nn.LSTM sizes its state from it): any batch works.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            example = torch.zeros(2, artifact.window, artifact.channels, device=self.device)
            self._graph = torch.jit.trace(graph, example, check_trace=False)

    def score(self, windows: np.ndarray) -> Scores:
        """Score one batch in a single forward pass."""
        with torch.inference_mode():
            batch = torch.as_tensor(np.ascontiguousarray(windows, dtype=np.float32), device=self.device)
            errors, profiles = self._graph(batch)
            return Scores(errors.cpu().numpy(), profiles.cpu().numpy())
