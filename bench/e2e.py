"""The daemon end to end: `monitor run` as child processes behind a real broker, and a load generator process
(bench/loadgen.py) stepping up the number of 250 Hz sensors until the daemons no longer keep up.

- `sweep`: one daemon behind Mosquitto, in the configuration a `RunConfig` describes (fixed or beat mode);
- `scale_out`: one instance, then two, behind the same partitioning nats-server (deploy/nats/nats-server.conf, 2
  partitions): the single instance subscribes to both partitions with one wildcard filter, each of the two takes one.
Everything is read from outside (bench/harness.py): the daemons' metrics and psutil's CPU times per process.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from bench import loadgen
from bench.harness import (
    BEAT_LATENCY_LIMIT_SECONDS,
    LATENCY_MARGIN_SECONDS,
    REPO,
    SAMPLE_RATE_HZ,
    SCORED_FRACTION_OF_OFFERED,
    SENSOR_WINDOWS_PER_SECOND,
    WINDOW_SAMPLES,
    Measured,
    counter,
    drain,
    measure_load,
    step_up,
)
from tests.nats import NatsServer
from tests.support import Broker, DaemonProcess, daemon_config

LATENCY = "monitor_decision_latency_seconds"
BEAT_MODEL = REPO / "models" / "mitdb-beats"
BEAT_RECORDING = REPO / "data" / "mitdb-dev" / "test" / "116.npy"  # 1.3 beats/s, tall QRS, some PVCs
PARTITIONS = 2


@dataclass(frozen=True)
class RunConfig:
    """One daemon configuration to step through;
    `backend:threads[:qosN][:bN][:wN][:cN][:sN][:p311][:beats][:frame][:bf16]`.

    e.g. `torch:1` (the daemon's defaults), `torch:1:qos0` (sensors publish at QoS 0),
    `torch:1:b32` (max_batch 32), `onnx:1:w25` (max_wait 25 ms), `torch:1:c140` (140 samples a message),
    `torch:1:s2` (model.workers 2: each batch scored in two slices at once),
    `torch:1:p311` (the daemon speaks MQTT 3.1.1 instead of its default 5), `torch:1:beats` (beat mode: the beat
    model, sensors stream a raw MIT-BIH lead), `torch:1:c140:frame` (sensors send binary frames instead of JSON),
    `torch:1:bf16` (model.dtype bfloat16).
    """

    backend: str = "torch"
    threads: int = 1
    qos: int = 1
    max_batch: int = 64
    max_wait: float = 0.05
    chunk: int = 35
    protocol: str = "5"
    mode: str = "fixed"
    input_format: str = "json"  # `frame`: sensors send binary frames (float32)
    workers: int = 1  # model.workers
    dtype: str = "float32"  # model.dtype

    @classmethod
    def parse(cls, text: str, qos: int = 1) -> RunConfig:
        fields = text.strip().split(":")
        if len(fields) < 2 or fields[0] not in ("torch", "onnx"):
            raise ValueError(
                f"{text!r}: expected backend:threads[:qosN][:bN][:wMS][:cN][:sN][:p311][:beats][:frame][:bf16], "
                "torch or onnx"
            )
        values: dict[str, Any] = {"backend": fields[0], "threads": int(fields[1]), "qos": qos}
        numbers = {"qos": "qos", "b": "max_batch", "w": "max_wait", "c": "chunk", "s": "workers"}  # prefix -> field
        for token in fields[2:]:
            prefix = next((p for p in numbers if token.startswith(p) and token[len(p) :].isdigit()), None)
            if token == "beats":
                values["mode"] = "beats"
            elif token == "p311":
                values["protocol"] = "3.1.1"
            elif token == "frame":
                values["input_format"] = "frame"
            elif token == "bf16":
                values["dtype"] = "bfloat16"
            elif prefix is not None:
                number = int(token[len(prefix) :])
                values[numbers[prefix]] = number / 1000 if prefix == "w" else number
            else:
                raise ValueError(f"{text!r}: unknown option {token!r}")
        return cls(**values)

    @property
    def label(self) -> str:
        return (
            f"{self.backend}, {self.threads} thread(s), max_batch {self.max_batch}, "
            f"max_wait {self.max_wait * 1000:.0f} ms, input QoS {self.qos}, {self.chunk} samples/message, "
            f"MQTT {self.protocol}"
            + (f", {self.workers} scoring workers" if self.workers != 1 else "")
            + (", beat mode" if self.mode == "beats" else "")
            + (", binary frames" if self.input_format == "frame" else "")
            + (f", {self.dtype}" if self.dtype != "float32" else "")
        )

    @property
    def text(self) -> str:
        """The configuration as `parse` reads it (options at their defaults left out)."""
        options = [f"qos{self.qos}" if self.qos != 1 else "", f"b{self.max_batch}" if self.max_batch != 64 else ""]
        options += [
            f"w{self.max_wait * 1000:.0f}" if self.max_wait != 0.05 else "",
            f"c{self.chunk}" if self.chunk != 35 else "",
            f"s{self.workers}" if self.workers != 1 else "",
        ]
        options += ["p311" if self.protocol == "3.1.1" else "", "beats" if self.mode == "beats" else ""]
        options += ["frame" if self.input_format == "frame" else "", "bf16" if self.dtype == "bfloat16" else ""]
        return ":".join([self.backend, str(self.threads), *filter(None, options)])

    @property
    def latency_limit(self) -> float:
        """The p99 decision latency a step may have: max_wait plus the margin, or the beat-mode limit."""
        return BEAT_LATENCY_LIMIT_SECONDS if self.mode == "beats" else self.max_wait + LATENCY_MARGIN_SECONDS


SCALE_OUT = RunConfig(protocol="3.1.1")  # the daemons' defaults, MQTT 3.1.1 as nats-server's MQTT speaks it


@contextmanager
def daemons(configs: list[Path]) -> Iterator[list[DaemonProcess]]:
    """`monitor run` for each config, ready; shut down on leaving."""
    started: list[DaemonProcess] = []
    try:
        started += [DaemonProcess(config) for config in configs]
        for daemon in started:
            daemon.wait_for_event("ready", timeout=120)
        yield started
    finally:
        for daemon in started:
            daemon.shutdown(60)


def sweep(model: Path, normal_data: Path, run: RunConfig, steps: list[int], warmup: float, measure: float) -> dict:
    """One daemon behind a fresh Mosquitto, stepped through `steps` sensors; a failed step is tried twice."""
    beats = run.mode == "beats"
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as directory:
        work = Path(directory)
        broker = Broker(work / "mosquitto").start()
        windowing = {"max_sensors": 100000, **({"mode": "beats", "sample_rate_hz": SAMPLE_RATE_HZ} if beats else {})}
        config = daemon_config(
            work / "monitor.yaml",
            broker.port,
            model=BEAT_MODEL if beats else model,
            windowing=windowing,
            batching={"max_batch": run.max_batch, "max_wait_seconds": run.max_wait, "queue_capacity": 4096},
            mqtt={"client_id": f"bench-{run.text}-{time.time_ns() % 10**9}", "protocol": run.protocol},
            input={"format": run.input_format},  # the generator's sensor topics carry this one format
        )
        settings = yaml.safe_load(config.read_text())
        settings["model"].update(backend=run.backend, threads=run.threads, workers=run.workers, dtype=run.dtype)
        config.write_text(yaml.safe_dump(settings))
        try:
            rows = stepped(broker, [config], run, BEAT_RECORDING if beats else normal_data, steps, warmup, measure)
        finally:
            broker.stop()
    throughput = [row["sensors"] for row in rows if row["throughput_ok"] and row["generator_on_time"]]
    return {
        "config": asdict(run),
        "latency_limit_seconds": run.latency_limit,
        "steps": rows,
        "sensors_carried": max((row["sensors"] for row in rows if row["keeps_up"]), default=0),
        "sensors_carried_throughput_only": max(throughput, default=0),
        "max_scored_windows_per_second": max((row["scored_windows_per_second"] for row in rows), default=0.0),
        "saturated": bool(rows) and not rows[-1]["throughput_ok"] and rows[-1]["generator_on_time"],
        "generator_limited": bool(rows) and not rows[-1]["generator_on_time"],
    }


def stepped(
    broker: Broker | NatsServer, configs: list[Path], run: RunConfig, data: Path, steps: list[int], *times: float
) -> list[dict[str, Any]]:
    """The daemons of `configs` behind `broker`, stepped through `steps` sensors (bench/harness.py, `step_up`):
    one daemon has a failed step tried twice; several are warmed up first by an unmeasured step."""
    warmup, measure = times
    with daemons(configs) as started:
        pids = {f"daemon{index}" if len(started) > 1 else "daemon": d.process.pid for index, d in enumerate(started)}

        def step(sensors: int) -> dict[str, Any]:
            rate, beats = SAMPLE_RATE_HZ, run.mode == "beats"
            timing = (warmup + measure + 1, rate, run.chunk, run.qos)
            command = loadgen.command(broker.port, sensors, *timing, data, beats, run.input_format)
            measured = measure_load(command, started, pids | {"broker": broker.process.pid}, warmup, measure)
            for daemon in started:
                drain(daemon)
            return step_figures(run, sensors, measured)

        if len(started) > 1:
            step(steps[0])  # unmeasured: the first batches are slow
        return step_up(step, steps, retry=len(started) == 1)


def step_figures(run: RunConfig, sensors: int, measured: Measured) -> dict[str, Any]:
    """A step's figures, summed over the daemons (latency histograms merged); in beat mode one window is offered
    per scorable beat the detector found, and throughput needs every sample to have got in."""
    seconds = measured.seconds
    offered = sensors * SENSOR_WINDOWS_PER_SECOND
    if run.mode == "beats":
        found = sum(measured.increases("monitor_beats_found_total"))
        offered = (found - sum(measured.increases("monitor_beats_unscorable_total"))) / seconds
    scored = measured.rate("monitor_windows_scored_total")
    dropped = sum(measured.increases("monitor_windows_dropped_total"))
    received = measured.rate("monitor_samples_received_total")
    p99 = measured.quantile(0.99, LATENCY)
    cores, machine = measured.cores(), measured.machine_cores()
    on_time = measured.generator_on_time()
    throughput_ok = scored >= SCORED_FRACTION_OF_OFFERED * offered and dropped == 0
    if run.mode == "beats":
        throughput_ok = throughput_ok and received >= SCORED_FRACTION_OF_OFFERED * sensors * SAMPLE_RATE_HZ
    latency_ok = p99 is not None and p99 <= run.latency_limit
    per_daemon = measured.increases("monitor_windows_scored_total")
    row = {
        "sensors": sensors,
        "offered_windows_per_second": offered,
        "received_windows_per_second": received / WINDOW_SAMPLES,
        "scored_windows_per_second": scored,
        "scored_share_per_instance": [round(value / max(sum(per_daemon), 1.0), 3) for value in per_daemon],
        "messages_per_second": measured.rate("monitor_messages_received_total"),
        "dropped_windows": dropped,
        "latency_p50_seconds": measured.quantile(0.5, LATENCY),
        "latency_p99_seconds": p99,
        "latency_mean_seconds": measured.mean(LATENCY),
        "mean_batch": measured.mean("monitor_inference_batch_size"),
        "mean_inference_seconds": measured.mean("monitor_inference_seconds"),
        "queue_depth_at_end": sum(counter(scrape, "monitor_queue_depth") for scrape in measured.after.scrapes),
        "cpu_cores": cores | {"whole_machine": machine, "others": max(machine - sum(cores.values()), 0.0)},
        "generator": measured.load,
        "generator_on_time": on_time,
        "throughput_ok": throughput_ok,
        "latency_ok": latency_ok,
        "keeps_up": throughput_ok and latency_ok and on_time,
        "measured_seconds": seconds,
    }
    row["cpu_cores"]["daemon_busiest_threads"] = measured.busiest_threads()
    cpu = ", ".join(f"{name} {value:.2f}" for name, value in cores.items())
    verdict = "ok" if row["keeps_up"] else "NOT KEEPING UP"
    print(
        f"    {sensors} sensors: {scored:.1f} of {offered:.1f} windows/s, p99 {p99}, cpu {cpu}: {verdict}", flush=True
    )
    return row


def daemon_cores(cpu: dict[str, Any]) -> list[float]:
    """The daemons' CPU in a step's `cpu_cores` (`daemon`, or `daemon0`, `daemon1`, ...)."""
    return [value for name, value in sorted(cpu.items()) if name == "daemon" or name.removeprefix("daemon").isdigit()]


def scale_out(model: Path, data: Path, steps: list[int], warmup: float, measure: float) -> dict[str, Any]:
    """One instance, then two, each behind a fresh nats-server, stepped through the same sensor counts."""
    runs = [scale_run(instances, steps, data, model, warmup, measure) for instances in (1, 2)]
    one, two = (run["sensors_carried"] for run in runs)
    kept = [row for run in runs for row in run["steps"] if row["keeps_up"]]
    busiest = max(kept, key=lambda row: row["generator"]["messages_per_second"], default=None)
    return {
        "latency_limit_seconds": SCALE_OUT.latency_limit,
        "warmup_seconds": warmup,
        "measure_seconds": measure,
        "runs": runs,
        "ratio_two_over_one": round(two / one, 2) if one else None,
        # nats-server's CPU (cores) per 1,000 messages/s routed, at the busiest step that kept up
        "broker_cores_per_1000_messages_per_second": busiest
        and round(1000 * busiest["cpu_cores"]["broker"] / busiest["generator"]["messages_per_second"], 3),
        "load_average_1m_end": os.getloadavg()[0],  # other processes on the machine take CPU from the instances
    }


def scale_run(instances: int, steps: list[int], data: Path, model: Path, warmup: float, measure: float) -> dict:
    """`instances` daemons behind a fresh nats-server: one subscribed to both partitions, or one partition each."""
    base = {"batching": {"max_batch": 64, "max_wait_seconds": SCALE_OUT.max_wait}, "windowing": {"max_sensors": 10**5}}
    with tempfile.TemporaryDirectory(prefix="bench-scaleout-") as directory:
        work = Path(directory)
        nats = NatsServer(work / "nats", partitions=PARTITIONS).start()
        configs = []
        for index in range(instances):
            mqtt = {"protocol": "3.1.1", "client_id": f"scaleout-{instances}-{index}-{time.time_ns() % 10**9}"}
            if instances == 1:
                sections = {**base, "mqtt": {**mqtt, "subscribe": ["shard/+/sensors/+/ecg"], "sensor_id_level": 3}}
            else:
                sections = {**base, "mqtt": mqtt, "partitions": {"count": PARTITIONS, "consume": [index]}}
            configs.append(daemon_config(work / f"monitor-{index}.yaml", nats.port, model=model, **sections))
        try:
            rows = stepped(nats, configs, SCALE_OUT, data, steps, warmup, measure)
        finally:
            nats.stop()
    kept = [row for row in rows if row["throughput_ok"] and row["scored_windows_per_second"]]
    busiest = max(kept, key=lambda row: row["scored_windows_per_second"], default=None)
    cores = busiest and sum(daemon_cores(busiest["cpu_cores"]))
    return {
        "instances": instances,
        "steps": rows,
        "sensors_carried": max((row["sensors"] for row in rows if row["keeps_up"]), default=0),
        # CPU ms the instances spent per window scored (MQTT, windowing and scoring) at the busiest step whose
        # throughput kept up: what a core carries, whatever share of the machine the instances got
        "daemon_cpu_ms_per_window": busiest and round(1000 * cores / busiest["scored_windows_per_second"], 3),
        "generator_limited": bool(rows) and not rows[-1]["generator_on_time"],
    }
