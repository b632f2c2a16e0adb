"""Load generator: N sensors streaming ECG at a sample rate through MQTT, in a process of its own.

`python -m bench.loadgen --port P --sensors N --seconds S` publishes, for every sensor, a message of `--chunk`
samples every chunk/rate seconds, with `seq` and `ts` as sensors do, the sensors spread evenly over the message
period. The samples are normal ECG5000 beats (about 1 % of windows alert, as in a healthy deployment), or with
`--recording` a raw ECG lead (beat mode); payloads are pre-encoded, so the time goes to paho. Its own process keeps
it off the daemon's GIL, and the bench measures its CPU. On exit it prints one JSON line: what it published and how
late it was against the schedule.

No message is given up and none overtakes another (`OrderedPublisher`): while the broker is away, messages wait
in the generator, and when `MAX_UNACKNOWLEDGED` messages wait for the broker's acknowledgement (its packet ids are
16 bits, so paho refuses a 65,536th), the generator waits for room (back-pressure, counted in `blocked_seconds`).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from bench.harness import SAMPLE_RATE_HZ, WINDOW_SAMPLES
from monitor.training.datasets import read_ucr

SLOTS_PER_PERIOD = 28
STREAMS = 16
BEATS_PER_STREAM = 20
WINDOW = WINDOW_SAMPLES  # samples per ECG5000 beat, the default model's window
RECORDING_RATE = 360  # Hz of the raw recordings --recording takes (MIT-BIH, data/mitdb-dev)
MAX_UNACKNOWLEDGED = 60_000  # below MQTT's 65,535 packet ids: beyond it paho refuses a QoS 1 message


class OrderedPublisher:
    """Publishes in order across reconnects: messages wait here while the client is away, or while the in-flight
    messages paho re-sends after a reconnect are not all acknowledged (paho sends a message published during the
    reconnect handshake at once, ahead of those: newer samples would overtake older ones, a seq gap at the daemon).
    One thread publishes; paho's network thread only moves the counters."""

    def __init__(self, client: mqtt.Client, qos: int) -> None:
        self.client, self.qos = client, qos
        self.connected = threading.Event()
        self.disconnects = 0
        self.in_order_since = -1  # the disconnect count at which handing over was last found safe
        self.acknowledged = 0  # on_publish: sent (QoS 0) or acknowledged by the broker (QoS 1)
        self.handed = 0
        self.backlog: deque[tuple[str, bytes]] = deque()
        self.errors = self.while_disconnected = 0
        self.blocked_seconds = 0.0
        client.on_connect = lambda c, u, f, rc, p: self.connected.set()
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        self.disconnects += 1

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self.acknowledged += 1

    def publish(self, topic: str, payload: bytes) -> None:
        self.backlog.append((topic, payload))
        self.pump()

    def pump(self) -> None:
        """Hand the waiting messages to paho when nothing it holds could be overtaken."""
        disconnects = self.disconnects
        if self.in_order_since != disconnects:
            if not (self.connected.is_set() and self.acknowledged >= self.handed):
                return
            self.in_order_since = disconnects
        while self.backlog:
            topic, payload = self.backlog.popleft()
            self.handed += 1
            info = self.client.publish(topic, payload, qos=self.qos)
            while info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE and self.qos:
                waited = time.monotonic()
                time.sleep(0.005)
                self.blocked_seconds += time.monotonic() - waited
                info = self.client.publish(topic, payload, qos=self.qos)
            if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and self.qos:
                self.while_disconnected += 1  # kept by paho, re-sent (first) on reconnecting
            elif info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self.errors += 1

    def unacknowledged(self) -> int:
        return len(self.backlog) + self.handed - self.errors - self.acknowledged


def command(
    port: int,
    sensors: int,
    seconds: float,
    rate: float,
    chunk: int,
    qos: int,
    data: Path,
    recording: bool = False,
    prefix: str | None = None,
) -> list[str]:
    """The command line that runs this generator in a process of its own, with sensor ids unique to the call unless
    `prefix` is given; `data` is a UCR split of beats, or with `recording` a raw ECG lead (beat mode)."""
    options = {"--port": port, "--sensors": sensors, "--seconds": seconds}
    options |= {"--rate": rate, "--chunk": chunk, "--qos": qos}
    arguments = [str(item) for pair in options.items() for item in pair]
    prefix = prefix or f"n{sensors}-{time.time_ns() % 10**6}-"
    source = "--recording" if recording else "--data"
    return [sys.executable, "-m", "bench.loadgen", *arguments, "--prefix", prefix, source, str(data)]


def fragments(data_path: Path, chunk: int, seed: int = 0) -> list[list[bytes]]:
    """`STREAMS` looped streams of normal beats, each as its chunks' JSON arrays of samples."""
    data = read_ucr(data_path).normal(1)
    beats = data.windows[:, :, 0]
    window = beats.shape[1]
    if window != WINDOW or window % chunk:
        raise SystemExit(
            f"--chunk {chunk} must divide the beat length {window} (= {WINDOW}, the model's window): windows stay beats"
        )
    rng = np.random.default_rng(seed)
    streams = []
    for _ in range(STREAMS):
        stream = beats[rng.choice(len(beats), BEATS_PER_STREAM, replace=False)].reshape(-1)
        streams.append(
            [orjson.dumps(np.round(stream[i : i + chunk], 5).tolist()) for i in range(0, len(stream), chunk)]
        )
    return streams


def recording_fragments(path: Path, rate: float, chunk: int) -> list[list[bytes]]:
    """`STREAMS` looped copies of a raw 360 Hz ECG lead (.npy) resampled to `rate`, each starting elsewhere in it,
    as chunks' JSON arrays (beat mode: the daemon finds the beats itself)."""
    from scipy.signal import resample_poly

    lead = resample_poly(np.load(path).astype(np.float64), int(round(rate)), RECORDING_RATE)
    lead = lead[: len(lead) - len(lead) % chunk]
    streams = []
    for index in range(STREAMS):
        rolled = np.roll(lead, -index * len(lead) // STREAMS)
        chunks = range(0, len(rolled), chunk)
        streams.append([orjson.dumps(np.round(rolled[i : i + chunk], 3).tolist()) for i in chunks])
    return streams


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sensors", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True, help="how long to publish")
    parser.add_argument("--rate", type=float, default=SAMPLE_RATE_HZ, help="samples per second per sensor")
    parser.add_argument("--chunk", type=int, default=35, help="samples per message")
    parser.add_argument("--qos", type=int, default=1, choices=(0, 1))
    parser.add_argument("--prefix", default="bench-", help="sensor id prefix (sensor ids are PREFIX00000 ...)")
    parser.add_argument("--topic", default="sensors/{sensor_id}/ecg")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="UCR file (.txt, .txt.xz or .txt.gz) whose normal beats are streamed")
    source.add_argument("--recording", type=Path, help="raw 360 Hz ECG lead (.npy) streamed at --rate (beat mode)")
    args = parser.parse_args(argv)

    if args.recording:
        streams = recording_fragments(args.recording, args.rate, args.chunk)
    else:
        streams = fragments(args.data, args.chunk)
    topics = [args.topic.format(sensor_id=f"{args.prefix}{index:05d}") for index in range(args.sensors)]
    period = args.chunk / args.rate
    slots = [list(range(slot, args.sensors, SLOTS_PER_PERIOD)) for slot in range(SLOTS_PER_PERIOD)]
    # Sensor s starts `offset[s]` chunks into the window grid, so window completions are spread over
    # the W/chunk message rounds instead of all sensors completing a window in the same round.
    chunks_per_window = WINDOW // args.chunk
    offset = [(sensor // SLOTS_PER_PERIOD) % chunks_per_window for sensor in range(args.sensors)]

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"bench-loadgen-{time.time_ns() % 10**9}", protocol=mqtt.MQTTv311
    )
    client.max_inflight_messages_set(0)
    client.max_queued_messages_set(MAX_UNACKNOWLEDGED)
    publisher = OrderedPublisher(client, args.qos)
    client.connect(args.host, args.port, keepalive=60)
    client.loop_start()
    if not publisher.connected.wait(10):
        print(orjson.dumps({"error": "could not connect"}).decode(), flush=True)
        return 1

    published = 0
    lags = []
    start_wall = time.time()
    start = time.monotonic() + 0.05
    end = start + args.seconds
    round_index = 0
    while True:
        round_start = start + round_index * period
        if round_start >= end:
            break
        for slot_index, members in enumerate(slots):
            due = round_start + slot_index * period / SLOTS_PER_PERIOD
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                lags.append(-delay)
            for sensor in members:
                position = round_index + offset[sensor]
                seq = position * args.chunk
                stream = streams[sensor % STREAMS]
                fragment = stream[(position + chunks_per_window * sensor) % len(stream)]
                payload = b'{"seq":%d,"ts":%.4f,"samples":%b}' % (seq, start_wall + round_index * period, fragment)
                publisher.publish(topics[sensor], payload)
                published += 1
        round_index += 1
    finished = time.monotonic()
    drain_deadline = finished + 60
    while publisher.unacknowledged() > 0 and time.monotonic() < drain_deadline:
        publisher.pump()
        time.sleep(0.02)
    unacknowledged = publisher.unacknowledged()
    client.disconnect()
    client.loop_stop()
    elapsed = finished - start
    summary = {
        "sensors": args.sensors,
        "messages": published,
        "messages_per_second": published / elapsed if elapsed > 0 else 0.0,
        "target_messages_per_second": args.sensors / period,
        "samples_per_second": published * args.chunk / elapsed if elapsed > 0 else 0.0,
        "seconds": elapsed,
        "late_slots": len(lags),
        "slots": round_index * SLOTS_PER_PERIOD,
        "max_lag_seconds": max(lags) if lags else 0.0,
        "p99_lag_seconds": float(np.quantile(lags, 0.99)) if lags else 0.0,
        "publish_errors": publisher.errors,
        "published_while_disconnected": publisher.while_disconnected,
        "blocked_seconds": round(publisher.blocked_seconds, 3),
        "unacknowledged": unacknowledged,
    }
    print(orjson.dumps(summary).decode(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
