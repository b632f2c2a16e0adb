"""The scoring pass: normalise a batch of windows, reconstruct it, the error of every window; one forward pass.

Training (calibration and evaluation), `monitor evaluate`, the report, the benchmarks and the daemon all score
through `Scorer`, so the same windows get the same scores everywhere. The threshold decision is not made here
(see `alerts`); the device is resolved and checked in `engine`.

`Scorer` runs the whole pass (`ScoringGraph`) as a TorchScript trace: one call from Python per batch, during
which the GIL is released, where the pass run op by op from Python would take the GIL back after each of its
~20 operations (bench/RESULTS.md, "GIL", has the measured difference next to a busy Python thread). The trace
runs the same kernels on the same inputs, so its scores are the eager model's, bit for bit
(tests/unit/model/test_autoencoder.py checks it).
"""

from __future__ import annotations

import copy
import threading
import warnings
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from monitor.model.artifact import ModelArtifact, Normalisation
from monitor.model.autoencoder import LSTMAutoencoder, channel_errors, reconstruction_errors, window_scores


@dataclass(frozen=True)
class Scores:
    """`errors[i]` is window i's score (mean absolute error); `profiles[i]` its error per timestep; `channels[i]`
    its error per channel (mean over the window), None from a backend that does not give it."""

    errors: np.ndarray
    profiles: np.ndarray
    channels: np.ndarray | None = None

    def select(self, keep: np.ndarray) -> Scores:
        """The scores of the windows `keep` selects (a mask or indices)."""
        return Scores(self.errors[keep], self.profiles[keep], None if self.channels is None else self.channels[keep])


class WindowScorer(Protocol):
    """A backend: scores one `[B, W, C]` batch in one pass."""

    def score(self, windows: np.ndarray) -> Scores: ...


def joined(parts: Sequence[Scores]) -> Scores:
    """The scores of consecutive slices of a batch as one (`parts` not empty)."""
    channels = None if any(p.channels is None for p in parts) else np.concatenate([p.channels for p in parts])
    return Scores(np.concatenate([p.errors for p in parts]), np.concatenate([p.profiles for p in parts]), channels)


def top_channels(errors: np.ndarray, count: int, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The `count` channels with the largest error in one window (`errors`: `[C]`), largest first: which channels
    made its score. Each is its index, its name when the model knows names, and its error."""
    order = np.argsort(-np.asarray(errors), kind="stable")[:count]
    return [
        {"index": int(i), **({"name": names[int(i)]} if names else {}), "error": round(float(errors[i]), 6)}
        for i in order
    ]


class BatchScorer(ABC):
    """What every backend shares: scoring any number of windows in batches. Subclasses implement `score`."""

    @abstractmethod
    def score(self, windows: np.ndarray) -> Scores:
        """Score one `[B, W, C]` batch."""

    def score_all(self, windows: np.ndarray, batch_size: int = 256) -> Scores:
        """Score any number of windows in batches of `batch_size`."""
        parts = [self.score(windows[start : start + batch_size]) for start in range(0, len(windows), batch_size)]
        if not parts:
            shape = windows.shape
            return Scores(
                np.zeros(0, np.float32), np.zeros((0, shape[1]), np.float32), np.zeros((0, shape[2]), np.float32)
            )
        return joined(parts)


MIN_SLICE = 16  # a batch is split only into slices of at least this many windows: smaller ones cost more than they save


class SlicedScorer(BatchScorer):
    """Scores each batch as up to `workers` slices at once: one in the calling thread, the others in a pool. The
    scoring pass releases the GIL (a traced torch pass, an ONNX Runtime session), so with one intra-op thread each
    the slices run on as many cores, without the per-time-step barrier of one LSTM on several threads. A window's
    score is its own: each slice gives it as its whole batch would (tests/unit/model/test_autoencoder.py)."""

    def __init__(self, inner: WindowScorer, workers: int) -> None:
        self.inner = inner
        self.workers = workers
        self._pool = ThreadPoolExecutor(workers - 1, thread_name_prefix="scoring-slice")

    def score(self, windows: np.ndarray) -> Scores:
        slices = min(self.workers, len(windows) // MIN_SLICE)
        if slices < 2:
            return self.inner.score(windows)
        bounds = [len(windows) * index // slices for index in range(slices + 1)]  # np.linspace costs more here
        ends = zip(bounds[1:-1], bounds[2:], strict=True)
        others = [self._pool.submit(self.inner.score, windows[start:end]) for start, end in ends]
        return joined([self.inner.score(windows[: bounds[1]]), *(other.result() for other in others)])


class ScoringGraph(nn.Module):
    """The whole scoring pass as one module: raw windows in, (mean error, per-timestep error profile) out.

    The autoencoder computes in its own parameters' dtype (float32, or bfloat16: `model.dtype`); normalisation and
    errors stay in float32, so only the reconstruction is rounded."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: LSTMAutoencoder, mean: np.ndarray, std: np.ndarray) -> None:
        super().__init__()
        self.model = model
        self.dtype = next(model.parameters()).dtype
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean, dtype=np.float32)))
        self.register_buffer("std", torch.as_tensor(np.asarray(std, dtype=np.float32)))

    def normalise(self, windows: torch.Tensor) -> torch.Tensor:
        return (windows - self.mean) / self.std

    def reconstruct(self, batch: torch.Tensor) -> torch.Tensor:
        """The reconstruction of normalised windows, in float32 (a float32 model's pass has no casts at all)."""
        if self.dtype == batch.dtype:
            return self.model(batch)
        return self.model(batch.to(self.dtype)).to(batch.dtype)

    def forward(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = self.normalise(windows)
        reconstruction = self.reconstruct(batch)
        profiles = reconstruction_errors(batch, reconstruction)
        return window_scores(profiles), profiles, channel_errors(batch, reconstruction)


class Scorer(BatchScorer):
    """Scores `[B, W, C]` float windows with a model and its normalisation on one device, any batch size.

    With `dtype` bfloat16 the autoencoder computes on a bfloat16 copy of the model (`model.dtype`): fewer bits per
    number, so the same windows score slightly differently from float32, but alike everywhere that uses it."""

    def __init__(
        self,
        model: LSTMAutoencoder,
        normalisation: Normalisation,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.device = torch.device(device)
        if dtype != torch.float32:
            model = copy.deepcopy(model).to(dtype)  # never the caller's model, cast in place
        # Frozen as `load_artifact` leaves a model: with parameters that require grad, the traced pass can pick
        # other kernels and differ in the last bit, so a freshly trained model would not score as its saved copy.
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.normalisation = normalisation
        self._graph = ScoringGraph(self.model, normalisation.mean, normalisation.std).to(self.device).eval()
        self._traced: dict[int, torch.jit.ScriptModule] = {}

    @classmethod
    def from_artifact(
        cls, artifact: ModelArtifact, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> Scorer:
        """A scorer for a loaded artifact, traced for its window length up front."""
        scorer = cls(artifact.model, artifact.normalisation, device, dtype)
        scorer._traced_for(artifact.window)
        return scorer

    def _traced_for(self, window: int) -> torch.jit.ScriptModule:
        """The pass traced for one window length (the decoder repeats the embedding `window` times)."""
        traced = self._traced.get(window)
        if traced is None:
            traced = self._traced[window] = _traced_copy(self._graph, window, self.model.channels, self.device)
        return traced

    def score(self, windows: np.ndarray) -> Scores:
        """Score one batch in a single forward pass. A lone window is scored as a pair: the kernels for one row
        round differently from those for several, and a window's score must not depend on its batch."""
        if len(windows) == 1:
            return self.score(np.concatenate([windows, windows])).select(np.arange(1))
        with torch.inference_mode():
            batch = torch.as_tensor(np.ascontiguousarray(windows, dtype=np.float32), device=self.device)
            errors, profiles, channels = self._traced_for(batch.shape[1])(batch)
            return Scores(errors.cpu().numpy(), profiles.cpu().numpy(), channels.cpu().numpy())

    def reconstruct(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised windows and their reconstructions (the report's plots), by the scoring pass' own steps."""
        with torch.inference_mode():
            batch = torch.as_tensor(np.ascontiguousarray(windows, dtype=np.float32), device=self.device)
            normalised = self._graph.normalise(batch)
            return normalised.cpu().numpy(), self._graph.reconstruct(normalised).cpu().numpy()


# Traced passes by shape, each used only as a template to copy. Every `torch.jit.trace` registers a new class in
# TorchScript's global compilation unit that is never freed (about 0.5 MiB, and as much again for its optimised
# plans once run), so tracing on every SIGHUP reload grew the daemon by ~0.9 MiB a reload. A copy of a traced
# module is an instance of the same class: the same graph and plans, with the new model's weights loaded in.
_TEMPLATES: OrderedDict[tuple, torch.jit.ScriptModule] = OrderedDict()
_MAX_TEMPLATES = 4  # distinct model shapes kept; a fifth evicts the least recently used
_TEMPLATES_LOCK = threading.Lock()


def _traced_copy(graph: ScoringGraph, window: int, channels: int, device: torch.device) -> torch.jit.ScriptModule:
    """`graph` traced for `window`: a copy of the template for its shape, holding `graph`'s weights."""
    state = graph.state_dict()
    key = (window, str(device), tuple((name, tuple(value.shape), value.dtype) for name, value in state.items()))
    with _TEMPLATES_LOCK:
        template = _TEMPLATES.get(key)
        if template is None:
            with torch.inference_mode(), warnings.catch_warnings():
                # nn.LSTM's input and state shape checks warn when traced; they are checks, not computation, and the
                # batch size is read from the input at run time (nn.LSTM sizes its state from it): any batch works.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                example = torch.zeros(2, window, channels, device=device)
                template = _TEMPLATES[key] = torch.jit.trace(graph, example, check_trace=False)
            while len(_TEMPLATES) > _MAX_TEMPLATES:
                _TEMPLATES.popitem(last=False)
        _TEMPLATES.move_to_end(key)
        traced = copy.deepcopy(template)
    with torch.no_grad():
        traced.load_state_dict(state)
    return traced
