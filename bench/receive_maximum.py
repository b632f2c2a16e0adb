"""Does the broker honour the client's MQTT 5 Receive Maximum? Bare paho against a real Mosquitto, no daemon.

    python -m bench.receive_maximum --out bench/receive-maximum-results.json

A subscriber (MQTT 5, persistent session, manual acknowledgements, Receive Maximum `--receive-maximum`) takes
`--messages` QoS 1 messages a publisher queued for it, and acknowledges what it holds one message at a time, either
oldest first (the order MQTT requires, and the daemon's) or newest first. Recorded per broker configuration and
order: the most messages it held unacknowledged at once, and how many it received (fewer: the broker dropped some).
The brokers are configured as the tests' and the soak's (`tests.support.Broker`: `max_inflight_messages 0`,
`max_queued_messages 0`), with one line changed each; the last row is an MQTT 3.1.1 subscriber, which has no Receive
Maximum and is bounded by the broker's `max_inflight_messages` alone. Results in RELIABILITY.md, "Mosquitto settings".
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.data import REPO
from tests.support import MOSQUITTO, Broker, wait_until

BROKERS = {  # name -> (lines added to the tests' broker configuration, later lines overriding, and the MQTT version)
    "as the soak's (max_inflight_messages 0, max_queued_messages 0)": ("", 5),
    "max_inflight_messages 20": ("max_inflight_messages 20", 5),
    "max_inflight_messages 20000": ("max_inflight_messages 20000", 5),
    "max_queued_messages 1000": ("max_queued_messages 1000", 5),
    "MQTT 3.1.1 client, max_inflight_messages as --receive-maximum": ("max_inflight_messages {receive_maximum}", 3),
}
ORDERS = ("oldest first", "newest first")


class Subscriber:
    """Holds every message it receives until `acknowledge_one` hands one back."""

    def __init__(self, port: int, receive_maximum: int, version: int) -> None:
        self.lock = threading.Lock()
        self.held: list[tuple[int, int]] = []
        self.received = 0
        self.most_held = 0
        self.subscribed = threading.Event()
        protocol, clean = (mqtt.MQTTv5, None) if version == 5 else (mqtt.MQTTv311, False)
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, "receive-maximum", clean_session=clean, protocol=protocol, manual_ack=True
        )
        self.client.on_message = self._on_message
        self.client.on_connect = lambda client, userdata, flags, reason, props: client.subscribe("load/#", qos=1)
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        if version == 5:
            properties = Properties(PacketTypes.CONNECT)
            properties.ReceiveMaximum = receive_maximum
            properties.SessionExpiryInterval = 3600
            self.client.connect("127.0.0.1", port, clean_start=True, properties=properties)
        else:
            self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        with self.lock:
            self.held.append((message.mid, message.qos))
            self.received += 1
            self.most_held = max(self.most_held, len(self.held))

    def acknowledge_one(self, newest: bool) -> bool:
        with self.lock:
            if not self.held:
                return False
            mid, qos = self.held.pop(-1 if newest else 0)
        self.client.ack(mid, qos)
        return True

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish(port: int, count: int) -> None:
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="receive-maximum-load", protocol=mqtt.MQTTv311)
    publisher.max_inflight_messages_set(0)
    publisher.max_queued_messages_set(0)
    publisher.connect("127.0.0.1", port)
    publisher.loop_start()
    infos = [publisher.publish(f"load/{index % 50}", b"x" * 100, qos=1) for index in range(count)]
    for info in infos:
        info.wait_for_publish(30)
    publisher.disconnect()
    publisher.loop_stop()


def run_one(work: Path, broker_lines: str, version: int, newest: bool, receive_maximum: int, messages: int) -> dict:
    broker = Broker(work, persistence=True, extra=broker_lines.format(receive_maximum=receive_maximum)).start()
    subscriber = Subscriber(broker.port, receive_maximum, version)
    try:
        subscriber.subscribed.wait(10)
        publish(broker.port, messages)
        wait_until(lambda: subscriber.received >= receive_maximum, 10, what="the first messages")
        time.sleep(0.5)  # what the broker sends before any acknowledgement
        before = subscriber.most_held
        last, changed = (0, 0), time.monotonic()
        while subscriber.acknowledge_one(newest) or time.monotonic() - changed < 2.0:  # until 2 s of nothing
            state = (subscriber.received, len(subscriber.held))
            if state != last:
                last, changed = state, time.monotonic()
            time.sleep(0.002)
        return {
            "held_before_any_acknowledgement": before,
            "held_at_most": subscriber.most_held,
            "received": subscriber.received,
        }
    finally:
        subscriber.close()
        broker.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--receive-maximum", type=int, default=50)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "receive-maximum-results.json")
    args = parser.parse_args(argv)
    mosquitto = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True).stdout.splitlines()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="receive-maximum-") as root:
        for index, (name, (lines, version)) in enumerate(BROKERS.items()):
            for order in ORDERS:
                work = Path(root) / f"{index}-{order.split()[0]}"
                row = {"broker": name, "acknowledged": order}
                row |= run_one(work, lines, version, order == "newest first", args.receive_maximum, args.messages)
                print(orjson.dumps(row).decode(), flush=True)
                rows.append(row)
    result = {
        "command": "python -m bench.receive_maximum "
        f"--receive-maximum {args.receive_maximum} --messages {args.messages}",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "mosquitto": mosquitto,
        "paho_mqtt": metadata.version("paho-mqtt"),
        "receive_maximum": args.receive_maximum,
        "messages": args.messages,
        "rows": rows,
    }
    args.out.write_text(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")


if __name__ == "__main__":
    main()
