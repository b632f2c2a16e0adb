"""Test helpers that tests and bench/ share: a real Mosquitto on a free loopback port, an MQTT capture,
sensors publishing in order, the daemon as a real process, metrics scraped over HTTP, the committed default model,
process teardown that escalates TERM -> wait -> KILL, the kill -9 scenario run behind Mosquitto and nats-server, and
the guard that keeps tests not marked slow from starting a broker, daemon, nats-server or Prometheus."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol

import numpy as np
import orjson
import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from prometheus_client.parser import text_string_to_metric_families

from monitor.config.schema import MqttSettings
from monitor.mqtt.client import make_client

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "ecg5000"
SPLITS = DATA / "splits"
DEFAULT_MODEL = REPO / "models" / "ecg5000"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


class ProcessNotAllowed(RuntimeError):
    """A test not marked slow tried to start a broker, daemon, nats-server or Prometheus."""


_forbidden_because: str | None = None  # set by tests/conftest.py for the test running now; None outside pytest


def forbid_processes(reason: str | None) -> None:
    """From now on `spawn` refuses with `reason` (None: allowed again)."""
    global _forbidden_because
    _forbidden_because = reason


def missing_tool(tool: str, package: str) -> NoReturn:
    """A tool a test needs is not installed: skip the test, but fail it where the environment variable CI is set
    (scripts/test.sh sets it), because that script installs every such tool and a skip there would hide a check."""
    import pytest  # here, not at the top: bench/ imports this module without pytest's test extras in mind

    reason = f"{tool} is not installed (Debian package {package}; scripts/test.sh installs it)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}, and CI is set", pytrace=False)
    pytest.skip(reason)


def spawn(what: str, command: list[str], **options: Any) -> subprocess.Popen:
    """Start a long-running service process (`what`: "mosquitto", "the daemon", ...) unless the current test may
    not: `pytest -m "not slow"` is promised to start none, and this is where that promise is kept."""
    refuse_if_forbidden(what)
    return subprocess.Popen(command, **options)


def refuse_if_forbidden(what: str) -> None:
    if _forbidden_because is not None:
        raise ProcessNotAllowed(f"{what} not started: {_forbidden_because}")


def terminate(process: subprocess.Popen, timeout: float = 10.0, first: int = signal.SIGTERM) -> int | None:
    """Stop a child process: `first` (TERM), wait up to `timeout` s, then KILL; returns its exit code."""
    try:
        if process.poll() is None:
            process.send_signal(first)
            try:
                return process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    return process.returncode


def stop_all(stops: Iterable[Callable[[], object]]) -> None:
    """Call every stop even when one fails; the first failure is raised after the rest ran."""
    failure: BaseException | None = None
    for stop in stops:
        try:
            stop()
        except BaseException as error:  # noqa: BLE001 - re-raised below, once everything is stopped
            failure = failure or error
    if failure is not None:
        raise failure


def mqtt_settings(port: int, host: str = "127.0.0.1", **options) -> MqttSettings:
    """Settings for a side client of the tests or the bench (MQTT 3.1.1 unless `protocol` says otherwise)."""
    return MqttSettings(host=host, port=port, **{"protocol": "3.1.1", **options})


class BlockingScorer:
    """Scores like `inner` once `release` is set; until then a forward pass hangs (a stalled scorer)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.entered = threading.Event()
        self.release = threading.Event()

    def score(self, windows: Any) -> Any:
        self.entered.set()
        self.release.wait(60)
        return self.inner.score(windows)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(
    predicate: Callable[[], object], timeout: float, interval: float = 0.02, what: str = "condition"
) -> object:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class Broker:
    """A real Mosquitto process with its own config, optionally persistent, on a free port."""

    def __init__(self, directory: Path, persistence: bool = False, extra: str = "", port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.persistence = persistence
        self.extra = extra
        self.process: subprocess.Popen | None = None
        directory.mkdir(parents=True, exist_ok=True)

    def write_config(self) -> Path:
        lines = [
            f"listener {self.port} 127.0.0.1" if "listener" not in self.extra else "",
            "allow_anonymous true" if "allow_anonymous" not in self.extra else "",
            # As root, Mosquitto would switch to the user `mosquitto`, which cannot write the persistence file and
            # log in this private temporary directory: persistence would silently not happen.
            "user root" if os.geteuid() == 0 and "user " not in self.extra else "",
            "max_queued_messages 0",
            "max_inflight_messages 0",
            "persistent_client_expiration 1h",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.directory}/",
            "autosave_interval 1",
            f"log_dest file {self.directory}/mosquitto.log",
            self.extra,
        ]
        path = self.directory / "mosquitto.conf"
        path.write_text("\n".join(line for line in lines if line) + "\n")
        return path

    def start(self) -> Broker:
        config = self.write_config()
        self.process = spawn(
            "mosquitto", [MOSQUITTO, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        wait_until(lambda: port_open(self.port) or self.process.poll() is not None, 10, what="mosquitto to listen")
        if self.process.poll() is not None:
            raise RuntimeError(f"mosquitto failed: {self.process.stderr.read().decode()}")
        return self

    def stop(self, kill: bool = False) -> None:
        if self.process is not None:
            terminate(self.process, first=signal.SIGKILL if kill else signal.SIGTERM)
        self.process = None


class Capture:
    """A QoS 1 subscriber that records every message; `wait_for` polls with a timeout."""

    def __init__(
        self, port: int, topics: list[str], client_id: str | None = None, persistent: bool = False, **client_options
    ) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        settings = mqtt_settings(port, client_options.get("host", "127.0.0.1"))
        self.client = make_client(settings, client_id or f"capture-{time.time_ns()}", persistent_session=persistent)
        self.topics = topics
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([(topic, 1) for topic in topics])
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 2)
        self.client.connect(settings.host, port)
        self.client.loop_start()
        assert self.subscribed.wait(10), "capture could not subscribe"

    def _on_message(self, client, userdata, message) -> None:
        with self.lock:
            self.messages.append((message.topic, message.payload, bool(message.retain)))

    def payloads(self, prefix: str = "") -> list[dict]:
        with self.lock:
            return [
                json.loads(payload)
                for topic, payload, retain in self.messages
                if topic.startswith(prefix) and not retain
            ]

    def wait_for(self, predicate: Callable[[Capture], object], timeout: float = 30.0, what: str = "messages") -> object:
        return wait_until(lambda: predicate(self), timeout, what=what)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Scrape /metrics over HTTP: {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def alert_all_model(directory: Path, bundled: str = "ecg5000") -> Path:
    """A copy of a bundled model (models/<bundled>) in `directory` with its threshold set to 0: every window (or
    beat) scored is an alert, so counting alerts counts what was scored."""
    model = directory / f"{bundled}-alert-all"
    shutil.copytree(REPO / "models" / bundled, model)
    meta = json.loads((model / "model.json").read_text())
    meta["threshold"]["value"] = 0.0
    (model / "model.json").write_text(json.dumps(meta, indent=2))
    return model


def daemon_config(path: Path, broker_port: int, model: Path = DEFAULT_MODEL, **sections) -> Path:
    """Write a daemon config for tests: the given broker, a free metrics port, JSON logs."""
    config = {
        "mqtt": {
            "host": "127.0.0.1",
            "port": broker_port,
            "client_id": f"monitor-test-{time.time_ns() % 10**9}",
            "reconnect_min_seconds": 1,
            "reconnect_max_seconds": 2,
        },
        "model": {"path": str(model), "device": "cpu"},
        "metrics": {"host": "127.0.0.1", "port": free_port()},
        "logging": {"level": "info", "format": "json"},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


class DaemonProcess:
    """`monitor run` as a real child process; its JSON log lines are collected as they come."""

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.metrics_port = yaml.safe_load(config.read_text())["metrics"]["port"]
        self.lines: list[str] = []
        self.wait_ready = True  # daemon_factory: wait for the `ready` event after starting
        self.lock = threading.Lock()
        self.process = spawn(
            "the daemon",
            [sys.executable, "-m", "monitor", "run", "--config", str(config)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.reader = threading.Thread(target=self._read, name="daemon-log-reader", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self.lock:
                self.lines.append(line.rstrip("\n"))

    def events(self, name: str | None = None) -> list[dict]:
        with self.lock:
            lines = list(self.lines)
        parsed = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and (name is None or record.get("event") == name):
                parsed.append(record)
        return parsed

    def wait_for_event(self, name: str, timeout: float = 30.0, count: int = 1) -> list[dict]:
        def seen():
            if self.process.poll() is not None and len(self.events(name)) < count:
                raise AssertionError(f"daemon exited with {self.process.returncode}:\n" + "\n".join(self.lines[-30:]))
            return len(self.events(name)) >= count

        wait_until(seen, timeout, what=f"log event {name}")
        return self.events(name)

    def scrape(self) -> dict:
        return scrape(self.metrics_port)

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self.reader.join(5)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def shutdown(self, timeout: float = 30.0) -> int | None:
        """TERM, wait for the drain, KILL if it does not end: for teardown, never leaves a daemon behind."""
        try:
            return terminate(self.process, timeout)
        finally:
            self.reader.join(5)


def replay_args(config: Path, data: Path, sensors: int, *options: str, speed: str = "max") -> list[str]:
    """`monitor replay` arguments: DATA published as SENSORS sensors to CONFIG's broker at SPEED, then OPTIONS."""
    return [
        "replay",
        "--config",
        str(config),
        "--data",
        str(data),
        "--sensors",
        str(sensors),
        "--speed",
        speed,
        *options,
    ]


def run_cli(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m monitor ARGS` from the repository root and capture its output (`run`, the daemon, only where
    `spawn` may start one)."""
    if args[:1] == ("run",):
        refuse_if_forbidden("the daemon")
    return subprocess.run(
        [sys.executable, "-m", "monitor", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def train_and_evaluate(
    output: Path, train: list[Path], tests: list[Path], labels: list[Path], window: int, stride: int, *options: str
) -> dict:
    """A small model (E=4, 2 epochs, one thread; `options` may say otherwise) trained on `train` into `output`, and
    the report of `monitor evaluate --json` on the labelled `tests` recordings."""
    one_thread = {"OMP_NUM_THREADS": "1"}
    shape = ("--window", str(window), "--stride", str(stride))
    small = ("--embedding-dim", "4", "--epochs", "2", "--seed", "0", "--threads", "1", "--no-report")
    train_data = [str(path) for path in train]
    trained = run_cli(
        "train", "--train-data", *train_data, *shape, *small, *options, "--output", str(output), env=one_thread
    )
    assert trained.returncode == 0, trained.stderr
    data = ("--data", *map(str, tests), "--labels", *map(str, labels))
    evaluated = run_cli("evaluate", "--model", str(output), *data, "--stride", str(stride), "--json", env=one_thread)
    assert evaluated.returncode == 0, evaluated.stderr
    return json.loads(evaluated.stdout)


class BrokerProcess(Protocol):
    """A broker the test started: Mosquitto (`Broker`) or nats-server (`tests.nats.NatsServer`)."""

    port: int

    def stop(self, kill: bool = False) -> None: ...


WINDOW = 140  # the window of the tests' models (tests/e2e/test_faults.py, make_model)


class Sensors:
    """Sensors as docs/interface.md has them: QoS 1 with seq, sent in order, kept while the broker is away.

    While the client is disconnected, messages wait here, and they are handed to paho only once everything paho held
    at the disconnect has been re-sent and acknowledged: paho sends a message published during the reconnect
    handshake at once, ahead of the in-flight messages it re-sends after the CONNACK, so newer samples would overtake
    older ones (a seq gap, then duplicates, at the daemon).
    """

    def __init__(self, port: int, inflight: int = 100) -> None:
        self.lock = threading.Lock()
        self.pump_lock = threading.Lock()
        self.published = 0
        self.acknowledged = 0
        self.handed = 0  # messages handed to paho
        self.connected = False
        self.in_order = False  # connected and nothing paho held at the last disconnect is unacknowledged
        self.backlog: deque[tuple[str, bytes]] = deque()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"sensors-{time.time_ns()}", protocol=mqtt.MQTTv311
        )
        self.client.max_inflight_messages_set(inflight)
        self.client.max_queued_messages_set(0)  # unbounded: a sensor that retries never gives a sample up
        self.client.reconnect_delay_set(1, 2)
        self.client.on_publish = self._on_publish
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.connect_async("127.0.0.1", port)
        self.client.loop_start()
        self.closed = threading.Event()
        self.pumper = threading.Thread(target=self._pump_until_closed, name="sensors-pump", daemon=True)
        self.pumper.start()

    def _pump_until_closed(self) -> None:
        """What waits goes out once the client is connected and its re-sent messages acknowledged, sends or not."""
        while not self.closed.wait(0.02):
            self.pump()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        with self.lock:
            self.connected = not reason_code.is_failure

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self.lock:
            self.connected = self.in_order = False

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self.lock:
            self.acknowledged += 1

    def send(self, sensor_id: str, seq: int | None, samples: np.ndarray, topic: str | None = None) -> None:
        body = {"samples": samples.tolist()} if seq is None else {"seq": seq, "samples": samples.tolist()}
        with self.lock:
            self.backlog.append((topic or f"sensors/{sensor_id}/ecg", orjson.dumps(body)))
            self.published += 1
        self.pump()

    def pump(self) -> None:
        """Hand the waiting messages to paho, in order, when that cannot overtake anything (one thread at a time;
        never under `lock` inside paho, whose network thread holds its own lock when it calls `_on_publish`)."""
        with self.pump_lock:
            with self.lock:
                self.in_order = self.in_order or (self.connected and self.acknowledged >= self.handed)
                if not self.in_order:
                    return
                batch = list(self.backlog)
                self.backlog.clear()
                self.handed += len(batch)
            for topic, payload in batch:
                info = self.client.publish(topic, payload, qos=1)
                assert info.rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN), mqtt.error_string(
                    info.rc
                )

    def all_acknowledged(self) -> bool:
        with self.lock:
            return not self.backlog and self.acknowledged >= self.published

    def close(self) -> None:
        self.closed.set()
        self.pumper.join()
        self.client.disconnect()
        self.client.loop_stop()


def signal_samples(count: int, seed: int = 0) -> np.ndarray:
    """A synthetic ECG-like trace (what the model learnt does not matter with threshold 0)."""
    rng = np.random.default_rng(seed)
    return (np.sin(np.arange(count) * 2 * np.pi / WINDOW) + 0.1 * rng.normal(size=count)).astype(np.float32)


def restart_config(tmp_path: Path, port: int, model: Path, **sections) -> Path:
    """A daemon config with a fixed client id (its session survives a restart) and the input journal on."""
    journal = {"path": str(tmp_path / "journal"), **sections.pop("journal", {})}
    return daemon_config(tmp_path / "m.yaml", port, model=model, journal=journal, **sections)


def lost_windows(capture: Capture, expected: set[tuple[str, int]]) -> tuple[int, int]:
    """(windows with no alert, alerts received twice) for the expected (sensor_id, window_start_seq)."""
    keys = [(alert["sensor_id"], alert["window_start_seq"]) for alert in capture.payloads("alerts/")]
    return len(expected - set(keys)), len(keys) - len(set(keys))


class NotifySocket:
    """A bound datagram socket standing in for systemd's NOTIFY_SOCKET; `received()` returns what came since."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)

    def received(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return out

    def close(self) -> None:
        self.sock.close()


@contextmanager
def crash_rig(
    broker: BrokerProcess, config: Path, env: dict[str, str] | None = None
) -> Iterator[tuple[Capture, Sensors, list[DaemonProcess]]]:
    """An alert capture, sensors and a ready daemon (with `env`); on exit every daemon started (the list) is killed,
    and the sensors, the capture and the broker are closed."""
    capture = Capture(broker.port, ["alerts/#"])
    sensors = Sensors(broker.port, inflight=1000)
    started = [DaemonProcess(config, env)]
    try:
        started[0].wait_for_event("ready", timeout=60)
        yield capture, sensors, started
    finally:
        for process in started:
            process.kill()
        sensors.close()
        capture.close()
        broker.stop(kill=True)


def kill_once_busy(daemon: DaemonProcess, scored: float, gauge: str) -> float:
    """SIGKILL the daemon once it has scored `scored` windows of a burst; returns `gauge` read just before."""
    wait_until(
        lambda: metric(daemon.scrape(), "monitor_windows_scored_total") >= scored, 60, what="the burst being scored"
    )
    value = metric(daemon.scrape(), gauge)
    daemon.kill()
    return value


def restart_and_make_up(
    config: Path,
    sensors: Sensors,
    capture: Capture,
    expected: set[tuple[str, int]],
    started: list[DaemonProcess],
    not_before: float = 0.0,
) -> tuple[int, int]:
    """After a kill: once the broker took every sensor message, and not before the monotonic time `not_before`, start
    the daemon again (appended to `started`, for the teardown) and wait up to 120 s until every expected window has
    its alert; returns `lost_windows`."""
    wait_until(sensors.all_acknowledged, 60, what="the broker to acknowledge every sensor message")
    time.sleep(max(0.0, not_before - time.monotonic()))
    started.append(DaemonProcess(config))
    with suppress(AssertionError):  # timed out: the caller asserts, with the count
        wait_until(lambda: lost_windows(capture, expected)[0] == 0, 120, what="every window scored after the restart")
    return lost_windows(capture, expected)


@dataclass(frozen=True)
class CrashOutcome:
    """What `kill_9_mid_stream` measured."""

    load: str
    windows: int
    lost: int
    twice: int
    replayed: int  # messages the restarted daemon replayed from its journal
    queued: float | None  # busy: windows queued at the kill
    duplicates: float  # input messages the restarted daemon ignored as duplicates, by the time all were alerted
    gaps: float  # seq gaps the restarted daemon saw (each breaks windows)

    def figure(self) -> tuple[str, str]:
        detail = f"queued at the kill {self.queued:.0f}; " if self.queued is not None else ""
        return (
            "windows / lost / alerts twice / replayed messages / duplicate input, seq gaps after the restart",
            f"{self.windows} / {self.lost} / {self.twice} / {detail}{self.replayed} / {self.duplicates:.0f}, "
            f"{self.gaps:.0f}",
        )


def kill_9_mid_stream(
    broker: BrokerProcess, config: Path, load: str, sensor_ids: list[str], restart_delay: float = 0.0
) -> CrashOutcome:
    """Sensors stream into a daemon (config: `restart_config`, a threshold-0 model of window WINDOW), which is
    SIGKILLed and started again with the same config, at the earliest `restart_delay` seconds after the kill.
    `warm`: 60 windows a sensor in 35-sample messages, paced, the kill half-way (partial windows in every sensor,
    alerts in flight); `busy`: a burst of 100 full windows a sensor published at once, the kill once 200 are scored.
    Every window should then have its alert."""
    with crash_rig(broker, config) as (capture, sensors, started):
        per_sensor, chunk = (60, 35) if load == "warm" else (100, WINDOW)
        data = signal_samples(per_sensor * WINDOW)
        expected = {(sensor_id, k * WINDOW) for sensor_id in sensor_ids for k in range(per_sensor)}
        offsets = range(0, per_sensor * WINDOW, chunk)
        for position, offset in enumerate(offsets):
            if load == "warm" and position == len(offsets) // 2:
                started[0].kill()  # mid-stream, with partial windows in every sensor and alerts in flight
                killed_at = time.monotonic()
            for sensor_id in sensor_ids:
                sensors.send(sensor_id, offset, data[offset : offset + chunk])
            if load == "warm":
                time.sleep(0.01)
        # busy: the whole burst is in the broker; kill once the daemon is busy with it
        queued = kill_once_busy(started[0], 200, "monitor_queue_depth") if load == "busy" else None
        killed_at = time.monotonic() if load == "busy" else killed_at
        lost, twice = restart_and_make_up(config, sensors, capture, expected, started, killed_at + restart_delay)
        replayed = started[-1].wait_for_event("journal_replayed")[0]["messages"]
        samples = started[-1].scrape()
    duplicates = metric(samples, "monitor_messages_received_total", outcome="duplicate")
    gaps = metric(samples, "monitor_seq_gaps_total")
    return CrashOutcome(load, len(expected), lost, twice, replayed, queued, duplicates, gaps)
