"""The input formats end to end: a real Mosquitto, the daemon process, `monitor replay --format` for binary frames
and Sparkplug B, and a simulated Sparkplug edge node (monitor.ingest.sparkplug.EdgeNode) publishing BIRTH, DATA and
DEATH, a rebirth, a lost message and an unknown alias."""

from __future__ import annotations

import time

import numpy as np
import paho.mqtt.client as mqtt
import paho.mqtt.publish as publish
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from monitor.ingest import sparkplug_schema as schema
from monitor.ingest.frame import encode_frame
from monitor.ingest.sparkplug import REBIRTH_METRIC, EdgeNode
from monitor.training.datasets import read_ucr
from tests.e2e.test_daemon_e2e import expected_alerts, flagged_beats
from tests.support import REPO, SPLITS, daemon_config, metric, replay_args, run_cli, train_and_evaluate, wait_until

pytestmark = pytest.mark.slow

SMD = REPO / "data" / "smd-excerpt" / "machine-1-3"
SMD_WINDOW, SMD_STRIDE = 30, 10
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SPARKPLUG_TOPICS = "spBv1.0/plant/#"


def sparkplug_input(channels: list[str], rate: float = 250.0, **options: object) -> dict:
    device = {"group": "plant", "node": "edge1", "device": "lead1", "sensor_id": "lead-1"}
    return {
        "formats": [{"filter": SPARKPLUG_TOPICS, "format": "sparkplug_b"}],
        "sparkplug": {"devices": [{**device, "channels": channels, "sample_rate_hz": rate}], **options},
    }


def test_replayed_frames_alert_exactly_what_evaluate_flags(broker, capture_factory, daemon_factory, tmp_path):
    """The test split as binary frames on their own topics, next to the JSON topics: the same alerts as JSON gives."""
    config = daemon_config(
        tmp_path / "monitor.yaml",
        broker.port,
        mqtt={"subscribe": ["sensors/+/ecg", "leads/+/frame"]},
        input={"formats": [{"filter": "leads/+/frame", "format": "frame"}]},
    )
    daemon = daemon_factory(config)
    alerts = capture_factory(broker.port, ["alerts/#"])
    expected, _, window = expected_alerts(SPLITS / "test.txt.xz", 20)
    result = run_cli(*replay_args(config, SPLITS / "test.txt.xz", 20, "--chunk", "140", "--format", "frame"))
    assert result.returncode == 0, result.stderr
    wait_until(lambda: metric(daemon.scrape(), "monitor_windows_scored_total") >= 3103, 120, what="all scored")
    alerts.wait_for(lambda c: len(c.payloads("alerts/")) >= len(expected), 60, what="all alerts")
    got = {(alert["sensor_id"], alert["window_start_seq"]) for alert in alerts.payloads("alerts/")}
    assert got == expected
    samples = daemon.scrape()
    assert metric(samples, "monitor_messages_received_total", outcome="accepted") == 3103
    assert metric(samples, "monitor_messages_received_total", outcome="bad_frame") == 0

    bad = encode_frame(np.zeros(4))[:-1]
    publish.single("leads/x/frame", bad, qos=1, hostname="127.0.0.1", port=broker.port)
    publish.single("sensors/y/ecg", encode_frame(np.zeros(4)), qos=1, hostname="127.0.0.1", port=broker.port)
    wait_until(
        lambda: metric(daemon.scrape(), "monitor_messages_received_total", outcome="bad_frame") == 1,
        30,
        what="the truncated frame counted",
    )
    wait_until(  # a frame on a JSON topic is bad JSON (not UTF-8 here)
        lambda: metric(daemon.scrape(), "monitor_messages_received_total", outcome="invalid_utf8") == 1, 30
    )
    assert daemon.stop() == 0


@pytest.fixture(scope="module")
def smd_model(tmp_path_factory):
    """A small 38-channel model trained on the SMD excerpt, and the windows `monitor evaluate` flags on a labelled
    test recording."""
    root = tmp_path_factory.mktemp("formats-smd")
    paths = [SMD.with_name(SMD.name + suffix) for suffix in ("_train.npy", "_test.npy", "_test_labels.npy")]
    report = train_and_evaluate(root / "model", paths[:1], paths[1:2], paths[2:], SMD_WINDOW, SMD_STRIDE)
    flagged = set(report["recordings"][0]["flagged_window_starts"])
    assert flagged, "the test recording must have flagged windows for the comparison to mean something"
    return root / "model", flagged


def test_replayed_multichannel_recording_as_sparkplug_ddata_alerts_what_evaluate_flags(
    smd_model, broker, capture_factory, daemon_factory, tmp_path
):
    model, flagged = smd_model
    channels = [f"Server/Metric{index:02d}" for index in range(38)]
    config = daemon_config(
        tmp_path / "monitor.yaml",
        broker.port,
        model=model,
        mqtt={"subscribe": [SPARKPLUG_TOPICS]},
        windowing={"stride": SMD_STRIDE},
        input=sparkplug_input(channels),
    )
    daemon = daemon_factory(config, env=ONE_THREAD)
    alerts = capture_factory(broker.port, ["alerts/#"])
    recording = SMD.with_name(SMD.name + "_test.npy")
    result = run_cli(*replay_args(config, recording, 1, "--chunk", "50", "--format", "sparkplug_b"))
    assert result.returncode == 0, result.stderr
    windows = (1500 - SMD_WINDOW) // SMD_STRIDE + 1
    wait_until(lambda: metric(daemon.scrape(), "monitor_windows_scored_total") >= windows, 120, what="all scored")
    alerts.wait_for(lambda c: len(c.payloads("alerts/")) >= len(flagged), 60, what="all alerts")
    payloads = alerts.payloads("alerts/")
    assert {alert["window_start_seq"] for alert in payloads} == flagged and len(payloads) == len(flagged)
    assert {alert["sensor_id"] for alert in payloads} == {"lead-1"}
    source = {"group": "plant", "node": "edge1", "device": "lead1", "metrics": channels}
    assert all(alert["sparkplug"] == source for alert in payloads)
    samples = daemon.scrape()
    assert metric(samples, "monitor_windows_scored_total") == windows
    assert metric(samples, "monitor_messages_received_total", outcome="control") == 2  # NBIRTH, DBIRTH
    assert metric(samples, "monitor_messages_received_total", outcome="accepted") == 1500 / 50
    assert daemon.stop() == 0


class EdgeSession:
    """A simulated edge node on the broker: publishes what its EdgeNode builds, QoS 0 as Sparkplug nodes do."""

    def __init__(self, port: int) -> None:
        self.node = EdgeNode("plant", "edge1", bd_seq=1)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"edge-{time.time_ns()}")
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def send(self, message: tuple[str, bytes]) -> None:
        self.client.publish(*message, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def anomalous_beats(count: int) -> np.ndarray:
    """Beats of the test split the default model flags, back to back: [count * 140]."""
    flagged, _, window = flagged_beats(SPLITS / "test.txt.xz")
    return read_ucr(SPLITS / "test.txt.xz").windows[flagged[:count]].reshape(-1, 1)


def test_edge_node_birth_data_death_and_rebirth(broker, capture_factory, daemon_factory, tmp_path):
    """DATA before BIRTH is refused and a rebirth requested; BIRTH then DATA alerts (an episode opens); a DDEATH drops
    the partial window and resolves the episode (stream_ended); after a new BIRTH the device is scored again."""
    config = daemon_config(
        tmp_path / "monitor.yaml",
        broker.port,
        mqtt={"subscribe": [SPARKPLUG_TOPICS]},
        input=sparkplug_input(["ECG"], rebirth=True, rebirth_interval_seconds=0.2),
        alerts={"lifecycle": {"enabled": True, "open_anomalous": 1, "open_window": 1, "resume_timeout_seconds": 0}},
    )
    daemon = daemon_factory(config)
    commands = capture_factory(broker.port, ["spBv1.0/plant/NCMD/#"])
    alerts = capture_factory(broker.port, ["alerts/#"])
    edge = EdgeSession(broker.port)
    beats, t0 = anomalous_beats(2), 1_700_000_000_000.0
    try:
        edge.send(edge.node.ddata("lead1", ["ECG"], beats[:140], t0, 4.0))
        wait_until(lambda: metric(daemon.scrape(), "monitor_messages_received_total", outcome="no_birth") == 1, 30)
        wait_until(lambda: commands.messages, 30, what="a rebirth request")
        command = schema.Payload.FromString(commands.messages[0][1])
        assert commands.messages[0][0] == "spBv1.0/plant/NCMD/edge1"
        assert [(m.name, m.boolean_value) for m in command.metrics] == [(REBIRTH_METRIC, True)]

        edge.send(edge.node.nbirth(int(t0)))
        edge.send(edge.node.dbirth("lead1", ["ECG"], int(t0)))
        edge.send(edge.node.ddata("lead1", ["ECG"], beats[:210], t0, 4.0))  # one window and a half
        alerts.wait_for(lambda c: c.payloads("alerts/lead-1/events"), 30, what="an episode opened")
        assert [a["window_start_seq"] for a in alerts.payloads("alerts/lead-1") if "window_start_seq" in a] == [0]

        edge.send(edge.node.ddeath("lead1", int(t0) + 840))
        alerts.wait_for(
            lambda c: any(e.get("reason") == "stream_ended" for e in c.payloads("alerts/lead-1/events")),
            30,
            what="the episode resolved by the DDEATH",
        )
        samples = daemon.scrape()
        assert metric(samples, "monitor_windows_dropped_total", reason="stream_ended") == 1

        edge.send(edge.node.dbirth("lead1", ["ECG"], int(t0) + 2000))
        edge.send(edge.node.ddata("lead1", ["ECG"], beats[140:280], t0 + 2000, 4.0))
        wait_until(lambda: metric(daemon.scrape(), "monitor_windows_scored_total") == 2, 30, what="scored again")
    finally:
        edge.close()
    assert daemon.stop() == 0


def test_edge_node_seq_gap_and_unknown_alias(broker, daemon_factory, tmp_path):
    """A lost DATA message breaks the window across it (counted as a seq gap); an unknown alias is refused and the
    daemon goes on."""
    config = daemon_config(
        tmp_path / "monitor.yaml", broker.port, mqtt={"subscribe": [SPARKPLUG_TOPICS]}, input=sparkplug_input(["ECG"])
    )
    daemon = daemon_factory(config)
    edge = EdgeSession(broker.port)
    beats, t0 = anomalous_beats(3), 1_700_000_000_000.0
    try:
        edge.send(edge.node.nbirth(int(t0)))
        edge.send(edge.node.dbirth("lead1", ["ECG"], int(t0)))
        edge.send(edge.node.ddata("lead1", ["ECG"], beats[:100], t0, 4.0))
        edge.node.ddata("lead1", ["ECG"], beats[100:140], t0 + 400, 4.0)  # lost: never published
        edge.send(edge.node.ddata("lead1", ["ECG"], beats[140:420], t0 + 560, 4.0))
        wait_until(lambda: metric(daemon.scrape(), "monitor_seq_gaps_total") == 1, 30, what="the gap")
        wait_until(lambda: metric(daemon.scrape(), "monitor_windows_scored_total") == 2, 30, what="2 windows")
        samples = daemon.scrape()
        assert metric(samples, "monitor_windows_dropped_total", reason="seq_gap") == 1

        unknown = schema.Payload(seq=edge.node.seq, timestamp=int(t0) + 2000)
        unknown.metrics.add(alias=77, timestamp=int(t0) + 2000, float_value=1.0)
        edge.send((edge.node.topic("DDATA", "lead1"), unknown.SerializeToString()))
        wait_until(lambda: metric(daemon.scrape(), "monitor_messages_received_total", outcome="unknown_alias") == 1, 30)
        wait_until(lambda: daemon.events("message_dropped"), 30, what="the refusal logged")
        assert daemon.events("message_dropped")[-1]["reason"] == "unknown_alias"
    finally:
        edge.close()
    assert daemon.stop() == 0
