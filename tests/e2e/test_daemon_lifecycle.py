"""The daemon process against a real broker: bad input, seq handling, signals, reloads, config errors."""

from __future__ import annotations

import json
import shutil
import signal
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.support import DEFAULT_MODEL, SPLITS, daemon_config, metric, run_cli, wait_until

pytestmark = pytest.mark.slow
WINDOW = 140


def publisher(port: int) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{time.time_ns()}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def publish(client: mqtt.Client, topic: str, payload: bytes | str) -> None:
    client.publish(topic, payload, qos=1).wait_for_publish(10)


def beats(count: int) -> np.ndarray:
    """The first `count` normal beats of the calibration split, back to back."""
    rows = np.loadtxt(SPLITS / "calibration_normal.txt.xz", max_rows=count, dtype=np.float32, ndmin=2)
    return rows[:, 1:].reshape(-1)


def test_bad_payloads_are_counted_and_the_daemon_keeps_scoring(broker, daemon_factory, tmp_path):
    daemon = daemon_factory(daemon_config(tmp_path / "m.yaml", broker.port, windowing={"max_payload_bytes": 4096}))
    client = publisher(broker.port)
    bad = {
        "invalid_json": b"{not json",
        "invalid_utf8": b"\xff\xfe{}",
        "not_object": b"[1, 2, 3]",
        "missing_samples": b'{"seq": 0}',
        "bad_samples": b'{"samples": ["a", "b"]}',
        "wrong_channels": b'{"samples": [[1, 2], [3, 4]]}',
        "non_finite": b'{"samples": [1e39, 1]}',  # beyond float32
        "bad_seq": b'{"samples": [1, 2], "seq": -5}',
        "too_large": json.dumps({"samples": [0.5] * 2000}).encode(),
    }
    for payload in bad.values():
        publish(client, "sensors/bad-1/ecg", payload)
    publish(client, "sensors/bad-1/ecg", b'{"samples": [1, 2], "ts": "yesterday"}')  # the ts ignored, samples kept
    publish(client, "sensors//ecg", b'{"samples": [1]}')  # empty sensor id
    stream = beats(2)
    for start in range(0, len(stream), 35):
        publish(
            client, "sensors/good-1/ecg", json.dumps({"seq": start, "samples": stream[start : start + 35].tolist()})
        )
    wait_until(lambda: metric(daemon.scrape(), "monitor_windows_scored_total") == 2, 30, what="the good windows scored")
    samples = daemon.scrape()
    for reason in bad:
        assert metric(samples, "monitor_messages_received_total", outcome=reason) == 1, reason
    assert metric(samples, "monitor_messages_received_total", outcome="bad_topic") == 1
    assert metric(samples, "monitor_messages_received_total", outcome="internal_error") == 0
    assert metric(samples, "monitor_ts_ignored_total", reason="not_a_number") == 1
    dropped = daemon.events("message_dropped")
    assert {event["reason"] for event in dropped} >= set(bad)
    client.loop_stop()
    assert daemon.process.poll() is None
    assert daemon.stop() == 0


def test_seq_gaps_and_duplicates_are_counted(broker, daemon_factory, tmp_path):
    daemon = daemon_factory(daemon_config(tmp_path / "m.yaml", broker.port))
    client = publisher(broker.port)
    stream = beats(4)

    def send(seq, n):
        return publish(client, "sensors/gappy/ecg", json.dumps({"seq": seq, "samples": stream[seq : seq + n].tolist()}))

    send(0, 140)  # window 0 complete
    send(0, 140)  # duplicate: ignored
    send(140, 70)  # half of window 1 ...
    send(280, 140)  # ... gap: window 1 can never complete; window 2 complete
    send(350, 70)  # old samples (already seen): a partial duplicate
    wait_until(lambda: metric(daemon.scrape(), "monitor_windows_scored_total") == 2, 30, what="two windows scored")
    samples = daemon.scrape()
    assert metric(samples, "monitor_messages_received_total", outcome="duplicate") >= 1
    assert metric(samples, "monitor_seq_gaps_total") == 1
    assert metric(samples, "monitor_windows_dropped_total", reason="seq_gap") == 1
    assert daemon.stop() == 0


def test_sigterm_drains_and_exits_zero(broker, daemon_factory, capture_factory, tmp_path):
    config = daemon_config(tmp_path / "m.yaml", broker.port, batching={"max_wait_seconds": 0.5})
    daemon = daemon_factory(config)
    status = capture_factory(broker.port, ["monitor/#"])
    online = lambda c: any(json.loads(p)["status"] == "online" for _, p, _ in c.messages)  # noqa: E731
    status.wait_for(online, 10, what="online status")
    started = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(10) == 0
    assert time.monotonic() - started < 5
    status.wait_for(lambda c: json.loads(c.messages[-1][1])["status"] == "offline", 10, what="offline status")
    assert daemon.events("stopped")


def test_sighup_reloads_a_good_model_and_keeps_the_old_one_when_broken(broker, daemon_factory, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL, model)
    daemon = daemon_factory(daemon_config(tmp_path / "m.yaml", broker.port, model=model))
    threshold = metric(daemon.scrape(), "monitor_threshold")

    meta = json.loads((model / "model.json").read_text())
    meta["threshold"]["value"] = threshold * 2
    meta["version"] = "reloaded"
    (model / "model.json").write_text(json.dumps(meta))
    daemon.process.send_signal(signal.SIGHUP)
    wait_until(
        lambda: metric(daemon.scrape(), "monitor_model_reloads_total", outcome="success") == 1, 30, what="reload"
    )
    assert metric(daemon.scrape(), "monitor_threshold") == pytest.approx(threshold * 2)

    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    daemon.process.send_signal(signal.SIGHUP)
    wait_until(
        lambda: metric(daemon.scrape(), "monitor_model_reloads_total", outcome="failure") == 1, 30, what="failed reload"
    )
    failed = daemon.events("reload_failed")
    assert "checksum" in failed[0]["error"] and failed[0]["keeping_model"] == "reloaded"
    assert metric(daemon.scrape(), "monitor_threshold") == pytest.approx(threshold * 2)

    client = publisher(broker.port)
    publish(client, "sensors/after-reload/ecg", json.dumps({"seq": 0, "samples": beats(1).tolist()}))
    wait_until(
        lambda: metric(daemon.scrape(), "monitor_windows_scored_total") == 1, 30, what="scoring with the old model"
    )
    assert daemon.stop() == 0


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("mqtt:\n  prot: 1883\n", "mqtt.prot: unknown key"),
        ("mqtt:\n  port: 99999\n", "mqtt.port: must be less than or equal to 65535"),
        ("batching:\n  max_batch: zero\n", "batching.max_batch: must be a valid integer"),
        ("mqtt:\n  subscribe: ['sensors/#/ecg']\n", "mqtt.subscribe"),
        ("mqtt:\n  alert_topic: 'alerts/{sensor}'\n", "mqtt.alert_topic"),
        ("model:\n  path: /nonexistent/model\n", "bad.yaml: model.path: '/nonexistent/model': no such model directory"),
        ("model:\n  device: tpu\n", "model.device"),
        ("mqtt: [1, 2\n", "invalid YAML at line"),
    ],
)
def test_bad_config_never_starts_and_says_why_in_one_line(tmp_path, yaml_text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    for command in (["check-config", str(path)], ["run", "--config", str(path)]):
        result = run_cli(*command, timeout=60)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("monitor: error: "), result.stderr
        assert expected in lines[0]
        assert "Traceback" not in result.stderr


def test_every_field_violation_is_its_own_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "mqtt:\n  port: -1\n  keepalive_seconds: 1\nbatching:\n  max_wait_seconds: -2\nlogging:\n  level: loud\n"
    )
    result = run_cli("check-config", str(path), timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 4
    assert [line.split(": ")[3] for line in lines] == [
        "mqtt.port",
        "mqtt.keepalive_seconds",
        "batching.max_wait_seconds",
        "logging.level",
    ]


def test_check_config_accepts_the_shipped_config():
    result = run_cli("check-config", "configs/monitor.yaml", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout
