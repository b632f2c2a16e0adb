"""What the daemon scores with: `load_engine(settings)` resolves and places the device, loads and checks the
artifact and builds the configured backend, into one typed, immutable `Engine`.

`monitor run`, `monitor check-config` and the tests all load through here, so a model that passes the
check is the model the daemon runs. A broken artifact or device raises a `MonitorError` naming the key.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from monitor.config.schema import ModelSettings
from monitor.ecg.beats import BeatSpec, beat_spec
from monitor.errors import ArtifactError, ConfigError, MonitorError
from monitor.model.artifact import channel_names, load_artifact
from monitor.model.baseline import follow_rate, scaled_scores, trained_baseline
from monitor.model.calibration import CalibrationScores
from monitor.model.scoring import Scorer, Scores, SlicedScorer, WindowScorer
from monitor.window import Window

Backend = Literal["torch", "onnx"]


@dataclass(frozen=True)
class ModelIdentity:
    """The model named in every alert and in the `monitor_model` info metric."""

    name: str
    version: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version}


@dataclass(frozen=True)
class Engine:
    """A loaded model ready to score: swapped as a whole on reload, never changed in place."""

    scorer: WindowScorer
    threshold: float
    window: int
    channels: int
    model: ModelIdentity
    backend: Backend
    device: str
    dtype: str = "float32"  # what the autoencoder computes in (`model.dtype`)
    calibration: CalibrationScores | None = None  # None for an artifact made before it was recorded
    baseline: tuple[str, int | None] = ("model", None)  # how the model was trained: (model | sensor, warm-up windows)
    baseline_follow_rate: float = 0.0  # how fast its sensor baselines follow drift (0: fixed)
    channel_names: tuple[str, ...] | None = None  # the channels' names, when the model was trained with them
    segmentation: BeatSpec | None = None  # how the model's beats are cut; None for a fixed-window model
    score_scale: bool = False  # each sensor's scores divided by its score scale (`monitor.model.baseline`)

    def score(self, windows: np.ndarray) -> Scores:
        return self.scorer.score(windows)

    def score_windows(self, batch: Sequence[Window]) -> Scores:
        """A batch of windows (fixed or beat) scored, each error divided by its window's `error_scale` (a beat's in
        a noisy stretch: beats.py; 1 otherwise) and raised to at least its `timing_score` (a premature beat's)."""
        scores = self.scorer.score(np.stack([window.samples for window in batch]))
        scales = np.fromiter((window.error_scale for window in batch), np.float64, len(batch))
        floors = np.fromiter((window.timing_score for window in batch), np.float64, len(batch))
        if (scales == 1.0).all() and (floors == 0.0).all():
            return scores
        return Scores(np.maximum(scores.errors / scales, floors), scores.profiles, scores.channels)

    @property
    def identity(self) -> dict[str, Any]:
        """What a sensor's score scale depends on: the model (by name, version and threshold)."""
        return {**self.model.to_dict(), "threshold": self.threshold}

    def describe(self) -> dict[str, str | int | float]:
        """The engine as log fields."""
        return {
            "name": self.model.name,
            "version": self.model.version,
            "backend": self.backend,
            "device": self.device,
            "dtype": self.dtype,
            "window": self.window,
            "channels": self.channels,
            "threshold": self.threshold,
            "baseline": self.baseline[0],
            "mode": "fixed" if self.segmentation is None else "beats",
        }


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when a GPU is present, else the CPU; `cuda` without a GPU is an error (`model.device`)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and name != "cuda" and not name.startswith("cuda:"):
        raise ConfigError(f"model.device: {name!r} is not one of auto, cpu, cuda, cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device: {name!r} was asked for, but no CUDA device is available")
    try:
        return torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"model.device: {name!r} is not a device ({error})") from None


def use_threads(threads: int) -> None:
    """Torch's intra-op threads for this process; 0 leaves torch's default (one per core). Training, evaluation and
    the daemon default to one: on a small or busy machine more threads spin against each other."""
    if threads and threads != torch.get_num_threads():
        torch.set_num_threads(threads)


def native_bfloat16(device: torch.device | None = None) -> bool:
    """Whether `device` (default the CPU) computes bfloat16 natively (AVX512-BF16 or AMX, a GPU with it). The one
    place that asks torch: for the CPU only a private call answers it."""
    if device is not None and device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_dtype(name: str, device: torch.device, option: str = "model.dtype") -> torch.dtype:
    """The torch dtype of `model.dtype`. bfloat16 only where the hardware computes it natively: elsewhere torch
    emulates it, many times slower than float32, the opposite of what it is asked for."""
    if name == "float32":
        return torch.float32
    if name != "bfloat16":
        raise ConfigError(f"{option}: {name!r} is not one of float32, bfloat16")
    if not native_bfloat16(device):
        raise ConfigError(
            f"{option}: bfloat16 needs hardware that computes it natively (a CPU with AVX512-BF16 or AMX, or a GPU "
            f"with bfloat16), and {device} does not: it would be emulated, far slower than float32"
        )
    return torch.bfloat16


def load_engine(settings: ModelSettings) -> Engine:
    """Load the artifact onto the resolved device and build the configured backend; raises a MonitorError."""
    device = resolve_device(settings.device)
    use_threads(settings.threads)
    artifact = load_artifact(settings.path, device)
    scorer: WindowScorer
    if settings.backend == "onnx":
        if device.type != "cpu":
            raise ConfigError(f"model.backend: onnx runs on the CPU, but model.device resolved to {device}")
        if settings.dtype != "float32":
            raise ConfigError(f"model.dtype: {settings.dtype} is for the torch backend; onnx computes in float32")
        from monitor.model.onnx_backend import OnnxScorer

        scorer = OnnxScorer(artifact, threads=settings.threads)
    else:
        scorer = Scorer.from_artifact(artifact, device, resolve_dtype(settings.dtype, device))
    if settings.workers > 1:
        scorer = SlicedScorer(scorer, settings.workers)
    try:
        calibration = CalibrationScores.from_metadata(artifact.metadata)
    except ValueError as error:
        raise ArtifactError(f"{settings.path}: {error}") from None
    return Engine(
        scorer=scorer,
        threshold=artifact.threshold,
        window=artifact.window,
        channels=artifact.channels,
        model=ModelIdentity(artifact.name, artifact.version),
        backend=settings.backend,
        device=str(device),
        dtype=settings.dtype,
        calibration=calibration,
        baseline=trained_baseline(artifact.metadata),
        baseline_follow_rate=follow_rate(artifact.metadata),
        channel_names=channel_names(artifact.metadata, artifact.channels),
        segmentation=beat_spec(artifact.metadata, settings.path),
        score_scale=scaled_scores(artifact.metadata),
    )


class EngineScales:
    """The daemon's score-scale scorer (`baseline.ScaleScorer`): a completed warm-up scored in one pass by the engine
    running at that moment (a reload may swap it; one whose scales would differ is refused)."""

    def __init__(self, engine: Callable[[], Engine]) -> None:
        self.engine = engine

    @property
    def identity(self) -> dict[str, Any]:
        return self.engine().identity

    def scores(self, windows: np.ndarray) -> np.ndarray:
        return self.engine().score(windows).errors


def load_shadow_engine(
    settings: ModelSettings, live: Engine, loader: Callable[[ModelSettings], Engine]
) -> Engine | None:
    """The engine of `model.shadow_path` (same device, backend and threads as the live one), or None without one."""
    if settings.shadow_path is None:
        return None
    try:
        shadow = loader(settings.model_copy(update={"path": settings.shadow_path, "shadow_path": None}))
    except MonitorError as error:
        raise type(error)(f"model.shadow_path: {error}") from None
    if (shadow.window, shadow.channels) != (live.window, live.channels):
        raise ConfigError(
            f"model.shadow_path: the shadow model takes windows of {shadow.window}x{shadow.channels}, "
            f"the live one {live.window}x{live.channels}"
        )
    if shadow.score_scale or live.score_scale:
        raise ConfigError(
            "model.shadow_path: not with a model that scales its sensors' scores (--score-scale sensor): the "
            "sensors' score scales are the live model's"
        )
    if shadow.baseline[0] != live.baseline[0]:
        raise ConfigError(
            f"model.shadow_path: the shadow model was trained with baseline {shadow.baseline[0]!r}, "
            f"the live one with {live.baseline[0]!r}"
        )
    return shadow
