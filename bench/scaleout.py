"""One instance against two, side by side in one run: the same machine, the same partitioning broker (a real
nats-server from deploy/nats/nats-server.conf, 2 partitions), the same load generator (bench/loadgen.py).

Sensors at 250 Hz are stepped up until the instances no longer keep up; a step keeps up when the windows
scored (summed over the instances) are at least 95 % of those offered, none is dropped, the generator kept
its schedule, and the p99 decision latency (the instances' histograms merged) is at most
`max_wait_seconds` + 50 ms. The single instance subscribes to both partitions with one wildcard filter
(`shard/+/sensors/+/ecg`); each of the two takes one partition (`partitions: {count: 2, consume: [i]}`).

    python -m bench.run --parts scaleout      # into bench/results.json and bench/RESULTS.md, with the other parts
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

import orjson

from bench import loadgen, targets
from bench.e2e import counter_sum, cpu_seconds, histogram, histogram_delta
from bench.records import ScaleOut, ScaleRun, ScaleStep, Stamp
from monitor.telemetry.scrape import histogram_quantile
from tests.nats import NatsServer
from tests.support import REPO, DaemonProcess, daemon_config, wait_until

PARTITIONS = 2
CHUNK = 35
MAX_WAIT_SECONDS = 0.05  # the daemon's default
LATENCY = "monitor_decision_latency_seconds"


def instance_configs(work: Path, port: int, instances: int, model: Path) -> list[Path]:
    """One config per instance: partition i of 2 each, or, alone, every partition through one wildcard filter."""
    base = {"batching": {"max_batch": 64, "max_wait_seconds": MAX_WAIT_SECONDS}, "windowing": {"max_sensors": 100000}}
    configs = []
    for index in range(instances):
        mqtt = {"protocol": "3.1.1", "client_id": f"scaleout-{instances}-{index}-{time.time_ns() % 10**9}"}
        if instances == 1:
            sections = {**base, "mqtt": {**mqtt, "subscribe": ["shard/+/sensors/+/ecg"], "sensor_id_level": 3}}
        else:
            sections = {**base, "mqtt": mqtt, "partitions": {"count": PARTITIONS, "consume": [index]}}
        configs.append(daemon_config(work / f"monitor-{instances}-{index}.yaml", port, model=model, **sections))
    return configs


def step(
    nats: NatsServer, daemons: list[DaemonProcess], sensors: int, data: Path, warmup: float, measure: float
) -> ScaleStep:
    """Offer `sensors` for warmup + measure seconds; what the instances did during `measure`, summed."""
    generator = subprocess.Popen(
        loadgen.command(nats.port, sensors, warmup + measure + 1.0, targets.SAMPLE_RATE_HZ, CHUNK, 1, data),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pids = {f"daemon{index}": daemon.process.pid for index, daemon in enumerate(daemons)}
    pids |= {"generator": generator.pid, "broker": nats.process.pid}
    try:
        time.sleep(warmup)
        before, cpu_before, t0 = (
            [d.scrape() for d in daemons],
            {k: cpu_seconds(p) for k, p in pids.items()},
            time.monotonic(),
        )
        time.sleep(measure)
        after, cpu_after, t1 = (
            [d.scrape() for d in daemons],
            {k: cpu_seconds(p) for k, p in pids.items()},
            time.monotonic(),
        )
        out, err = generator.communicate(timeout=warmup + measure + 60)
    except BaseException:
        generator.kill()
        generator.communicate()
        raise
    for daemon in daemons:  # let each empty its queue before the next step
        wait_until(
            lambda d=daemon: d.scrape().get(("monitor_queue_depth", ()), 0.0) == 0, 60, interval=0.5, what="queue empty"
        )
    elapsed = t1 - t0
    summaries = [line for line in out.splitlines() if line.startswith("{")]
    load = orjson.loads(summaries[-1]) if summaries else {"error": (err or "no summary")[-300:]}

    def increase(name: str) -> float:
        return sum(counter_sum(a, name) - counter_sum(b, name) for a, b in zip(after, before, strict=True))

    buckets: dict[float, float] = {}
    for a, b in zip(after, before, strict=True):
        for bound, count in histogram_delta(histogram(b, LATENCY), histogram(a, LATENCY))["buckets"].items():
            buckets[bound] = buckets.get(bound, 0.0) + count
    offered = sensors * targets.SENSOR_WINDOWS_PER_SECOND
    scored = increase("monitor_windows_scored_total") / elapsed
    dropped = increase("monitor_windows_dropped_total")
    p99 = histogram_quantile(0.99, dict(sorted(buckets.items())))
    on_time = "error" not in load and (
        load["messages_per_second"] >= targets.GENERATOR_ON_TIME_FRACTION * load["target_messages_per_second"]
    )
    throughput_ok = scored >= targets.SCORED_FRACTION_OF_OFFERED * offered and dropped == 0
    latency_ok = p99 is not None and p99 <= MAX_WAIT_SECONDS + targets.LATENCY_MARGIN_SECONDS
    per_instance = [
        counter_sum(a, "monitor_windows_scored_total") - counter_sum(b, "monitor_windows_scored_total")
        for a, b in zip(after, before, strict=True)
    ]
    return ScaleStep(
        sensors=sensors,
        offered_windows_per_second=round(offered, 1),
        scored_windows_per_second=round(scored, 1),
        scored_share_per_instance=[round(value / max(sum(per_instance), 1.0), 3) for value in per_instance],
        dropped_windows=dropped,
        latency_p99_seconds=p99,
        generator_messages_per_second=round(load.get("messages_per_second", 0.0), 1),
        generator_on_time=on_time,
        cpu_cores={name: round((cpu_after[name] - cpu_before[name]) / elapsed, 2) for name in pids},
        throughput_ok=throughput_ok,
        latency_ok=latency_ok,
        keeps_up=throughput_ok and latency_ok and on_time,
    )


def sweep(instances: int, steps: list[int], data: Path, model: Path, warmup: float, measure: float) -> ScaleRun:
    """Step the sensors up on `instances` daemons behind a fresh nats-server until throughput fails."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-scaleout-") as directory:
        work = Path(directory)
        nats = NatsServer(work / "nats", partitions=PARTITIONS).start()
        daemons: list[DaemonProcess] = []
        try:
            daemons = [DaemonProcess(config) for config in instance_configs(work, nats.port, instances, model)]
            for daemon in daemons:
                daemon.wait_for_event("ready", timeout=120)
            step(nats, daemons, steps[0], data, warmup, measure)  # unmeasured: the first batches are slow
            for sensors in steps:
                row = step(nats, daemons, sensors, data, warmup, measure)
                print(
                    f"    {instances} instance(s), {sensors:5d} sensors: scored {row.scored_windows_per_second:7.1f} "
                    f"of {row.offered_windows_per_second:7.1f} windows/s, p99 {row.latency_p99_seconds}, "
                    f"cpu {row.cpu_cores} {'ok' if row.keeps_up else 'NOT KEEPING UP'}",
                    flush=True,
                )
                rows.append(row)
                if not row.throughput_ok or not row.generator_on_time:
                    break
        finally:
            for daemon in daemons:
                daemon.stop()
                daemon.kill()
            nats.stop()
    carried = max((row.sensors for row in rows if row.keeps_up), default=0)
    generator_limited = bool(rows) and not rows[-1].generator_on_time
    return ScaleRun(instances, rows, carried, daemon_cost(rows), generator_limited)


def compare(stamp: Stamp, model: Path, data: Path, steps: list[int], warmup: float, measure: float) -> ScaleOut:
    """One instance, then two, each behind a fresh nats-server, stepped through the same sensor counts."""
    runs = [sweep(instances, steps, data, model, warmup, measure) for instances in (1, 2)]
    one, two = (run.sensors_carried for run in runs)
    limit = MAX_WAIT_SECONDS + targets.LATENCY_MARGIN_SECONDS
    ratio = round(two / one, 2) if one else None
    return ScaleOut(stamp, limit, warmup, measure, runs, ratio, broker_cost(runs), os.getloadavg()[0])


def daemon_cost(rows: list[ScaleStep]) -> float | None:
    """CPU milliseconds the instances spent per window scored (MQTT, windowing and scoring), at the busiest step
    whose throughput kept up: what a core can carry, whatever share of the machine the instances got."""
    kept = [row for row in rows if row.throughput_ok and row.scored_windows_per_second]
    if not kept:
        return None
    busiest = max(kept, key=lambda row: row.scored_windows_per_second)
    return round(1000 * sum(busiest.daemon_cores) / busiest.scored_windows_per_second, 3)


def broker_cost(runs: list[ScaleRun]) -> float | None:
    """nats-server's CPU (cores) per 1,000 messages/s routed, at the busiest step that kept up."""
    kept = [row for run in runs for row in run.steps if row.keeps_up and row.generator_messages_per_second]
    if not kept:
        return None
    busiest = max(kept, key=lambda row: row.generator_messages_per_second)
    return round(1000 * busiest.cpu_cores["broker"] / busiest.generator_messages_per_second, 3)
