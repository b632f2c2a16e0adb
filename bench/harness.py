"""What the benchmark's modules share: the repository's paths, what one sensor offers and when a step keeps up,
and the helpers that run a load against daemons and read what they did from outside, as an operator would (their
Prometheus metrics, and the CPU time of each process from psutil)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import psutil

from monitor.telemetry.scrape import histogram_quantile

if TYPE_CHECKING:
    from tests.support import DaemonProcess

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / "data" / "ecg5000"
TEST, TRAIN_NORMAL = "test", "train_normal"

# One sensor: ECG at 250 Hz, scored in windows of 140 samples (the default model's window and stride).
SAMPLE_RATE_HZ = 250.0
WINDOW_SAMPLES = 140
SENSOR_WINDOWS_PER_SECOND = SAMPLE_RATE_HZ / WINDOW_SAMPLES
# A step keeps up when the daemons score this share of the offered windows and drop none, the load generator
# published this share of its schedule, and the p99 decision latency is within max_wait + the margin (fixed mode)
# or within the beat-mode limit from a beat's last sample to its decision.
SCORED_FRACTION_OF_OFFERED = 0.95
GENERATOR_ON_TIME_FRACTION = 0.97
LATENCY_MARGIN_SECONDS = 0.05
BEAT_LATENCY_LIMIT_SECONDS = 1.0
BEAT_WARMUP_SECONDS = 15.0  # beat mode: 2 s of detector learning and 8 beats of template warm-up before measuring


def split_path(data_dir: Path, name: str) -> Path:
    """The file of ECG5000 split `name` under `data_dir`: the first of `.txt`, `.txt.xz`, `.txt.gz` that exists."""
    candidates = [data_dir / "splits" / f"{name}{suffix}" for suffix in (".txt", ".txt.xz", ".txt.gz")]
    return next((path for path in candidates if path.is_file()), candidates[0])  # read_ucr names a missing file


def repo_relative(path: Path) -> str:
    """`path` as written from the repository root when it is inside it."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def cpu_seconds(pid: int) -> float:
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system


def thread_seconds(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of a process (is one thread, e.g. MQTT under the GIL, the bottleneck?)."""
    try:
        return {thread.id: thread.user_time + thread.system_time for thread in psutil.Process(pid).threads()}
    except psutil.Error:
        return {}


def counter(samples: dict, name: str) -> float:
    """A scraped counter or gauge summed over its labels."""
    return sum(value for (sample, _), value in samples.items() if sample == name)


def histogram(samples: dict, name: str) -> dict[str, Any]:
    """Cumulative bucket counts {upper bound: count}, count and sum of a scraped histogram."""
    buckets = {
        float(dict(labels)["le"]): value for (sample, labels), value in samples.items() if sample == f"{name}_bucket"
    }
    return {"buckets": buckets, "count": counter(samples, f"{name}_count"), "sum": counter(samples, f"{name}_sum")}


def load_summary(out: str, err: str) -> dict[str, Any]:
    """The load generator's closing JSON line (bench/loadgen.py), or its error."""
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return orjson.loads(lines[-1]) if lines else {"error": (err or "no summary")[-500:]}


@dataclass(frozen=True)
class Snapshot:
    """What the daemons' metrics and the processes' CPU times read at one moment."""

    at: float
    scrapes: list[dict]
    cpu: dict[str, float]
    threads: dict[int, float]  # the first daemon's threads
    busy: float  # the whole machine's busy CPU seconds

    @classmethod
    def take(cls, daemons: list[DaemonProcess], pids: dict[str, int]) -> Snapshot:
        times = psutil.cpu_times()
        busy = sum(times) - times.idle - getattr(times, "iowait", 0.0)
        cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
        return cls(time.monotonic(), [d.scrape() for d in daemons], cpu, thread_seconds(daemons[0].process.pid), busy)


@dataclass(frozen=True)
class Measured:
    """The interval between two snapshots while the load generator ran, and the generator's summary."""

    before: Snapshot
    after: Snapshot
    load: dict[str, Any]

    @property
    def seconds(self) -> float:
        return self.after.at - self.before.at

    def increases(self, name: str) -> list[float]:
        """How much a counter grew on each daemon."""
        return [
            counter(a, name) - counter(b, name) for a, b in zip(self.after.scrapes, self.before.scrapes, strict=True)
        ]

    def rate(self, name: str) -> float:
        """A counter's growth per second, summed over the daemons."""
        return sum(self.increases(name)) / self.seconds

    def histogram(self, name: str) -> dict[str, Any]:
        """A histogram's growth, merged over the daemons."""
        out: dict[str, Any] = {"buckets": {}, "count": 0.0, "sum": 0.0}
        for a, b in zip(self.after.scrapes, self.before.scrapes, strict=True):
            before, after = histogram(b, name), histogram(a, name)
            for bound, count in after["buckets"].items():
                out["buckets"][bound] = out["buckets"].get(bound, 0.0) + count - before["buckets"].get(bound, 0.0)
            out["count"] += after["count"] - before["count"]
            out["sum"] += after["sum"] - before["sum"]
        out["buckets"] = dict(sorted(out["buckets"].items()))
        return out

    def quantile(self, quantile: float, name: str) -> float | None:
        return histogram_quantile(quantile, self.histogram(name)["buckets"])

    def mean(self, name: str) -> float | None:
        merged = self.histogram(name)
        return merged["sum"] / merged["count"] if merged["count"] else None

    def cores(self) -> dict[str, float]:
        """CPU of each process during the interval, in cores."""
        return {name: (self.after.cpu[name] - self.before.cpu[name]) / self.seconds for name in self.after.cpu}

    def machine_cores(self) -> float:
        return (self.after.busy - self.before.busy) / self.seconds

    def busiest_threads(self, count: int = 3) -> list[float]:
        """CPU of the first daemon's busiest threads, in cores."""
        before, after = self.before.threads, self.after.threads
        cores = sorted(((after[tid] - before.get(tid, 0.0)) / self.seconds for tid in after), reverse=True)
        return [round(value, 3) for value in cores[:count]]

    def generator_on_time(self) -> bool:
        load = self.load
        return not load.get("error") and (
            load["messages_per_second"] >= GENERATOR_ON_TIME_FRACTION * load["target_messages_per_second"]
        )


def measure_load(
    generator_command: list[str], daemons: list[DaemonProcess], pids: dict[str, int], warmup: float, measure: float
) -> Measured:
    """Run the load generator; after `warmup` seconds, what the daemons and `pids` did for `measure` seconds."""
    generator = subprocess.Popen(generator_command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = {**pids, "generator": generator.pid}
    try:
        time.sleep(warmup)
        before = Snapshot.take(daemons, pids)
        time.sleep(measure)
        after = Snapshot.take(daemons, pids)
        out, err = generator.communicate(timeout=warmup + measure + 60)
    except BaseException:
        generator.kill()  # interrupted, or the generator hangs: never leave it publishing
        generator.communicate()
        raise
    return Measured(before, after, load_summary(out, err))


def drain(daemon: DaemonProcess, timeout: float = 60.0) -> None:
    """Wait until the daemon's scoring queue is empty and its scored count stops moving (before the next step)."""
    deadline, last = time.monotonic() + timeout, -1.0
    while time.monotonic() < deadline:
        samples = daemon.scrape()
        scored = counter(samples, "monitor_windows_scored_total")
        if counter(samples, "monitor_queue_depth") == 0 and scored == last:
            return
        last = scored
        time.sleep(1.0)


def step_up(step: Callable[[int], dict[str, Any]], sensor_counts: list[int], retry: bool) -> list[dict[str, Any]]:
    """Steps through the sensor counts until throughput fails or the generator cannot keep its schedule.

    A step whose only failure is latency is recorded and stepping goes on. With `retry`, a step that fails is run
    once more and the better attempt counts (other processes only ever slow the daemon down); the worse is kept
    beside it as `other_attempt`."""
    rows: list[dict[str, Any]] = []
    for sensors in sensor_counts:
        row = step(sensors)
        if retry and not row["keeps_up"]:
            worse, row = sorted(
                (row, step(sensors)), key=lambda r: (r["keeps_up"], r["throughput_ok"], r["scored_windows_per_second"])
            )
            attempt = ("scored_windows_per_second", "latency_p50_seconds", "latency_p99_seconds", "dropped_windows")
            row["other_attempt"] = {key: worse[key] for key in (*attempt, "cpu_cores", "keeps_up")}
        rows.append(row)
        if not row["generator_on_time"] or not row["throughput_ok"]:
            break
    return rows
