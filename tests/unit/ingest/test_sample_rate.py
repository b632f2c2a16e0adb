"""A message may say its `sample_rate_hz`; the input stage drops one whose rate is not the configured
`windowing.sample_rate_hz` (counted as `wrong_sample_rate`, logged once), and ignores the field without one."""

from __future__ import annotations

import math

import numpy as np
import orjson
import structlog
from prometheus_client import CollectorRegistry
from structlog.testing import LogCapture

from monitor.ingest import stage
from monitor.ingest.batching import WindowQueue
from monitor.ingest.payload import PayloadDecoder
from monitor.ingest.stage import Ingest
from monitor.ingest.windowing import Window, WindowAssembler
from monitor.telemetry.metrics import Metrics


def test_the_payload_carries_its_rate_and_anything_but_a_number_matches_none():
    decoder = PayloadDecoder(1)
    assert decoder.decode(b'{"samples": [1], "sample_rate_hz": 360}').sample_rate_hz == 360.0
    assert decoder.decode(b'{"samples": [1], "sample_rate_hz": null}').sample_rate_hz is None
    assert decoder.decode(b'{"samples": [1]}').sample_rate_hz is None
    for junk in (b'"360"', b"true", b"[360]"):
        assert math.isnan(decoder.decode(b'{"samples": [1], "sample_rate_hz": ' + junk + b"}").sample_rate_hz)


def run(rate: float | None, payloads: list[dict], monkeypatch) -> tuple[CollectorRegistry, WindowQueue, list[dict]]:
    logs = LogCapture()  # the stage's own logger, whatever an earlier test configured structlog to
    monkeypatch.setattr(stage, "log", structlog.wrap_logger(None, processors=[logs]))
    registry = CollectorRegistry()
    queue: WindowQueue[Window] = WindowQueue(100)
    assembler = WindowAssembler(4, 4, 1, max_sensors=10, idle_seconds=60.0)
    ingest = Ingest(PayloadDecoder(1), assembler, queue, Metrics(registry, 64, 1.0), 1, sample_rate_hz=rate)
    for seq, payload in enumerate(payloads):
        document = {"samples": np.ones(4).tolist(), "seq": 4 * seq, **payload}
        ingest.handle("sensors/s1/ecg", orjson.dumps(document), now=float(seq))
    return registry, queue, logs.entries


def test_a_message_of_another_rate_is_dropped_counted_and_logged_once(monkeypatch):
    payloads = [{"sample_rate_hz": 360}, {"sample_rate_hz": 361}, {}, {"sample_rate_hz": 250}, {"sample_rate_hz": 250}]
    registry, queue, logs = run(360.0, payloads, monkeypatch)
    count = lambda outcome: registry.get_sample_value("monitor_messages_received_total", {"outcome": outcome})  # noqa: E731
    assert (count("accepted"), count("wrong_sample_rate")) == (3, 2)  # 361 is within 0.5 %
    assert queue.depth() == 3
    dropped = [entry for entry in logs if entry["event"] == "message_dropped"]
    assert len(dropped) == 1 and dropped[0]["reason"] == "wrong_sample_rate"
    assert dropped[0]["detail"] == "250 Hz, windowing.sample_rate_hz is 360"


def test_without_a_configured_rate_the_field_is_only_information(monkeypatch):
    registry, queue, _ = run(None, [{"sample_rate_hz": 250}, {"sample_rate_hz": "fast"}], monkeypatch)
    assert registry.get_sample_value("monitor_messages_received_total", {"outcome": "accepted"}) == 2
    assert queue.depth() == 2
