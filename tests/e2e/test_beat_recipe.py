"""The beat-mode recipe as a user runs it: `configs/monitor-beats.yaml` (pointed at a test broker), `monitor run`,
`monitor watch --labels`, and `monitor replay` of a bundled recording with its annotations at the config's rate;
the watch ends with beat-level precision and recall over every annotated beat and prints every alert the daemon
published. A message that says another sample rate is dropped by the daemon and counted."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import orjson
import paho.mqtt.publish as publish
import pytest
import yaml

from monitor.cli import main
from monitor.training.beat_data import aami_class, read_annotations
from tests.support import REPO, free_port, metric, run_cli, wait_until

pytestmark = pytest.mark.slow

RECORD = REPO / "data" / "mitdb-dev" / "test" / "208_excerpt"


@pytest.fixture
def recipe(broker, tmp_path):
    """configs/monitor-beats.yaml as shipped, but for the broker's port, a metrics port and JSON logs."""
    config = yaml.safe_load((REPO / "configs" / "monitor-beats.yaml").read_text())
    config["mqtt"]["port"] = broker.port
    config["metrics"] = {"port": free_port()}
    config["logging"] = {"format": "json"}
    path = tmp_path / "monitor-beats.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_run_watch_and_replay_end_with_live_beat_precision_and_recall(recipe, broker, daemon_factory, tmp_path, capsys):
    assert main(["check-config", str(recipe), "--connect"]) == 0
    assert f"broker 127.0.0.1:{broker.port} connected to" in capsys.readouterr().out
    daemon = daemon_factory(recipe)
    labels = tmp_path / "beats.jsonl"
    metrics_url = f"http://127.0.0.1:{daemon.metrics_port}/metrics"
    watch = subprocess.Popen(
        [sys.executable, "-m", "monitor", "watch", "--config", str(recipe), "--labels", str(labels)]
        + ["--metrics-url", metrics_url],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watch.stdout is not None and "watching" in watch.stdout.readline()
        replay = run_cli(
            "replay", "--config", str(recipe), "--data", str(RECORD.with_suffix(".npy")),
            "--annotations", str(RECORD.with_suffix(".csv")), "--sensors", "1", "--speed", "max",
            "--labels-out", str(labels),
        )  # fmt: skip
        assert replay.returncode == 0, replay.stderr
        assert replay.stdout.strip().endswith("from 1 sensors at 360 Hz")
        out, err = watch.communicate(timeout=300)
    finally:
        watch.kill()
    assert watch.returncode == 0, err
    published = metric(daemon.scrape(), "monitor_alerts_published_total")
    assert published > 50 and out.count("ALERT ") == published  # every alert printed
    _, symbols = read_annotations(RECORD.with_suffix(".csv"))
    classes = [aami_class(symbol) for symbol in symbols]
    scored = sum(name in ("N", "S", "V", "F") for name in classes)
    anomalous = sum(name in ("S", "V", "F") for name in classes)
    assert f"beats annotated    {scored}  ({anomalous} anomalous: S, V, F" in out
    assert f"alerts received    {published:.0f}  (duplicates 0," in out
    tp, fp, fn, tn = map(int, re.search(r"confusion: tp (\d+)  fp (\d+)  fn (\d+)  tn (\d+)", out).groups())
    assert (tp + fn, tp + fp + fn + tn) == (anomalous, scored)
    precision, recall = (float(value) for value in re.search(r"precision ([\d.]+)  recall ([\d.]+)", out).groups())
    # The bundled model (1.3.0) on this excerpt: 77 alerts, precision 0.99, recall 0.68 over all 333 annotated beats
    # (21 not found or not scorable count as misses here, unlike in `monitor evaluate`).
    assert precision > 0.9 and recall > 0.6, out

    # A sensor that says it samples at 250 Hz is refused by a 360 Hz daemon, counted and logged.
    body = {"seq": 0, "samples": np.zeros(35).tolist(), "sample_rate_hz": 250}
    publish.single("sensors/wrong-rate/ecg", orjson.dumps(body), qos=1, hostname="127.0.0.1", port=broker.port)
    wait_until(lambda: metric(daemon.scrape(), "monitor_messages_received_total", outcome="wrong_sample_rate") == 1, 30)
    dropped = daemon.wait_for_event("message_dropped")
    assert dropped[-1]["reason"] == "wrong_sample_rate" and dropped[-1]["sensor_id"] == "wrong-rate"
    assert daemon.stop() == 0
