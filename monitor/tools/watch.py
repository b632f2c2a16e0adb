"""`monitor watch`: follow the alerts on the broker as an operator would, and score them against labels.

Prints one line per alert as it arrives, every one: an alert seen before (the same identity: instance, sensor,
window start and its time stamp) is printed too, marked and counted as a duplicate. A sensor whose stream restarted
(its `seq` back to 0) sends windows with new time stamps, so their alerts are new ones, not duplicates.

With `--labels` (as written by `monitor replay --labels-out`) it ends with a summary: precision, recall and F1
against the labels, by window (UCR data) or by beat (a recording replayed with its annotations: an alert's
`beat_seq` is matched to an annotated beat within the same 150 ms as `monitor evaluate`), and, with
`--metrics-url`, the daemon's own counts and decision latency.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from monitor.config.schema import MqttSettings
from monitor.ecg.qrs import match_beats
from monitor.mqtt.client import client_id_for, connect_side_client, make_client
from monitor.telemetry.scrape import histogram_quantile, scrape_metrics
from monitor.training.evaluation import Evaluation, evaluate_scores

WindowLabels = dict[tuple[str, int], int]


@dataclass(frozen=True)
class BeatLabels:
    """The annotated beats of a replayed recording: per sensor, (R-peak sample indices, AAMI classes)."""

    sample_rate_hz: float
    match_seconds: float
    samples: int  # each sensor's stream length
    beats: dict[str, tuple[np.ndarray, np.ndarray]]


def alert_identity(alert: dict[str, Any]) -> tuple[Any, ...]:
    """What makes an alert the same alert: the instance that decided it, its sensor, its window's start and that
    start's time stamp (which a restarted stream does not repeat; null when the sensor sends no `ts`)."""
    return (
        alert.get("instance"),
        str(alert.get("sensor_id")),
        alert.get("window_start_seq"),
        alert.get("window_start_ts"),
    )


@dataclass
class AlertLog:
    """Alerts received so far, by identity (`alert_identity`); a repeat is counted as a duplicate."""

    alerts: dict[tuple[Any, ...], dict] = field(default_factory=dict)
    received: int = 0
    duplicates: int = 0
    last_at: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, alert: dict) -> bool:
        """Record an alert; False when it is a duplicate."""
        key = alert_identity(alert)
        with self.lock:
            self.last_at = time.monotonic()
            self.received += 1
            if key in self.alerts:
                self.duplicates += 1
                return False
            self.alerts[key] = alert
            return True

    def flagged(self, field_name: str) -> set[tuple[str, int]]:
        """(sensor id, `field_name`) of every alert, whatever instance or stream sent it."""
        with self.lock:
            alerts = list(self.alerts.values())
        return {
            (str(alert.get("sensor_id")), int(alert[field_name]))
            for alert in alerts
            if isinstance(alert.get(field_name), int)
        }


def alert_topic_filter(template: str) -> str:
    return template.replace("{sensor_id}", "+")


def read_labels(path: str | Path) -> WindowLabels | BeatLabels:
    """The labels `monitor replay --labels-out` wrote: of windows, or of beats (`replay.write_labels`)."""
    windows: WindowLabels = {}
    header: dict[str, Any] | None = None
    beats: dict[str, tuple[list[int], list[str]]] = {}
    for line in Path(path).read_bytes().splitlines():
        if not line.strip():
            continue
        record = orjson.loads(line)
        if "beats" in record:
            header = record["beats"]
        elif "beat_seq" in record:
            positions, classes = beats.setdefault(record["sensor_id"], ([], []))
            positions.append(int(record["beat_seq"]))
            classes.append(str(record["class"]))
        else:
            windows[(record["sensor_id"], int(record["window_start_seq"]))] = int(record["label"])
    if header is None:
        return windows
    return BeatLabels(
        float(header["sample_rate_hz"]),
        float(header["match_seconds"]),
        int(header["samples"]),
        {sensor: (np.asarray(p, dtype=np.int64), np.asarray(c)) for sensor, (p, c) in beats.items()},
    )


def _milliseconds(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f} ms"


def _figures(result: Evaluation) -> list[str]:
    return [
        f"  precision {result.precision:.4f}  recall {result.recall:.4f}  F1 {result.f1:.4f}  "
        f"false-positive rate {result.fpr:.4f}",
        f"  confusion: tp {result.tp}  fp {result.fp}  fn {result.fn}  tn {result.tn}",
    ]


def window_summary(log: AlertLog, labels: WindowLabels, normal_label: int) -> list[str]:
    keys = list(labels)
    alerted = log.flagged("window_start_seq")
    flagged = [1.0 if key in alerted else 0.0 for key in keys]
    anomalous = [labels[key] != normal_label for key in keys]
    result = evaluate_scores(flagged, anomalous, 0.5)  # type: ignore[arg-type]
    return [
        f"  windows replayed   {len(keys)}  ({sum(anomalous)} anomalous by label)",
        f"  alerts received    {log.received}  "
        f"(duplicates {log.duplicates}, outside the labelled windows {len(alerted - set(labels))})",
        *_figures(result),
    ]


def beat_summary(log: AlertLog, labels: BeatLabels) -> list[str]:
    """Every annotated beat of an AAMI class is flagged when an alert's `beat_seq` lies within the match window of
    it (each alert used once); beats the daemon did not find or left unscored count as not flagged."""
    alerted = log.flagged("beat_seq")
    tolerance = int(round(labels.match_seconds * labels.sample_rate_hz))
    flagged, anomalous, outside = [], [], 0
    for sensor in sorted({sensor for sensor, _ in alerted} | set(labels.beats)):
        found = np.sort([seq for name, seq in alerted if name == sensor]).astype(np.int64)
        positions, classes = labels.beats.get(sensor, (np.zeros(0, np.int64), np.zeros(0, str)))
        match, used = match_beats(found, positions, tolerance)
        flagged.append(match >= 0)
        anomalous.append(classes != "N")
        outside += int((~used).sum())
    is_flagged, is_anomalous = np.concatenate(flagged), np.concatenate(anomalous)
    result = evaluate_scores(is_flagged.astype(np.float64), is_anomalous, 0.5)
    return [
        f"  beats annotated    {len(is_flagged)}  ({int(is_anomalous.sum())} anomalous: S, V, F; "
        f"matched to alerts within {labels.match_seconds * 1000:.0f} ms)",
        f"  alerts received    {log.received}  (duplicates {log.duplicates}, outside the annotated beats {outside})",
        *_figures(result),
        "  (beats the daemon did not find or left unscored count as not flagged)",
    ]


def summary(log: AlertLog, labels: WindowLabels | BeatLabels, normal_label: int, metrics_url: str | None) -> str:
    scored = beat_summary(log, labels) if isinstance(labels, BeatLabels) else window_summary(log, labels, normal_label)
    lines = ["", "summary", *scored]
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


def format_alert(alert: dict[str, Any], new: bool) -> str:
    beat = f"  beat {alert['beat_seq']}" if "beat_seq" in alert else ""
    return (
        f"ALERT {alert.get('sensor_id')}  "
        f"window {alert.get('window_start_seq')}-{alert.get('window_end_seq')}{beat}  "
        f"score {alert.get('score', 0):.3f} > {alert.get('threshold', 0):.3f}" + ("" if new else "  (duplicate)")
    )


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
        if not isinstance(alert, dict):
            return
        new = log.add(alert)
        if not quiet:
            print(format_alert(alert, new), flush=True)

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    connect_side_client(client, settings, connected)
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
            if labels is not None and metrics_url and not _all_in(metrics_url, labels):
                continue
            if labels is not None:
                break
    except KeyboardInterrupt:
        pass
    finally:
        client.disconnect()
        client.loop_stop()
    if labels is None:
        return f"alerts received: {log.received} (duplicates {log.duplicates})"
    return summary(log, labels, normal_label, metrics_url)


def _all_in(metrics_url: str, labels: WindowLabels | BeatLabels) -> bool:
    """Whether the daemon has had everything: every labelled window scored, or every replayed sample received."""
    if isinstance(labels, BeatLabels):
        name, expected = "monitor_samples_received_total", labels.samples * len(labels.beats)
    else:
        name, expected = "monitor_windows_scored_total", len(labels)
    try:
        return sum(value for _, value in scrape_metrics(metrics_url).get(name, [])) >= expected
    except OSError:
        return False
