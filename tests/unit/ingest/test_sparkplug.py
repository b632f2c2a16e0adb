"""SparkplugReader against messages of a simulated edge node (EdgeNode): BIRTH, DATA, DEATH, rebirth, seq gaps,
unknown aliases, every refusal; the stage ending a stream; and a fuzz of the reader."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from monitor.config.schema import InputSettings
from monitor.errors import PayloadError
from monitor.ingest import sparkplug_schema as schema
from monitor.ingest.batching import WindowQueue
from monitor.ingest.formats import InputFormats
from monitor.ingest.payload import REJECT_REASONS, PayloadDecoder
from monitor.ingest.sparkplug import REBIRTH_METRIC, DeviceMapping, EdgeNode, SparkplugReader
from monitor.ingest.stage import Ingest
from monitor.ingest.windowing import WindowAssembler
from monitor.telemetry.metrics import Metrics

CHANNELS = ("Vibration/X", "Vibration/Y")
RATE = 250.0
PERIOD_MS = 4.0
T0 = 1_700_000_000_000


def mapping(device: str = "pump1", sensor_id: str = "pump-1") -> DeviceMapping:
    return DeviceMapping("plant", "edge1", device, sensor_id, CHANNELS, RATE)


def reader(**options: object) -> SparkplugReader:
    mappings = [mapping(), mapping("pump2", "pump-2")]
    return SparkplugReader(mappings, 2, 4096, 262144, 1e6, **options)  # type: ignore[arg-type]


def rows(n: int, start: float = 0.0) -> np.ndarray:
    return np.column_stack([np.arange(n) + start, -np.arange(n) - start]).astype(np.float32)


def born(spb: SparkplugReader, node: EdgeNode, devices: tuple[str, ...] = ("pump1",)) -> None:
    assert spb.read(*node.nbirth(T0), now=0.0).message is None
    for device in devices:
        assert spb.read(*node.dbirth(device, CHANNELS, T0), now=0.0).message is None


def reason_of(spb: SparkplugReader, topic: str, payload: bytes) -> str:
    with pytest.raises(PayloadError) as info:
        spb.read(topic, payload, 0.0)
    return info.value.reason


def test_birth_then_data_gives_rows_by_timestamp() -> None:
    spb, node = reader(), EdgeNode("plant", "edge1")
    born(spb, node)
    first = spb.read(*node.ddata("pump1", CHANNELS, rows(35), T0, PERIOD_MS), now=0.0)
    second = spb.read(*node.ddata("pump1", CHANNELS, rows(35, 35), T0 + 35 * PERIOD_MS, PERIOD_MS), now=0.0)
    assert first.sensor_id == "pump-1" and first.message is not None and second.message is not None
    np.testing.assert_array_equal(first.message.samples, rows(35))
    assert (first.message.seq, first.message.ts) == (0, T0 / 1000)
    assert second.message.seq == 35
    np.testing.assert_array_equal(second.message.samples, rows(35, 35))


def test_rows_are_ordered_by_timestamp_and_metrics_may_come_by_name() -> None:
    spb, node = reader(), EdgeNode("plant", "edge1")
    born(spb, node)
    payload = schema.Payload(seq=node.seq, timestamp=T0)
    for stamp, x, y in ((T0 + 4, 2.0, -2.0), (T0, 1.0, -1.0)):
        payload.metrics.add(name="Vibration/Y", timestamp=stamp, float_value=y)
        payload.metrics.add(name="Vibration/X", timestamp=stamp, float_value=x)
        payload.metrics.add(name="Properties/Status", timestamp=stamp, string_value="ok")
    outcome = spb.read(node.topic("DDATA", "pump1"), payload.SerializeToString(), 0.0)
    assert outcome.message is not None
    np.testing.assert_array_equal(outcome.message.samples, [[1.0, -1.0], [2.0, -2.0]])


def test_signed_integers_travel_as_twos_complement() -> None:
    spb, node = reader(), EdgeNode("plant", "edge1")
    spb.read(*node.nbirth(T0), now=0.0)
    spb.read(*node.dbirth("pump1", CHANNELS, T0, datatype=schema.INT16), now=0.0)
    payload = schema.Payload(seq=node.seq, timestamp=T0)
    payload.metrics.add(alias=1, timestamp=T0, int_value=(-5) & 0xFFFFFFFF)
    payload.metrics.add(alias=2, timestamp=T0, int_value=7)
    outcome = spb.read(node.topic("DDATA", "pump1"), payload.SerializeToString(), 0.0)
    assert outcome.message is not None
    np.testing.assert_array_equal(outcome.message.samples, [[-5.0, 7.0]])


def test_data_before_birth_is_refused_and_a_rebirth_requested_at_most_once_an_interval() -> None:
    spb, node = reader(rebirth=True, rebirth_interval_seconds=10.0), EdgeNode("plant", "edge1")
    sent: list[tuple[str, bytes]] = []
    spb.publish = lambda topic, payload: sent.append((topic, payload))
    data = node.ddata("pump1", CHANNELS, rows(5), T0, PERIOD_MS)
    for now in (0.0, 5.0, 10.0):
        with pytest.raises(PayloadError) as info:
            spb.read(*data, now=now)
        assert info.value.reason == "no_birth"
    assert [topic for topic, _ in sent] == ["spBv1.0/plant/NCMD/edge1"] * 2
    command = schema.Payload.FromString(sent[0][1])
    assert [(m.name, m.datatype, m.boolean_value) for m in command.metrics] == [(REBIRTH_METRIC, schema.BOOLEAN, True)]


def test_unknown_alias_is_refused_and_asks_for_a_rebirth() -> None:
    spb, node = reader(rebirth=True), EdgeNode("plant", "edge1")
    sent: list[str] = []
    spb.publish = lambda topic, payload: sent.append(topic)
    born(spb, node)
    payload = schema.Payload(seq=node.seq, timestamp=T0)
    payload.metrics.add(alias=99, timestamp=T0, float_value=1.0)
    assert reason_of(spb, node.topic("DDATA", "pump1"), payload.SerializeToString()) == "unknown_alias"
    assert sent == ["spBv1.0/plant/NCMD/edge1"]


def test_without_rebirth_configured_nothing_is_sent() -> None:
    spb, node = reader(), EdgeNode("plant", "edge1")
    spb.publish = lambda topic, payload: pytest.fail("sent a command")
    assert reason_of(spb, *node.ddata("pump1", CHANNELS, rows(1), T0, PERIOD_MS)) == "no_birth"


def test_a_lost_message_moves_the_next_data_past_the_gap() -> None:
    spb, node = reader(), EdgeNode("plant", "edge1")
    born(spb, node)
    spb.read(*node.ddata("pump1", CHANNELS, rows(10), T0, PERIOD_MS), now=0.0)
    node.ddata("pump1", CHANNELS, rows(10, 10), T0 + 40, PERIOD_MS)  # lost: never read
    after = spb.read(*node.ddata("pump1", CHANNELS, rows(10, 20), T0 + 80, PERIOD_MS), now=0.0)
    assert after.message is not None and after.message.seq == 20  # 10 samples missing, by the timestamps


def test_a_gap_in_another_devices_message_still_breaks_the_stream() -> None:
    """The lost message may have been pump1's: the next DATA starts at least one sample later."""
    spb, node = reader(), EdgeNode("plant", "edge1")
    born(spb, node, ("pump1", "pump2"))
    spb.read(*node.ddata("pump1", CHANNELS, rows(10), T0, PERIOD_MS), now=0.0)
    node.ddata("pump2", CHANNELS, rows(10), T0, PERIOD_MS)  # lost
    after = spb.read(*node.ddata("pump1", CHANNELS, rows(10, 10), T0 + 40, PERIOD_MS), now=0.0)
    assert after.message is not None and after.message.seq == 11


def test_seq_wraps_at_256_without_a_gap() -> None:
    spb, node = reader(), EdgeNode("plant", "edge1")
    born(spb, node)
    for index in range(300):
        outcome = spb.read(*node.ddata("pump1", CHANNELS, rows(1, index), T0 + index * PERIOD_MS, PERIOD_MS), now=0.0)
        assert outcome.message is not None and outcome.message.seq == index


def test_rebirth_keeps_the_stream_going() -> None:
    spb, node = reader(), EdgeNode("plant", "edge1")
    born(spb, node)
    spb.read(*node.ddata("pump1", CHANNELS, rows(10), T0, PERIOD_MS), now=0.0)
    born(spb, node)
    after = spb.read(*node.ddata("pump1", CHANNELS, rows(10, 10), T0 + 40, PERIOD_MS), now=0.0)
    assert after.message is not None and after.message.seq == 10


def test_deaths_end_streams() -> None:
    spb, node = reader(), EdgeNode("plant", "edge1", bd_seq=3)
    born(spb, node, ("pump1", "pump2"))
    assert spb.read(*node.ddeath("pump2", T0), now=0.0).ended == ["pump-2"]
    assert reason_of(spb, *node.ddata("pump2", CHANNELS, rows(1), T0, PERIOD_MS)) == "no_birth"
    stale = EdgeNode("plant", "edge1", bd_seq=2)
    assert spb.read(*stale.ndeath(T0), now=0.0).ended == []  # an earlier session's will
    assert spb.read(*node.ndeath(T0), now=0.0).ended == ["pump-1"]
    assert reason_of(spb, *node.ddata("pump1", CHANNELS, rows(1), T0, PERIOD_MS)) == "no_birth"


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("spBv1.0/plant/DDATA/edge1/pump1", b"\xff\xff\xff", "invalid_protobuf"),
        ("spBv1.0/plant/DDATA/edge1", b"", "bad_topic"),
        ("spBv1.0/plant/NDATA/edge1/pump1", b"", "bad_topic"),
        ("spBv1.0/plant/XDATA/edge1/pump1", b"", "bad_topic"),
        ("spBv1.0/plant/DDATA/edge1/pump1", schema.Payload(timestamp=1).SerializeToString(), "bad_seq"),
        ("spBv1.0/plant/DDATA/edge1/pump1", schema.Payload(seq=256).SerializeToString(), "bad_seq"),
        ("spBv1.0/plant/DDATA/edge1/pump1", b"\0" * 300000, "too_large"),
    ],
)
def test_refusals_before_any_state(topic: str, payload: bytes, reason: str) -> None:
    assert reason_of(reader(), topic, payload) == reason


def test_refused_data() -> None:
    spb, node = reader(), EdgeNode("plant", "edge1")
    born(spb, node)
    cases: dict[str, list[tuple[int, int | None, object]]] = {  # alias, timestamp, value
        "wrong_channels": [(1, T0, 1.0)],
        "bad_samples": [(1, T0, "text"), (2, T0, 1.0)],
        "bad_ts": [(1, None, 1.0), (2, None, 1.0)],
        "value_out_of_range": [(1, T0, 1e7), (2, T0, 1.0)],
        "non_finite": [(1, T0, float("nan")), (2, T0, 1.0)],
    }
    for reason, metrics in cases.items():
        payload = schema.Payload(seq=node.seq)
        node.seq = (node.seq + 1) % 256
        for alias, stamp, value in metrics:
            metric = payload.metrics.add(alias=alias)
            if stamp is not None:
                metric.timestamp = stamp
            if isinstance(value, str):
                metric.string_value = value
            else:
                metric.double_value = value
        assert reason_of(spb, node.topic("DDATA", "pump1"), payload.SerializeToString()) == reason, reason


def test_a_birth_without_a_channel_or_with_a_text_channel_is_refused() -> None:
    spb, node = reader(), EdgeNode("plant", "edge1")
    spb.read(*node.nbirth(T0), now=0.0)
    assert reason_of(spb, *node.dbirth("pump1", CHANNELS[:1], T0)) == "bad_samples"
    assert reason_of(spb, *node.dbirth("pump1", CHANNELS, T0, datatype=schema.STRING)) == "bad_samples"


def test_other_nodes_devices_host_state_and_commands_are_control_messages() -> None:
    spb, other = reader(), EdgeNode("plant", "edge9")
    for topic, payload in (
        other.nbirth(T0),
        other.dbirth("pump1", CHANNELS, T0),
        other.ddata("pump1", CHANNELS, rows(2), T0, PERIOD_MS),
        ("spBv1.0/STATE/scada", b'{"online": true}'),
        ("spBv1.0/plant/NCMD/edge1", b"\xff"),
    ):
        outcome = spb.read(topic, payload, 0.0)
        assert outcome.message is None and outcome.ended == []
    assert spb._nodes == {}  # nothing kept for a node that is not mapped


def test_a_mapped_nodes_other_devices_count_in_its_seq() -> None:
    """A message of an unmapped device of a mapped node still carries the node's seq: no gap after it."""
    spb, node = reader(), EdgeNode("plant", "edge1")
    born(spb, node)
    assert spb.read(*node.dbirth("valve9", CHANNELS, T0), now=0.0).message is None
    spb.read(*node.ddata("pump1", CHANNELS, rows(5), T0, PERIOD_MS), now=0.0)
    spb.read(*node.ddata("valve9", CHANNELS, rows(5), T0, PERIOD_MS), now=0.0)
    after = spb.read(*node.ddata("pump1", CHANNELS, rows(5, 5), T0 + 20, PERIOD_MS), now=0.0)
    assert after.message is not None and after.message.seq == 5


def test_the_stage_counts_a_death_and_drops_the_partial_windows() -> None:
    settings_ = InputSettings.model_validate(
        {
            "formats": [{"filter": "spBv1.0/#", "format": "sparkplug_b"}],
            "sparkplug": {
                "devices": [
                    {
                        "group": "plant",
                        "node": "edge1",
                        "device": "pump1",
                        "sensor_id": "pump-1",
                        "channels": list(CHANNELS),
                        "sample_rate_hz": RATE,
                    }
                ]
            },
        }
    )
    registry = CollectorRegistry()
    metrics = Metrics(registry, 4, 1.0)
    decoder = PayloadDecoder(2)
    queue: WindowQueue = WindowQueue(100)
    assembler = WindowAssembler(16, 16, 2, 10, 60.0)
    ingest = Ingest(decoder, assembler, queue, metrics, 1, formats=InputFormats(settings_, decoder))
    node = EdgeNode("plant", "edge1")
    for topic, payload in (node.nbirth(T0), node.dbirth("pump1", CHANNELS, T0)):
        ingest.handle(topic, payload, 0.0)
    ingest.handle(*node.ddata("pump1", CHANNELS, rows(20), T0, PERIOD_MS), now=0.0)
    ingest.handle(*node.ddeath("pump1", T0 + 80), now=0.0)
    ingest.handle("sensors/x/ecg", b'{"samples": [[1, 2]]}', 0.0)  # JSON stays the default
    assert queue.depth() == 1 and ingest.take_ended_streams() == ["pump-1"] and ingest.take_ended_streams() == []
    sample = registry.get_sample_value
    assert sample("monitor_windows_dropped_total", {"reason": "stream_ended"}) == 1
    assert sample("monitor_messages_received_total", {"outcome": "control"}) == 3
    assert sample("monitor_messages_received_total", {"outcome": "accepted"}) == 2
    assert ingest.assembler.active_sensors == 1


def test_fuzz_reader() -> None:
    """An edge node's messages, some dropped, cut, corrupted or sent on another message type's topic: each is read or
    refused with a listed reason, never another exception; accepted samples have the model's shape. The run must
    reach accepted data, streams ended and the Sparkplug refusals."""
    outcomes: Counter[str] = Counter()

    @settings(max_examples=2000, deadline=None, derandomize=True, database=None)
    @given(seed=st.integers(0, 2**32 - 1), steps=st.integers(1, 12))
    def fuzz(seed: int, steps: int) -> None:
        fuzz_node(random.Random(seed), steps, outcomes)

    fuzz()
    for outcome in ("accepted", "ended", "no_birth", "invalid_protobuf", "bad_seq"):
        assert outcomes[outcome] > 0, (outcome, outcomes)


def fuzz_node(rng: random.Random, steps: int, outcomes: Counter[str]) -> None:
    spb, node = reader(rebirth=True), EdgeNode("plant", "edge1")
    spb.publish = lambda topic, payload: None
    t = float(T0)
    for _ in range(steps):
        choice = rng.randrange(6)
        if choice == 0:
            topic, payload = node.nbirth(int(t))
        elif choice == 1:
            topic, payload = node.dbirth(rng.choice(("pump1", "pump2")), CHANNELS, int(t))
        elif choice == 2:
            topic, payload = node.ddeath(rng.choice(("pump1", "pump2")), int(t))
        else:
            n = rng.randint(1, 40)
            topic, payload = node.ddata("pump1", CHANNELS, rows(n) * rng.uniform(-1e3, 1e3), t, PERIOD_MS)
            t += n * PERIOD_MS
        data = bytearray(payload)
        if data and rng.random() < 0.3:
            data[rng.randrange(len(data))] = rng.randrange(256)
        if data and rng.random() < 0.1:
            del data[rng.randrange(len(data)) :]
        if rng.random() < 0.1:
            topic = topic.replace(rng.choice(("DDATA", "DBIRTH", "NBIRTH")), rng.choice(("DDEATH", "NDEATH", "DDATA")))
        try:
            outcome = spb.read(topic, bytes(data), 0.0)
        except PayloadError as error:
            assert error.reason in REJECT_REASONS
            outcomes[error.reason] += 1
            continue
        outcomes["ended"] += bool(outcome.ended)
        if outcome.message is not None:
            outcomes["accepted"] += 1
            assert outcome.message.samples.shape[1] == 2 and np.isfinite(outcome.message.samples).all()
            assert outcome.message.seq is not None and outcome.message.seq >= 0
