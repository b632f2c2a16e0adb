"""Load generator: N sensors streaming ECG at a sample rate through MQTT, in a process of its own.

`python -m bench.loadgen --port P --sensors N --seconds S` publishes, for every sensor, a message
of `--chunk` samples every chunk/rate seconds (35 samples at 250 Hz: one message per 140 ms, about
7 a second), with `seq` and `ts` as sensors do. The sensors are spread evenly over the message
period so the load is smooth. The samples are normal ECG5000 beats (the training split), so about
1 % of windows raise an alert, as in a healthy deployment. Payloads are pre-encoded JSON fragments,
so the generator spends its time in paho, not in encoding. `--format frame` sends binary frames (float32) instead,
`--format sparkplug_b` Sparkplug B: one edge node whose devices are the sensors, each born (NBIRTH, DBIRTH) before
its first DDATA (protobuf encoded per message: the generator's own CPU grows with it). It runs in its own process so
that it does not share the daemon's GIL; the bench measures its CPU use, since on a 2-core machine it
competes with the daemon and the broker. On exit it prints one JSON line: what it published and
how late it was against the schedule.

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
from monitor.ingest.frame import encode_frame
from monitor.ingest.sparkplug import EdgeNode
from monitor.training.datasets import read_ucr

SLOTS_PER_PERIOD = 28
STREAMS = 16
BEATS_PER_STREAM = 20
WINDOW = WINDOW_SAMPLES  # samples per ECG5000 beat, the default model's window
RECORDING_RATE = 360  # Hz of the raw recordings --recording takes (MIT-BIH, data/mitdb-dev)
CHANNELS = ("ECG",)  # the Sparkplug B metric of each device
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
    input_format: str = "json",
    topic: str = "sensors/{sensor_id}/ecg",
    prefix: str | None = None,
) -> list[str]:
    """The command line that runs this generator in a process of its own, with sensor ids unique to the call unless
    `prefix` is given; `data` is a UCR split of beats, or with `recording` a raw ECG lead (beat mode)."""
    options = {"--port": port, "--sensors": sensors, "--seconds": seconds}
    options |= {"--rate": rate, "--chunk": chunk, "--qos": qos, "--format": input_format, "--topic": topic}
    arguments = [str(item) for pair in options.items() for item in pair]
    prefix = prefix or f"n{sensors}-{time.time_ns() % 10**6}-"
    source = "--recording" if recording else "--data"
    return [sys.executable, "-m", "bench.loadgen", *arguments, "--prefix", prefix, source, str(data)]


def fragments(data_path: Path, chunk: int, seed: int = 0) -> list[list[np.ndarray]]:
    """`STREAMS` looped streams of normal beats, each as its chunks of samples."""
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
        stream = np.round(beats[rng.choice(len(beats), BEATS_PER_STREAM, replace=False)].reshape(-1), 5)
        streams.append([stream[i : i + chunk] for i in range(0, len(stream), chunk)])
    return streams


def recording_fragments(path: Path, rate: float, chunk: int) -> list[list[np.ndarray]]:
    """`STREAMS` looped copies of a raw 360 Hz ECG lead (.npy) resampled to `rate`, each starting elsewhere in it,
    as chunks (beat mode: the daemon finds the beats itself)."""
    from scipy.signal import resample_poly

    lead = resample_poly(np.load(path).astype(np.float64), int(round(rate)), RECORDING_RATE)
    lead = lead[: len(lead) - len(lead) % chunk]
    streams = []
    for index in range(STREAMS):
        rolled = np.roll(lead, -index * len(lead) // STREAMS)
        chunks = range(0, len(rolled), chunk)
        streams.append([np.round(rolled[i : i + chunk], 3) for i in chunks])
    return streams


class Encoder:
    """A sensor message in the chosen format; JSON arrays are encoded once per fragment at the start."""

    def __init__(
        self, input_format: str, topic: str, prefix: str, sensors: int, rate: float, streams: list[list[np.ndarray]]
    ) -> None:
        self.format = input_format
        self.rate = rate
        self.streams = streams
        self.sensor_ids = [f"{prefix}{index:05d}" for index in range(sensors)]
        self.topics = [topic.format(sensor_id=sensor_id) for sensor_id in self.sensor_ids]
        self.node = EdgeNode("bench", f"edge-{prefix.strip('-')}")
        self.json = (
            [[orjson.dumps(chunk.tolist()) for chunk in stream] for stream in streams] if input_format == "json" else []
        )

    def births(self, start_wall: float) -> list[tuple[str, bytes]]:
        if self.format != "sparkplug_b":
            return []
        stamp = int(start_wall * 1000)
        return [self.node.nbirth(stamp)] + [self.node.dbirth(device, CHANNELS, stamp) for device in self.sensor_ids]

    def message(self, sensor: int, stream: int, index: int, seq: int, ts: float) -> tuple[str, bytes]:
        """Sensor `sensor`'s message of fragment `index` of stream `stream`."""
        if self.format == "frame":
            return self.topics[sensor], encode_frame(self.streams[stream][index], seq, ts)
        if self.format == "sparkplug_b":
            fragment = self.streams[stream][index]
            return self.node.ddata(self.sensor_ids[sensor], CHANNELS, fragment, ts * 1000, 1000 / self.rate)
        return self.topics[sensor], b'{"seq":%d,"ts":%.4f,"samples":%b}' % (seq, ts, self.json[stream][index])


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
    parser.add_argument("--topic", default="sensors/{sensor_id}/ecg", help="sensor topic (not for sparkplug_b)")
    parser.add_argument("--format", default="json", choices=("json", "frame", "sparkplug_b"), help="payload format")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="UCR file (.txt, .txt.xz or .txt.gz) whose normal beats are streamed")
    source.add_argument("--recording", type=Path, help="raw 360 Hz ECG lead (.npy) streamed at --rate (beat mode)")
    args = parser.parse_args(argv)

    if args.recording:
        streams = recording_fragments(args.recording, args.rate, args.chunk)
    else:
        streams = fragments(args.data, args.chunk)
    encoder = Encoder(args.format, args.topic, args.prefix, args.sensors, args.rate, streams)
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
    for topic, payload in encoder.births(start_wall):
        publisher.publish(topic, payload)
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
                stream = sensor % STREAMS
                index = (position + chunks_per_window * sensor) % len(streams[stream])
                publisher.publish(*encoder.message(sensor, stream, index, seq, start_wall + round_index * period))
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
