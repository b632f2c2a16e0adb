"""Typed result records: what the measuring parts return, what bench/results.json holds, what report.py renders.

`Results` has one optional section a part (field name = part name, `-` as `_`); a part not run keeps
its previous section. `save` and `load` go through pydantic, which also checks a file read back.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import TypeAdapter


@dataclass(frozen=True)
class Stamp:
    """When a section was measured, whether as a `--quick` smoke run, and the machine's load then."""

    measured_at: str
    quick: bool
    load_average_1m: float

    @classmethod
    def now(cls, quick: bool) -> Stamp:
        return cls(dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), quick, os.getloadavg()[0])


@dataclass(frozen=True)
class Machine:
    cpu: str
    cores: int
    physical_cores: int
    avx2: bool
    avx512f: bool
    torch_cpu_capability: str
    memory_gib: float
    os: str
    python: str
    torch: str
    onnxruntime: str
    numpy: str
    paho_mqtt: str
    torch_default_threads: int


@dataclass
class LastRun:
    command: str
    stamp: Stamp
    seconds: float | None = None
    load_average_1m_end: float | None = None


@dataclass(frozen=True)
class DefaultModel:
    """What the shipped default model's own metadata says about its training and quality."""

    path: str
    embedding_dim: int
    window: int
    channels: int
    threshold: float
    epochs_run: int | None
    best_epoch: int | None
    train_seconds_recorded: float | None
    auc: float | None
    recall: float | None
    fpr: float | None
    precision: float | None


@dataclass(frozen=True)
class Flops:
    formula: str
    per_window: dict[int, int]
    window: int
    channels: int


@dataclass(frozen=True)
class Rate:
    """Items per second of a timed call: median and best of the runs, and the warm-up call's duration."""

    median: float
    best: float
    runs: list[float]
    call_seconds: float


@dataclass(frozen=True)
class MatmulRate:
    threads: int
    gflops: float
    size: int
    by_size: dict[int, float]


@dataclass(frozen=True)
class ModelMatmul:
    embedding_dim: int
    batch: int
    threads: int
    windows_per_second: float
    gflops: float


@dataclass(frozen=True)
class Limit:
    stamp: Stamp
    all_threads: int
    matmul: dict[int, MatmulRate]
    limit_threads: int
    limit_gflops: float
    model_matmuls: list[ModelMatmul]


@dataclass(frozen=True)
class Tutorial:
    stamp: Stamp
    by_embedding: dict[int, dict[int, Rate]]  # E -> threads -> windows/s


@dataclass(frozen=True)
class EngineRow:
    embedding_dim: int
    backend: str
    threads: int
    batch: int
    rate: Rate


@dataclass(frozen=True)
class Engine:
    stamp: Stamp
    rows: list[EngineRow]


@dataclass(frozen=True)
class Gil:
    stamp: Stamp
    batch: int
    eager_alone: float
    eager_busy_thread: float
    traced_alone: float
    traced_busy_thread: float


@dataclass(frozen=True)
class TorchDecisions:
    flagged: int
    auc: float
    recall: float
    fpr: float


@dataclass(frozen=True)
class Agreement:
    """How far a backend's scores are from torch's, and whether the same windows are flagged."""

    windows: int
    error_max_abs_diff: float
    error_max_rel_diff: float
    error_mean_abs_diff: float
    error_median_rel_diff_normal: float
    profile_max_abs_diff: float
    profile_p9999_abs_diff: float
    flagged_reference: int
    flagged: int
    decisions_differ: int
    auc: float
    recall: float
    fpr: float


@dataclass(frozen=True)
class Accuracy:
    stamp: Stamp
    data: str
    threshold: float
    closest_score_to_threshold: float
    torch: TorchDecisions
    onnx: Agreement
    onnx_int8: Agreement | None = None


@dataclass(frozen=True)
class FullTraining:
    threads: int
    epochs_run: int
    best_epoch: int
    fit_seconds: float
    seconds: float
    auc: float | None
    same_weights_as_shipped: bool


@dataclass(frozen=True)
class EpochTiming:
    embedding_dim: int
    threads: int
    epochs: int
    seconds_per_epoch: float
    windows: int
    batch_size: int


@dataclass(frozen=True)
class Training:
    stamp: Stamp
    timing: EpochTiming
    full_run: FullTraining | None
    recipe: str
    max_epochs: int
    patience: int
    seconds_per_epoch_other_threads: dict[int, float]


@dataclass(frozen=True)
class TransportRow:
    client: str
    chunk_samples: int
    messages: int
    complete: bool
    messages_per_second: float
    cpu_us_per_message: float


@dataclass(frozen=True)
class Transport:
    stamp: Stamp
    messages: int
    rows: list[TransportRow]


@dataclass(frozen=True)
class RunConfig:
    """One daemon configuration to step through; written `backend:threads[:qosN][:bN][:wN][:cN][:p311][:frame]`.

    e.g. `torch:1` (the daemon's defaults), `torch:1:qos0` (sensors publish at QoS 0),
    `torch:1:b32` (max_batch 32), `onnx:1:w25` (max_wait 25 ms), `torch:1:c140` (140 samples a message),
    `torch:1:p311` (the daemon speaks MQTT 3.1.1 instead of its default 5), `torch:1:c140:frame` (sensors send
    binary frames instead of JSON).
    """

    backend: str = "torch"
    threads: int = 1
    qos: int = 1
    max_batch: int = 64
    max_wait: float = 0.05
    chunk: int = 35
    protocol: str = "5"
    mode: str = "fixed"  # `beats`: windowing.mode beats, the beat model, sensors stream a raw MIT-BIH lead
    input_format: str = "json"  # `frame`: sensors send binary frames (float32)

    @classmethod
    def parse(cls, text: str, qos: int = 1) -> RunConfig:
        fields = text.strip().split(":")
        if len(fields) < 2 or fields[0] not in ("torch", "onnx"):
            raise ValueError(f"{text!r}: expected backend:threads[:qosN][:bN][:wMS][:cN][:p311][:frame]: torch or onnx")
        values: dict = {"backend": fields[0], "threads": int(fields[1]), "qos": qos}
        for token in fields[2:]:
            if token == "beats":
                values["mode"] = "beats"
            elif token == "frame":
                values["input_format"] = "frame"
            elif token.startswith("qos"):
                values["qos"] = int(token[3:])
            elif token.startswith("b"):
                values["max_batch"] = int(token[1:])
            elif token.startswith("w"):
                values["max_wait"] = int(token[1:]) / 1000
            elif token == "p311":
                values["protocol"] = "3.1.1"
            elif token.startswith("c"):
                values["chunk"] = int(token[1:])
            else:
                raise ValueError(f"{text!r}: unknown option {token!r}")
        return cls(**values)

    @property
    def label(self) -> str:
        return (
            f"{self.backend}, {self.threads} thread(s), max_batch {self.max_batch}, "
            f"max_wait {self.max_wait * 1000:.0f} ms, input QoS {self.qos}, {self.chunk} samples/message, "
            f"MQTT {self.protocol}"
            + (", beat mode" if self.mode == "beats" else "")
            + (", binary frames" if self.input_format == "frame" else "")
        )


@dataclass(frozen=True)
class CpuCores:
    """CPU used during a step, in cores: per process, the whole machine, and the daemon's busiest threads."""

    daemon: float
    generator: float
    broker: float
    whole_machine: float
    others: float
    daemon_busiest_threads: list[float]


@dataclass(frozen=True)
class LoadSummary:
    """The load generator's closing line (bench/loadgen.py); `error` alone when it printed none."""

    sensors: int = 0
    messages: int = 0
    messages_per_second: float = 0.0
    target_messages_per_second: float = 0.0
    samples_per_second: float = 0.0
    seconds: float = 0.0
    late_slots: int = 0
    slots: int = 0
    max_lag_seconds: float = 0.0
    p99_lag_seconds: float = 0.0
    publish_errors: int = 0
    published_while_disconnected: int = 0
    blocked_seconds: float = 0.0
    unacknowledged: int = 0
    error: str | None = None


@dataclass(frozen=True)
class Attempt:
    """The worse of two attempts at a step, kept beside the better one."""

    scored_windows_per_second: float
    latency_p50_seconds: float | None
    latency_p99_seconds: float | None
    dropped_windows: float
    cpu_cores: CpuCores
    keeps_up: bool


@dataclass(frozen=True)
class Step:
    sensors: int
    offered_windows_per_second: float
    received_windows_per_second: float
    scored_windows_per_second: float
    messages_per_second: float
    dropped_windows: float
    latency_p50_seconds: float | None
    latency_p99_seconds: float | None
    latency_mean_seconds: float | None
    mean_batch: float | None
    mean_inference_seconds: float | None
    queue_depth_at_end: float
    cpu_cores: CpuCores
    generator: LoadSummary
    generator_on_time: bool
    throughput_ok: bool
    latency_ok: bool
    keeps_up: bool
    measured_seconds: float
    other_attempt: Attempt | None = None

    def attempt(self) -> Attempt:
        return Attempt(
            self.scored_windows_per_second,
            self.latency_p50_seconds,
            self.latency_p99_seconds,
            self.dropped_windows,
            self.cpu_cores,
            self.keeps_up,
        )


@dataclass(frozen=True)
class Run:
    """One daemon configuration stepped through: its steps and what they show."""

    config: RunConfig
    latency_limit_seconds: float
    steps: list[Step]
    sensors_carried: int
    sensors_carried_throughput_only: int
    max_scored_windows_per_second: float
    saturated: bool
    generator_limited: bool


@dataclass(frozen=True)
class EndToEnd:
    stamp: Stamp
    sample_rate_hz: float
    window: int
    warmup_seconds: float
    measure_seconds: float
    runs: list[Run]


@dataclass(frozen=True)
class ScaleStep:
    """One step of the scale-out part: what the instances did together at a number of sensors."""

    sensors: int
    offered_windows_per_second: float
    scored_windows_per_second: float
    scored_share_per_instance: list[float]
    dropped_windows: float
    latency_p99_seconds: float | None  # the instances' histograms merged
    generator_messages_per_second: float
    generator_on_time: bool
    cpu_cores: dict[str, float]  # daemon0, daemon1, ..., generator, broker
    throughput_ok: bool
    latency_ok: bool
    keeps_up: bool

    @property
    def daemon_cores(self) -> list[float]:
        return [value for name, value in sorted(self.cpu_cores.items()) if name.startswith("daemon")]


@dataclass(frozen=True)
class ScaleRun:
    instances: int
    steps: list[ScaleStep]
    sensors_carried: int
    daemon_cpu_ms_per_window: float | None  # at the busiest step whose throughput kept up
    generator_limited: bool


@dataclass(frozen=True)
class ScaleOut:
    stamp: Stamp
    latency_limit_seconds: float
    warmup_seconds: float
    measure_seconds: float
    runs: list[ScaleRun]
    ratio_two_over_one: float | None
    broker_cores_per_1000_messages_per_second: float | None
    load_average_1m_end: float  # other processes on the machine take CPU from the instances


@dataclass(frozen=True)
class SizeRow:
    """One model size of the model table: its training, quality and speed (windows/s by case)."""

    embedding_dim: int
    flops_per_window: int
    parameters: int
    seconds_per_epoch_probe: float
    epochs_cap: int
    epochs_run: int
    best_epoch: int
    train_seconds: float
    threshold: float
    auc: float
    pr_auc: float
    recall: float
    fpr: float
    precision: float
    windows_per_second: dict[str, float]


@dataclass(frozen=True)
class ModelTable:
    stamp: Stamp
    budget_seconds: float
    recipe: str
    rows: list[SizeRow]


@dataclass
class Results:
    """Everything bench/results.json holds; each part's section is replaced when that part runs."""

    machine: Machine | None = None
    last_run: LastRun | None = None
    default_model: DefaultModel | None = None
    flops: Flops | None = None
    limit: Limit | None = None
    tutorial: Tutorial | None = None
    engine: Engine | None = None
    gil: Gil | None = None
    accuracy: Accuracy | None = None
    training: Training | None = None
    transport: Transport | None = None
    e2e: EndToEnd | None = None
    scaleout: ScaleOut | None = None
    beat_e2e: EndToEnd | None = None  # beat mode next to fixed mode
    formats_e2e: EndToEnd | None = None  # JSON and binary frames of 140 samples, fixed and beat mode
    model_table: ModelTable | None = None


ADAPTER = TypeAdapter(Results)


def load(path: Path) -> Results:
    """The results file as records; an empty `Results` when there is none yet."""
    return ADAPTER.validate_json(path.read_bytes()) if path.is_file() else Results()


def save(results: Results, path: Path) -> None:
    path.write_bytes(ADAPTER.dump_json(results, indent=2) + b"\n")
