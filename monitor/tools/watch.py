"""`monitor watch`: follow the alerts on the broker as an operator would, and score them against labels.

Prints one line per alert as it arrives. With `--labels` (as written by `monitor replay --labels-out`)
it ends with a summary: alerts received, precision, recall and F1 against the labels, and, with
`--metrics-url`, the daemon's own counts and decision latency.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from monitor.config.schema import MqttSettings
from monitor.errors import MonitorError
from monitor.mqtt.client import client_id_for, make_client
from monitor.telemetry.scrape import histogram_quantile, scrape_metrics
from monitor.training.evaluation import evaluate_scores


@dataclass
class AlertLog:
    """Alerts received so far, keyed by (sensor id, window start seq)."""

    alerts: dict[tuple[str, int], dict] = field(default_factory=dict)
    duplicates: int = 0
    last_at: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, alert: dict) -> bool:
        key = (str(alert.get("sensor_id")), int(alert.get("window_start_seq", -1)))
        with self.lock:
            self.last_at = time.monotonic()
            if key in self.alerts:
                self.duplicates += 1
                return False
            self.alerts[key] = alert
            return True


def alert_topic_filter(template: str) -> str:
    return template.replace("{sensor_id}", "+")


def read_labels(path: str | Path) -> dict[tuple[str, int], int]:
    labels = {}
    for line in Path(path).read_bytes().splitlines():
        if line.strip():
            record = orjson.loads(line)
            labels[(record["sensor_id"], int(record["window_start_seq"]))] = int(record["label"])
    return labels


def _milliseconds(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f} ms"


def summary(log: AlertLog, labels: dict[tuple[str, int], int], normal_label: int, metrics_url: str | None) -> str:
    keys = list(labels)
    flagged = [1.0 if key in log.alerts else 0.0 for key in keys]
    anomalous = [labels[key] != normal_label for key in keys]
    result = evaluate_scores(flagged, anomalous, 0.5)  # type: ignore[arg-type]
    unlabelled = len(set(log.alerts) - set(labels))
    lines = [
        "",
        "summary",
        f"  windows replayed   {len(keys)}  ({sum(anomalous)} anomalous by label)",
        f"  alerts received    {len(log.alerts)}  "
        f"(duplicates {log.duplicates}, outside the labelled windows {unlabelled})",
        f"  precision {result.precision:.4f}  recall {result.recall:.4f}  F1 {result.f1:.4f}  "
        f"false-positive rate {result.fpr:.4f}",
        f"  confusion: tp {result.tp}  fp {result.fp}  fn {result.fn}  tn {result.tn}",
    ]
    if metrics_url:
        samples = scrape_metrics(metrics_url)
        value = lambda name: sum(v for _, v in samples.get(name, []))  # noqa: E731
        latency = {
            float(labels["le"]): count for labels, count in samples.get("monitor_decision_latency_seconds_bucket", [])
        }
        lines += [
            f"  daemon: windows scored {value('monitor_windows_scored_total'):.0f}, "
            f"alerts published {value('monitor_alerts_published_total'):.0f}, "
            f"windows dropped {value('monitor_windows_dropped_total'):.0f}",
            f"  decision latency p50 {_milliseconds(histogram_quantile(0.5, latency))}, "
            f"p99 {_milliseconds(histogram_quantile(0.99, latency))}",
        ]
    return "\n".join(lines)


def watch(
    settings: MqttSettings,
    alert_topic: str,
    labels_path: Path | None,
    metrics_url: str | None,
    idle_seconds: float,
    normal_label: int = 1,
    quiet: bool = False,
) -> str:
    """Print alerts until nothing has arrived for `idle_seconds` after the labelled windows were all scored."""
    log = AlertLog()
    connected = threading.Event()
    client = make_client(settings, client_id_for(settings, "watch"))

    def on_connect(client, userdata, flags, reason_code, properties):
        if not reason_code.is_failure:
            client.subscribe(alert_topic_filter(alert_topic), qos=1)

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        connected.set()

    def on_message(client, userdata, message):
        try:
            alert = orjson.loads(message.payload)
        except orjson.JSONDecodeError:
            return
        if log.add(alert) and not quiet:
            print(
                f"ALERT {alert.get('sensor_id')}  "
                f"window {alert.get('window_start_seq')}-{alert.get('window_end_seq')}  "
                f"score {alert.get('score', 0):.3f} > {alert.get('threshold', 0):.3f}",
                flush=True,
            )

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    try:
        client.connect(settings.host, settings.port)
    except OSError as error:
        raise MonitorError(f"cannot reach the broker at {settings.host}:{settings.port} ({error})") from None
    client.loop_start()
    if not connected.wait(10):
        raise MonitorError(f"the broker at {settings.host}:{settings.port} did not accept the connection")
    print(f"watching {alert_topic_filter(alert_topic)} on {settings.host}:{settings.port}", flush=True)
    labels = read_labels(labels_path) if labels_path and labels_path.exists() else None
    log.last_at = time.monotonic()
    try:
        while True:
            time.sleep(0.5)
            if labels is None and labels_path and labels_path.exists():
                labels = read_labels(labels_path)
            if time.monotonic() - log.last_at < idle_seconds:
                continue
            if labels is not None and metrics_url and _scored(metrics_url) < len(labels):
                continue
            if labels is not None:
                break
    except KeyboardInterrupt:
        pass
    finally:
        client.disconnect()
        client.loop_stop()
    return summary(log, labels, normal_label, metrics_url) if labels else f"alerts received: {len(log.alerts)}"


def _scored(metrics_url: str) -> float:
    try:
        return sum(value for _, value in scrape_metrics(metrics_url).get("monitor_windows_scored_total", []))
    except OSError:
        return 0.0
