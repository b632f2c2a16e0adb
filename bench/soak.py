"""Soak: hundreds of sensors for minutes, with attacks mixed in; every legitimate window must be
scored and the daemon's memory and file descriptors must stay flat.

    python -m bench.soak --minutes 10 --sensors 500 --chunk 140

Real processes throughout: Mosquitto (persistent), `monitor run` (journal on, the bundled model with its
threshold set to 0, so every window scored is an alert that must be acknowledged before its input is), the load
generator of `bench.loadgen` in its own process (sensors at 250 Hz, `--chunk` samples a message: 35 = 3,571
messages/s for 500 sensors, 140 = 893/s with the same samples and windows), and in this process:

- every 2 s, a message with a seq near 2**53 on a legitimate sensor's topic (round robin);
- every second, 50 messages on distinct topics whose sensor id is 60 KB long (refused as bad_topic);
- every 5 s, 200 connections to /metrics held open without a request for 3 s, and one client dripping a
  request a byte at a time;
- retained messages on legitimate sensors' topics (one sample, a stale seq), and half-way through a
  restart of the broker, so that the daemon subscribes again and is offered them.

The attack messages carry no complete window, so windows scored must equal exactly the windows the generator's
messages make. Results (JSON) go to `--out` (default bench/soak-results.json); the process exits 1 when a check
fails. `--quiet` leaves out the attacks and the restart: the daemon's capacity under the same load.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion

from bench import loadgen
from bench.harness import DATA_DIR, REPO
from tests.support import Broker, DaemonProcess, alert_all_model, daemon_config, metric

CHUNK = 35


def expected_windows(sensors: int, rounds: int, chunk: int = CHUNK) -> int:
    """Windows the generator's streams make: sensor s publishes chunks offset_s .. offset_s + rounds - 1."""
    per_window = loadgen.WINDOW // chunk
    total = 0
    for sensor in range(sensors):
        offset = (sensor // loadgen.SLOTS_PER_PERIOD) % per_window  # as the generator spreads the sensors
        first, end = offset * chunk, (offset + rounds) * chunk
        total += end // loadgen.WINDOW - -(-first // loadgen.WINDOW)
    return total


class Attacks(threading.Thread):
    """The attacks of the module docstring, on their own schedule, until stopped."""

    def __init__(self, broker_port: int, metrics_port: int, sensors: int, prefix: str) -> None:
        super().__init__(name="attacks", daemon=True)
        self.metrics_port = metrics_port
        self.sensors = sensors
        self.prefix = prefix
        self.stop = threading.Event()
        self.counts = {"poison": 0, "long_topics": 0, "metrics_connections": 0, "retained": 0}
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"attacker-{time.time_ns()}", protocol=mqtt.MQTTv311
        )
        self.client.max_queued_messages_set(0)
        self.client.connect("127.0.0.1", broker_port)
        self.client.loop_start()

    def topic(self, index: int) -> str:
        return f"sensors/{self.prefix}{index % self.sensors:05d}/ecg"

    def run(self) -> None:
        tick = 0
        while not self.stop.wait(1.0):
            tick += 1
            if tick % 2 == 0:
                self.client.publish(self.topic(tick * 7), b'{"seq": 9007199254740000, "samples": [0.5]}', qos=1)
                self.counts["poison"] += 1
            for index in range(50):
                self.client.publish(f"sensors/{tick:06d}{index:03d}{'x' * 60_000}/ecg", b'{"samples": [0.5]}', qos=1)
            self.counts["long_topics"] += 50
            if tick % 5 == 0:
                threading.Thread(target=self.hold_metrics_connections, daemon=True).start()
            if tick % 10 == 0:
                self.client.publish(self.topic(tick * 13), b'{"seq": 3, "samples": [0.5]}', qos=1, retain=True)
                self.counts["retained"] += 1

    def hold_metrics_connections(self) -> None:
        held = []
        try:
            for _ in range(200):
                held.append(socket.create_connection(("127.0.0.1", self.metrics_port), timeout=5))
            held[0].send(b"G")
            time.sleep(3)
        except OSError:
            pass
        finally:
            self.counts["metrics_connections"] += len(held)
            for sock in held:
                sock.close()

    def close(self) -> None:
        self.stop.set()
        if self.ident is not None:  # started
            self.join()
        self.client.disconnect()
        self.client.loop_stop()


def scrape(daemon: DaemonProcess, timeout: float = 30.0) -> dict:
    """A scrape, retried: while the metrics attack holds every connection slot, scrapes are refused (by design)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return daemon.scrape()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def progress(daemon: DaemonProcess) -> dict[str, float]:
    """The daemon's counters for the timeline; empty while the metrics attack holds every connection slot."""
    try:
        samples = daemon.scrape()
    except OSError:
        return {}
    return {
        "scored": metric(samples, "monitor_windows_scored_total"),
        "accepted": metric(samples, "monitor_messages_received_total", outcome="accepted"),
        "duplicate": metric(samples, "monitor_messages_received_total", outcome="duplicate"),
        "alerts_pending": metric(samples, "monitor_alerts_pending"),
        "input_unacknowledged": metric(samples, "monitor_input_unacknowledged"),
        "input_beyond_receive_maximum": metric(samples, "monitor_input_beyond_receive_maximum_total"),
        "broker_connections": metric(samples, "monitor_broker_connections_total"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--sensors", type=int, default=500)
    parser.add_argument("--rate", type=float, default=250.0, help="samples per second per sensor")
    parser.add_argument(
        "--chunk",
        type=int,
        default=CHUNK,
        choices=(35, 70, 140),
        help="samples per message (a divisor of the 140-sample window); 140 = 0.56 s a message at 250 Hz",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=DATA_DIR / "ECG5000_TRAIN.txt.xz",
        help="UCR file whose normal beats the generator streams (default: the vendored ECG5000 train file)",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no attacks and no broker restart: the daemon's capacity under the same load, for comparison",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "soak-results.json")
    args = parser.parse_args(argv)
    seconds = args.minutes * 60
    root = Path(tempfile.mkdtemp(prefix="monitor-soak-"))
    broker = Broker(root / "broker", persistence=True).start()
    config = daemon_config(
        root / "monitor.yaml",
        broker.port,
        model=alert_all_model(root),
        journal={"path": str(root / "journal")},
        logging={"level": "info", "format": "json"},
    )
    daemon = DaemonProcess(config)
    daemon.wait_for_event("ready", timeout=120)
    process = psutil.Process(daemon.process.pid)
    prefix = "soak-"
    generator = subprocess.Popen(
        loadgen.command(broker.port, args.sensors, seconds, args.rate, args.chunk, 1, args.data, prefix=prefix),
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    attacks = Attacks(broker.port, daemon.metrics_port, args.sensors, prefix)
    if not args.quiet:
        attacks.start()
    samples, started, restarted = [], time.monotonic(), args.quiet
    while generator.poll() is None:
        elapsed = time.monotonic() - started
        samples.append(
            {
                "seconds": round(elapsed, 1),
                "rss_mib": round(process.memory_info().rss / 2**20, 1),
                "fds": process.num_fds(),
                **progress(daemon),
            }
        )
        if not restarted and elapsed > seconds / 2:
            broker.stop()  # SIGTERM: Mosquitto saves sessions and retained messages
            broker.start()
            restarted = True
        time.sleep(5)
    attacks.close()
    load = orjson.loads(generator.stdout.read().strip().splitlines()[-1])
    rounds = load["messages"] // args.sensors
    expected = expected_windows(args.sensors, rounds, args.chunk)
    deadline = time.monotonic() + 120
    while metric(scrape(daemon), "monitor_windows_scored_total") < expected and time.monotonic() < deadline:
        time.sleep(1)
    final = scrape(daemon)
    exit_code = daemon.stop(timeout=60)
    broker.stop()
    warm = [sample for sample in samples if sample["seconds"] >= 60] or samples
    second_minute = [sample["rss_mib"] for sample in samples if 60 <= sample["seconds"] < 120] or [warm[0]["rss_mib"]]
    last_minute = [sample["rss_mib"] for sample in samples if sample["seconds"] >= samples[-1]["seconds"] - 60]
    result = {
        "command": "python -m bench.soak " + " ".join(argv if argv is not None else sys.argv[1:]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average": psutil.getloadavg(),
        "sensors": args.sensors,
        "seconds": seconds,
        "generator": load,
        "attacks": attacks.counts,
        "windows_expected": expected,
        "windows_scored": metric(final, "monitor_windows_scored_total"),
        "alerts_delivered": metric(final, "monitor_alerts_delivered_total"),
        "dropped": {
            reason: metric(final, "monitor_windows_dropped_total", reason=reason)
            for reason in ("seq_gap", "seq_restart", "queue_full", "scoring_error", "non_finite_score")
        },
        "messages": {
            outcome: metric(final, "monitor_messages_received_total", outcome=outcome)
            for outcome in ("accepted", "duplicate", "retained", "bad_topic")
        },
        "alerts_dropped": {
            reason: metric(final, "monitor_alerts_dropped_total", reason=reason)
            for reason in ("queue_full", "publish_error")
        },
        "seq_restarts": metric(final, "monitor_seq_restarts_total"),
        "input_beyond_receive_maximum": metric(final, "monitor_input_beyond_receive_maximum_total"),
        "metrics_connections_refused": metric(final, "monitor_metrics_connections_refused_total"),
        "rss_mib_max_second_minute": max(second_minute),
        "rss_mib_max_last_minute": max(last_minute),
        "rss_mib_after_first_minute": {
            "min": min(s["rss_mib"] for s in warm),
            "max": max(s["rss_mib"] for s in warm),
            "first": warm[0]["rss_mib"],
            "last": warm[-1]["rss_mib"],
        },
        "fds": {"min": min(s["fds"] for s in samples), "max": max(s["fds"] for s in samples)},
        "daemon_exit_code": exit_code,
        "daemon_events": dict(
            Counter(event.get("event") for event in daemon.events() if event.get("level") in ("warning", "error"))
        ),
        "samples": samples,
    }
    checks = {
        "every legitimate window scored": result["windows_scored"] == expected,
        "every alert delivered (none dropped)": sum(result["alerts_dropped"].values()) == 0,
        "RSS flat (max of the last minute - max of the second minute <= 32 MiB)": max(last_minute) - max(second_minute)
        <= 32,
        "descriptors flat (max - min <= 20)": result["fds"]["max"] - result["fds"]["min"] <= 20,
        "clean exit": exit_code == 0,
    }
    result["checks"] = checks
    args.out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print(
        orjson.dumps(
            {key: value for key, value in result.items() if key != "samples"}, option=orjson.OPT_INDENT_2
        ).decode()
    )
    shutil.rmtree(root, ignore_errors=True)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
