"""The settings of `monitor train`: kept apart from the trainer so the command line can show the
defaults without importing torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from monitor.config.loading import Strict
from monitor.model.baseline import FOLLOW_RATE

MANY_CHANNELS = 16  # from here a per-sensor-baseline model gets the machine defaults (`TrainSettings.resolved`)


class ThresholdSettings(Strict):
    method: Literal["quantile", "mean_std", "pot"] = "quantile"
    params: dict[str, float] = Field(default_factory=dict)


# Where beat mode's recipe (configs/train-mitdb-beats.yaml) differs from the fixed-mode one: `monitor train
# --segmentation beats` with only data arguments trains as the bundled beat model was trained.
BEAT_DEFAULTS: dict[str, int] = {"epochs": 30, "batch_size": 32, "patience": 10, "lr_patience": 4}
# ... and its quantile threshold: on the reconstruction scores alone, timing having its own share (beat_trainer)
BEAT_THRESHOLD_QUANTILE = 0.995


class TrainSettings(Strict):
    """Everything `monitor train` takes; flags override the YAML file key by key.

    The defaults are the bundled model's recipe (configs/train-ecg5000.yaml), one torch thread included: on a
    small or busy machine more threads spin against each other and an epoch takes many times longer. Without a
    `name` the model is named after its output directory.
    """

    train_data: list[Path] = Field(min_length=1)
    train_labels: list[Path] | None = None
    baseline: Literal["model", "sensor"] = "model"
    baseline_windows: int | None = Field(default=None, ge=1)
    baseline_follow_rate: float = Field(default=FOLLOW_RATE, ge=0, le=1)
    channel_names: list[str] | None = None  # recorded in the artifact; alerts name their top channels with them
    calibration_data: Path | None = None
    evaluate_data: Path | None = None
    normal_label: int = 1
    window: int | None = Field(default=None, ge=2)
    stride: int | None = Field(default=None, ge=1)
    output: Path = Path("models/model")
    name: str = ""
    version: str | None = None
    embedding_dim: int = Field(default=32, ge=1, le=1024)
    level_dim: int | None = Field(default=None, ge=0)  # the model's level path (LSTMAutoencoder); 0: none, None: auto
    # sensor: scores divided by the sensor's warm-up median score; None: as `resolved` says
    score_scale: Literal["none", "sensor"] | None = None
    epochs: int = Field(default=150, ge=1)
    batch_size: int = Field(default=16, ge=1)
    learning_rate: float = Field(default=0.002, gt=0)
    grad_clip: float = Field(default=1.0, gt=0)
    noise_std: float = Field(default=0.15, ge=0)
    patience: int = Field(default=30, ge=1)
    lr_patience: int = Field(default=5, ge=1)
    lr_factor: float = Field(default=0.5, gt=0, le=1)
    validation_fraction: float = Field(default=0.15, gt=0, lt=0.5)
    calibration_fraction: float = Field(default=0.15, gt=0, lt=0.5)
    seed: int = 0
    threads: int = Field(default=1, ge=0)
    threshold: ThresholdSettings = Field(default_factory=ThresholdSettings)
    report: bool = True

    @model_validator(mode="before")
    @classmethod
    def _name_from_output(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("name"):
            output = Path(data.get("output") or cls.model_fields["output"].default)
            data = {**data, "name": output.name or "model"}
        return data

    @field_validator("train_data", "train_labels", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        return [value] if isinstance(value, str | Path) else value

    @model_validator(mode="after")
    def _recordings_consistent(self) -> TrainSettings:
        if self.channel_names is not None and len(set(self.channel_names)) != len(self.channel_names):
            raise ValueError("channel_names: each name once")
        if self.train_labels is not None and len(self.train_labels) != len(self.train_data):
            given, needed = len(self.train_labels), len(self.train_data)
            raise ValueError(f"train_labels: {given} label files for {needed} recordings")
        if self.baseline == "sensor" and self.baseline_windows is None:
            raise ValueError("baseline_windows: required with baseline: sensor")
        if self.baseline_windows is not None and self.baseline != "sensor":
            raise ValueError("baseline_windows: only with baseline: sensor")
        if self.score_scale == "sensor" and self.baseline != "sensor":
            raise ValueError("score_scale: sensor needs baseline: sensor (the scale is measured on the warm-up)")
        if self.from_recordings and (self.calibration_data is not None or self.evaluate_data is not None):
            raise ValueError(
                "calibration_data/evaluate_data: not with recordings (each recording's end calibrates; "
                "evaluate with `monitor evaluate --data ... --labels ...`)"
            )
        return self

    def machine_defaults(self, channels: int) -> bool:
        """Whether a model of `channels` channels gets the defaults for machines: per-sensor baselines and at least
        MANY_CHANNELS channels (the level path and the score scale helped at 38 channels of machine data, not at 8)."""
        return self.baseline == "sensor" and channels >= MANY_CHANNELS

    def level_dim_for(self, channels: int) -> int:
        """The level path's width: as given, or for machines (`machine_defaults`) a sixth narrower than the channels
        (38 channels: 32, the width validation loss chose on machine data); else none."""
        if self.level_dim is not None:
            return self.level_dim
        return channels - channels // 6 if self.machine_defaults(channels) else 0

    def resolved(self, channels: int) -> TrainSettings:
        """These settings with the defaults that depend on the channels filled in (level path, score scale)."""
        scale = self.score_scale or ("sensor" if self.machine_defaults(channels) else "none")
        return self.model_copy(update={"level_dim": self.level_dim_for(channels), "score_scale": scale})

    @property
    def from_recordings(self) -> bool:
        """Several recordings, labels or a per-sensor baseline: each file is one sensor's recording."""
        return len(self.train_data) > 1 or self.train_labels is not None or self.baseline == "sensor"
