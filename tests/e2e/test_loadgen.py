"""The load generator the e2e bench starts, run against a real broker: its closing summary is the record the bench
reads, and what it sends in each input format is what the daemon's reader of that format accepts."""

from __future__ import annotations

import subprocess

import pytest
from prometheus_client import CollectorRegistry

from bench import harness, loadgen
from bench.harness import DATA_DIR, TRAIN_NORMAL, split_path
from monitor.config.schema import InputSettings
from monitor.ingest.batching import WindowQueue
from monitor.ingest.formats import InputFormats
from monitor.ingest.payload import PayloadDecoder
from monitor.ingest.stage import Ingest
from monitor.ingest.windowing import WindowAssembler
from monitor.telemetry.metrics import Metrics
from tests.support import REPO, Broker

pytestmark = pytest.mark.slow


def test_load_generator_summary_is_read_by_the_bench(broker: Broker) -> None:
    """The generator's closing line (a real run against a real broker) must fit the record the e2e bench reads."""
    command = loadgen.command(broker.port, 4, 1.0, 250.0, 35, 1, split_path(DATA_DIR, TRAIN_NORMAL))
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True, cwd=REPO)
    summary = harness.load_summary(result.stdout, result.stderr)
    assert "error" not in summary and summary["messages_per_second"] > 0 < summary["target_messages_per_second"]
    assert summary["messages"] > 0 and summary["publish_errors"] == 0 and summary["unacknowledged"] == 0


@pytest.mark.parametrize("input_format", ["json", "frame", "sparkplug_b"])
def test_load_generator_sends_each_format_as_the_daemon_reads_it(broker: Broker, capture_factory, input_format) -> None:
    """Every message the generator sends in a format is accepted by the daemon's reader of that format."""
    capture = capture_factory(broker.port, ["sensors/#", "spBv1.0/#"])
    topic = "sensors/{sensor_id}/ecg"
    command = loadgen.command(
        broker.port, 3, 1.0, 250.0, 35, 1, split_path(DATA_DIR, TRAIN_NORMAL), False, input_format, topic
    )
    subprocess.run(command, capture_output=True, text=True, timeout=60, check=True, cwd=REPO)
    capture.wait_for(lambda c: len(c.messages) >= 12, 10)
    births = [topic.split("/") for topic, _, _ in capture.messages if "/DBIRTH/" in topic]
    devices = [
        {"group": group, "node": node, "device": device, "channels": list(loadgen.CHANNELS), "sample_rate_hz": 250}
        for _, group, _, node, device in births
    ]
    settings = InputSettings.model_validate({"format": input_format, "sparkplug": {"devices": devices}})
    decoder = PayloadDecoder(1)
    registry = CollectorRegistry()
    assembler = WindowAssembler(140, 140, 1, 10, 60.0)
    ingest = Ingest(
        decoder, assembler, WindowQueue(100), Metrics(registry, 4, 1.0), 1, formats=InputFormats(settings, decoder)
    )
    for topic_name, payload, _ in capture.messages:
        ingest.handle(topic_name, payload, 0.0)
    data = len(capture.messages) - (len(births) + 1 if input_format == "sparkplug_b" else 0)
    assert registry.get_sample_value("monitor_messages_received_total", {"outcome": "accepted"}) == data >= 12
    assert assembler.active_sensors == 3
