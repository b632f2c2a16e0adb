"""The whole daemon end to end: a real Mosquitto, `monitor run` as a child process, and a load
generator process stepping up the number of 250 Hz sensors until the daemon no longer keeps up.

Everything is read from outside, as an operator would: the daemon's own Prometheus metrics
(windows scored, drops, the decision-latency histogram), and CPU time of each process (psutil).
The broker, daemon process and metrics scrape come from the test suite's fixtures (tests/support.py).
"""

from __future__ import annotations

import dataclasses
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import psutil
import yaml

from bench import loadgen, targets
from bench.data import REPO
from bench.records import CpuCores, LoadSummary, Run, RunConfig, Step
from monitor.telemetry.scrape import histogram_quantile
from tests.support import Broker, DaemonProcess, daemon_config

LATENCY = "monitor_decision_latency_seconds"
BEAT_MODEL = REPO / "models" / "mitdb-beats"
BEAT_RECORDING = REPO / "data" / "mitdb-dev" / "test" / "116.npy"  # 1.3 beats/s, tall QRS, some PVCs


def histogram(samples: dict, name: str) -> dict[str, Any]:
    """Cumulative bucket counts {upper bound: count}, count and sum of a scraped histogram."""
    buckets = {}
    for (sample, labels), value in samples.items():
        if sample == f"{name}_bucket":
            buckets[float(dict(labels)["le"])] = value
    return {
        "buckets": dict(sorted(buckets.items())),
        "count": samples.get((f"{name}_count", ()), 0.0),
        "sum": samples.get((f"{name}_sum", ()), 0.0),
    }


def histogram_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    return {
        "buckets": {bound: after["buckets"][bound] - before["buckets"].get(bound, 0.0) for bound in after["buckets"]},
        "count": after["count"] - before["count"],
        "sum": after["sum"] - before["sum"],
    }


def counter_sum(samples: dict, name: str) -> float:
    return sum(value for (sample, _), value in samples.items() if sample == name)


def cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
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


def system_busy_seconds() -> float:
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


class EndToEnd:
    """One broker and one daemon (backend, threads); `step(n)` offers n sensors and measures."""

    def __init__(self, model: Path, run: RunConfig, work: Path, normal_data: Path) -> None:
        self.model, self.run, self.normal_data = model, run, normal_data
        backend, threads, max_batch, max_wait = run.backend, run.threads, run.max_batch, run.max_wait
        self.work = work
        self.broker = Broker(work / "mosquitto").start()
        beats = run.mode == "beats"
        config_path = daemon_config(work / "monitor.yaml", self.broker.port, model=BEAT_MODEL if beats else model)
        config = yaml.safe_load(config_path.read_text())
        config["model"].update({"backend": backend, "threads": threads})
        config["windowing"] = {"max_sensors": 100000}
        if beats:
            config["windowing"].update({"mode": "beats", "sample_rate_hz": targets.SAMPLE_RATE_HZ})
        config["batching"] = {"max_batch": max_batch, "max_wait_seconds": max_wait, "queue_capacity": 4096}
        config["mqtt"]["client_id"] = f"bench-{backend}-t{threads}-{time.time_ns() % 10**9}"
        config["mqtt"]["protocol"] = run.protocol
        config["input"] = {"format": run.input_format}  # the generator's sensor topics carry this one format
        config_path.write_text(yaml.safe_dump(config))
        self.config = config
        self.daemon = None
        try:
            self.daemon = DaemonProcess(config_path)
            self.daemon.wait_for_event("ready", timeout=120)
        except BaseException:
            if self.daemon is not None:
                self.daemon.kill()
            self.broker.stop()
            raise

    def close(self) -> None:
        try:
            self.daemon.stop()
        finally:
            self.daemon.kill()
            self.broker.stop()

    def drain(self, timeout: float = 60.0) -> None:
        """Wait until the scoring queue is empty and the scored count stops moving."""
        deadline = time.monotonic() + timeout
        last = -1.0
        while time.monotonic() < deadline:
            samples = self.daemon.scrape()
            scored = counter_sum(samples, "monitor_windows_scored_total")
            if samples.get(("monitor_queue_depth", ()), 0.0) == 0 and scored == last:
                return
            last = scored
            time.sleep(1.0)

    def step(self, sensors: int, warmup: float, measure: float) -> Step:
        chunk, rate, window = self.run.chunk, targets.SAMPLE_RATE_HZ, targets.WINDOW_SAMPLES
        beats = self.run.mode == "beats"
        generator = subprocess.Popen(
            loadgen.command(
                self.broker.port,
                sensors,
                warmup + measure + 1.0,
                rate,
                chunk,
                self.run.qos,
                BEAT_RECORDING if beats else self.normal_data,
                recording=beats,
                input_format=self.run.input_format,
            ),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        pids = {"daemon": self.daemon.process.pid, "generator": generator.pid, "broker": self.broker.process.pid}
        try:
            time.sleep(warmup)
            threads_before = thread_seconds(pids["daemon"])
            before, cpu_before, busy_before, t0 = (
                self.daemon.scrape(),
                {k: cpu_seconds(p) for k, p in pids.items()},
                system_busy_seconds(),
                time.monotonic(),
            )
            time.sleep(measure)
            after, cpu_after, busy_after, t1 = (
                self.daemon.scrape(),
                {k: cpu_seconds(p) for k, p in pids.items()},
                system_busy_seconds(),
                time.monotonic(),
            )
            threads_after = thread_seconds(pids["daemon"])
            out, err = generator.communicate(timeout=warmup + measure + 60)
        except BaseException:
            generator.kill()  # interrupted, or the generator hangs: never leave it publishing
            generator.communicate()
            raise
        summaries = [line for line in out.splitlines() if line.startswith("{")]
        load = (
            LoadSummary(**orjson.loads(summaries[-1])) if summaries else LoadSummary(error=(err or "no summary")[-500:])
        )
        self.drain()
        elapsed = t1 - t0

        def increase(name: str) -> float:
            return counter_sum(after, name) - counter_sum(before, name)

        def delta(name: str) -> dict[str, Any]:
            return histogram_delta(histogram(before, name), histogram(after, name))

        latency, batch = delta(LATENCY), delta("monitor_inference_batch_size")
        inference = delta("monitor_inference_seconds")
        offered = sensors * rate / window
        if beats:  # one window per scorable beat the detector found
            offered = (increase("monitor_beats_found_total") - increase("monitor_beats_unscorable_total")) / elapsed
        scored = increase("monitor_windows_scored_total") / elapsed
        dropped = increase("monitor_windows_dropped_total")
        p50, p99 = histogram_quantile(0.5, latency["buckets"]), histogram_quantile(0.99, latency["buckets"])
        process = {name: (cpu_after[name] - cpu_before[name]) / elapsed for name in pids}
        whole = (busy_after - busy_before) / elapsed
        per_thread = sorted(
            ((threads_after[tid] - threads_before.get(tid, 0.0)) / elapsed for tid in threads_after), reverse=True
        )
        cpu = CpuCores(
            daemon=process["daemon"],
            generator=process["generator"],
            broker=process["broker"],
            whole_machine=whole,
            others=max(whole - sum(process.values()), 0.0),
            daemon_busiest_threads=[round(value, 3) for value in per_thread[:3]],
        )
        on_time = (
            load.error is None
            and load.messages_per_second >= targets.GENERATOR_ON_TIME_FRACTION * load.target_messages_per_second
        )
        throughput_ok = scored >= targets.SCORED_FRACTION_OF_OFFERED * offered and dropped == 0
        if beats:  # the beats found are only all that was offered if every sample got in
            received = increase("monitor_samples_received_total") / elapsed
            throughput_ok = throughput_ok and received >= targets.SCORED_FRACTION_OF_OFFERED * sensors * rate
        latency_ok = p99 is not None and p99 <= latency_limit(self.run)
        return Step(
            sensors=sensors,
            offered_windows_per_second=offered,
            received_windows_per_second=increase("monitor_samples_received_total") / elapsed / window,
            scored_windows_per_second=scored,
            messages_per_second=increase("monitor_messages_received_total") / elapsed,
            dropped_windows=dropped,
            latency_p50_seconds=p50,
            latency_p99_seconds=p99,
            latency_mean_seconds=mean(latency),
            mean_batch=mean(batch),
            mean_inference_seconds=mean(inference),
            queue_depth_at_end=after.get(("monitor_queue_depth", ()), 0.0),
            cpu_cores=cpu,
            generator=load,
            generator_on_time=on_time,
            throughput_ok=throughput_ok,
            latency_ok=latency_ok,
            keeps_up=throughput_ok and latency_ok and on_time,
            measured_seconds=elapsed,
        )


def latency_limit(run: RunConfig) -> float:
    """The p99 decision latency a step may have: the configuration's max_wait plus the target's margin (fixed
    mode), or 1 s from a beat's last sample to its decision (beat mode)."""
    if run.mode == "beats":
        return targets.BEAT_LATENCY_LIMIT_SECONDS
    return run.max_wait + targets.LATENCY_MARGIN_SECONDS


def mean(histogram: dict[str, Any]) -> float | None:
    return histogram["sum"] / histogram["count"] if histogram["count"] else None


def attempt_rank(row: Step) -> tuple[bool, bool, float]:
    return row.keeps_up, row.throughput_ok, row.scored_windows_per_second


def print_step(row: Step, note: str = "") -> None:
    cpu = row.cpu_cores
    print(
        f"    sensors={row.sensors:5d}{note}: offered {row.offered_windows_per_second:7.1f} "
        f"scored {row.scored_windows_per_second:7.1f} windows/s, p50 {fmt_ms(row.latency_p50_seconds)} "
        f"p99 {fmt_ms(row.latency_p99_seconds)}, dropped {row.dropped_windows:.0f}, "
        f"cpu daemon {cpu.daemon:.2f} gen {cpu.generator:.2f} broker {cpu.broker:.2f} others {cpu.others:.2f} "
        f"{'ok' if row.keeps_up else 'NOT KEEPING UP'}",
        flush=True,
    )


def sweep(model: Path, normal_data: Path, config: RunConfig, steps: list[int], warmup: float, measure: float) -> Run:
    """Step the sensors up until throughput fails (or the generator cannot keep its schedule).

    A step whose only failure is the p99 latency is recorded and stepping goes on, so the table
    shows both where latency breaks and where throughput does; `sensors_carried` needs all criteria.
    """
    rows: list[Step] = []
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as directory:
        run = EndToEnd(model, config, Path(directory), normal_data)
        try:
            for sensors in steps:
                row = run.step(sensors, warmup, measure)
                print_step(row)
                if not row.keeps_up:
                    # Other processes on the machine only ever slow the daemon down: a step that fails is run
                    # once more, and the better attempt counts (both are kept in the results).
                    again = run.step(sensors, warmup, measure)
                    print_step(again, "(again)")
                    worse, better = (row, again) if attempt_rank(again) >= attempt_rank(row) else (again, row)
                    row = dataclasses.replace(better, other_attempt=worse.attempt())
                rows.append(row)
                if not row.generator_on_time or not row.throughput_ok:
                    break
        finally:
            run.close()
    carried = [row.sensors for row in rows if row.keeps_up]
    throughput_carried = [row.sensors for row in rows if row.throughput_ok and row.generator_on_time]
    return Run(
        config=config,
        latency_limit_seconds=latency_limit(config),
        steps=rows,
        sensors_carried=max(carried, default=0),
        sensors_carried_throughput_only=max(throughput_carried, default=0),
        max_scored_windows_per_second=max((row.scored_windows_per_second for row in rows), default=0.0),
        saturated=bool(rows) and not rows[-1].throughput_ok and rows[-1].generator_on_time,
        generator_limited=bool(rows) and not rows[-1].generator_on_time,
    )


def fmt_ms(seconds: float | None) -> str:
    return "   n/a" if seconds is None else f"{seconds * 1000:5.0f}ms"
