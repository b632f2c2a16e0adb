"""Property-based fuzzing of PayloadDecoder.decode + WindowAssembler.feed (and sensor_id_from_topic).

Each hypothesis example draws a decoder/assembler configuration, a few JSON junk trees and a batch of
PAYLOADS_PER_EXAMPLE payload recipes (a kind and a seed). A recipe becomes payload bytes through a
`random.Random(seed)`: drawing every number of every payload through hypothesis would take minutes. Each
payload goes through decode -> sensor id -> feed, and every result is checked against a small independent
model of the stream.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter, OrderedDict
from dataclasses import dataclass

import numpy as np
import orjson
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from monitor.errors import PayloadError
from monitor.ingest.frame import FRAME_ONLY_REASONS
from monitor.ingest.payload import (
    MAX_SENSOR_ID_CHARS,
    MAX_SEQ,
    REJECT_REASONS,
    Message,
    PayloadDecoder,
    sensor_id_from_topic,
)
from monitor.ingest.sparkplug import SPARKPLUG_ONLY_REASONS
from monitor.ingest.windowing import SENSOR_LIMIT_REASON, FeedResult, WindowAssembler
from monitor.window import Window

PAYLOADS_PER_EXAMPLE = 100
EXAMPLES = 1050
MIN_PAYLOADS = 100_000
IDLE_SECONDS = 5.0
CLOCK_STEPS_SECONDS = (0.0, 0.01, 0.01, 0.5, 2.0, 6.0)  # 6 s > IDLE_SECONDS: sensors do get evicted
SENSOR_TOPICS = ("sensors/a/ecg", "sensors/b/ecg", "sensors/c/ecg", "sensors/d/ecg")
ODD_TOPICS = ("sensors/+/ecg", "sensors//ecg", "sensors/\x01/ecg", "sensors/#", "x", "sensors/" + "x" * 129 + "/ecg")

# Values that stress the number checks: float32 overflow, denormals, huge and negative integers.
EDGE_VALUES = (
    0,
    -0.0,
    1e-45,
    3.4028234663852886e38,
    3.5e38,
    -1e39,
    1e308,
    2**53,
    2**63 - 1,
    -(2**63),
    2**64 - 1,
    2**70,
)
JUNK_VALUES = (None, True, False, "1.5", "", [], {}, [1, [2]], {"samples": [1]}, float("nan"), float("inf"))
SEQ_EDGES = (-1, 0, MAX_SEQ - 1, MAX_SEQ, 2**63, -(2**63), 2**64, 1.0, 7.5, "12", True, None, [3])
TS_EDGES = (0, 0.0, -1e-9, 1.7e9, 1e308, 2**64, "1700000000", True, None, float("inf"), float("nan"), {})
# Half the payloads are valid stream messages, so the windowing sees long streams with gaps and repeats.
KINDS = ("stream",) * 8 + ("bytes", "json", "mutated", "oversize", "too_many", "values", "rows", "fields")


@dataclass(frozen=True)
class Config:
    window: int
    stride: int
    channels: int
    max_samples: int
    max_bytes: int
    max_sensors: int
    seq_tolerance: int


configs = st.builds(
    Config,
    window=st.sampled_from([1, 2, 3, 5, 8, 13]),
    stride=st.sampled_from([1, 2, 3, 5, 8, 13, 21]),
    channels=st.sampled_from([1, 1, 2, 3]),
    max_samples=st.sampled_from([64, 512, 4096]),
    max_bytes=st.sampled_from([4096, 65536, 262144]),
    max_sensors=st.sampled_from([1, 2, 3, 8]),
    seq_tolerance=st.sampled_from([3, 20, 1024]),
)

JUNK_KEYS = ("samples", "seq", "ts", "x")
json_junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(JUNK_KEYS), children, max_size=3),
    max_leaves=12,
)

recipes = st.tuples(st.integers(0, len(KINDS) - 1), st.integers(0, 2**32 - 1))  # (kind, seed)
batches = st.lists(recipes, min_size=PAYLOADS_PER_EXAMPLE, max_size=PAYLOADS_PER_EXAMPLE)
# A JSON tree per payload would triple the run time; a few per batch, picked by seed, are enough.
junk_lists = st.lists(json_junk, min_size=1, max_size=4)


class StreamModel:
    """Independent model of one sensor's stream (docs/interface.md), kept short rather than fast."""

    def __init__(self, first_seq: int, config: Config, now: float) -> None:
        self.config = config
        self.first_k = self.restart_k = -(-first_seq // config.stride)
        self.end = first_seq  # next expected absolute index
        self.base = first_seq  # absolute index of kept[0]
        self.kept = np.empty((0, config.channels), dtype=np.float32)
        self.emitted = 0
        self.dropped = 0
        self.skipped = 0  # windows lying wholly inside a gap: none of their samples arrived, so none is counted
        self.last_start = -1
        self.last_seen = now

        self.aside: StreamModel | None = None  # the stream before a seq jump, until the next message decides

    def started(self) -> int:
        """Windows not yet emitted that hold samples which arrived (dropped if this stream is abandoned)."""
        next_k = max(self.restart_k, (self.end - self.config.window) // self.config.stride + 1)
        return max(0, -(-self.end // self.config.stride) - next_k)

    def check(self, message: Message, result: FeedResult, now: float) -> StreamModel:
        """Checks one feed; returns the model of the sensor's stream from now on (another one after a seq jump)."""
        config = self.config
        seq = self.end if message.seq is None else message.seq
        tolerance = config.seq_tolerance
        continues_aside = self.aside is not None and abs(seq - self.aside.end) <= tolerance
        # Far behind but not near 0 is a resend (a duplicate), unless it continues the stream kept aside.
        if abs(seq - self.end) > tolerance and (continues_aside or not tolerance < seq < self.end):
            aside = self.aside
            if aside is not None and abs(seq - aside.end) <= tolerance:  # back to the stream kept aside
                assert (result.restarted, result.restart_windows_dropped) == (False, self.started())
                aside.last_seen = now
                return aside.follow(message, result, now)
            assert (result.restarted, result.restart_windows_dropped) == (True, self.started() if aside else 0)
            new = StreamModel(seq, config, now)
            new.aside = aside or self
            return new.follow(message, result, now)
        assert not result.restarted
        assert result.restart_windows_dropped == (self.aside.started() if self.aside else 0)
        self.aside = None
        return self.follow(message, result, now)

    def follow(self, message: Message, result: FeedResult, now: float) -> StreamModel:
        """The message continues this stream (duplicate, overlap, gap or next samples)."""
        config, n = self.config, len(message.samples)
        seq = self.end if message.seq is None else message.seq
        stride, next_k = config.stride, max(self.restart_k, (self.end - config.window) // config.stride + 1)
        if seq + n <= self.end:
            assert (result.duplicate, result.duplicate_samples, result.gaps, result.gap_windows_dropped) == (
                True,
                n,
                0,
                0,
            )
            assert result.windows == []
            return self
        assert not result.duplicate
        if seq > self.end:
            assert result.gaps == 1
            self.skipped += max(0, (seq - config.window) // stride + 1 - max(next_k, -(-self.end // stride)))
            self.restart_k = -(-seq // config.stride)
            self.kept = self.kept[:0]
            self.base = self.end = seq
        else:
            assert (result.gaps, result.gap_windows_dropped) == (0, 0)
        trim = self.end - seq
        assert result.duplicate_samples == trim
        self.kept = np.concatenate((self.kept, message.samples[trim:]))
        self.end = seq + n
        self.emitted += len(result.windows)
        self.dropped += result.gap_windows_dropped
        # Every window from the first aligned one up to the next incomplete one was emitted or dropped, once.
        next_k = max(self.restart_k, (self.end - config.window) // config.stride + 1)
        assert self.emitted + self.dropped + self.skipped == next_k - self.first_k
        for window in result.windows:
            check_window(window, config, now)
            assert window.start_seq > self.last_start
            self.last_start = window.start_seq
            offset = window.start_seq - self.base
            assert offset >= 0
            np.testing.assert_array_equal(window.samples, self.kept[offset : offset + config.window])
        cut = min(next_k * config.stride, self.end) - self.base
        self.kept = self.kept[cut:]
        self.base += cut
        return self


def check_window(window: Window, config: Config, now: float) -> None:
    assert window.samples.shape == (config.window, config.channels)
    assert window.samples.dtype == np.float32
    assert np.isfinite(window.samples).all()
    assert window.start_seq % config.stride == 0
    assert window.completed_at == now
    assert window.start_ts is None or (type(window.start_ts) is float and math.isfinite(window.start_ts))


def check_message(message: Message, config: Config) -> None:
    samples = message.samples
    assert isinstance(samples, np.ndarray) and samples.dtype == np.float32 and samples.ndim == 2
    assert samples.shape[1] == config.channels and 1 <= samples.shape[0] <= config.max_samples
    assert np.isfinite(samples).all()
    assert message.seq is None or (type(message.seq) is int and 0 <= message.seq < MAX_SEQ)
    assert message.ts is None or (type(message.ts) is float and math.isfinite(message.ts) and message.ts >= 0)


def sample_rows(rng: random.Random, n: int, channels: int, flat: bool) -> list:
    """n plausible sample rows: a flat list for one channel when flat, else lists of `channels` numbers."""
    if flat and channels == 1:
        return [rng.random() - 0.5 for _ in range(n)]
    return [
        [rng.random() - 0.5 if rng.random() < 0.9 else rng.randint(-5, 5) for _ in range(channels)] for _ in range(n)
    ]


def dump(document: object) -> bytes:
    """orjson when it can; json for integers beyond 64 bits, which orjson refuses to write."""
    try:
        return orjson.dumps(document)
    except TypeError:
        return json.dumps(document).encode()


def build_payload(kind: str, rng: random.Random, junk: object, config: Config, expected_seq: int) -> bytes:
    """Payload bytes of one kind; expected_seq (the model's next index for the topic) makes seq plausible."""
    channels = config.channels
    flat = rng.random() < 0.5
    choice = rng.random()
    if choice < 0.25:
        seq = None
    elif choice < 0.95:
        # Mostly continue the stream; sometimes overlap or repeat it, sometimes leave a gap.
        seq = max(0, expected_seq + rng.choice((0, 0, 0, 0, -rng.randint(1, 40), rng.randint(1, 40))))
    else:
        seq = rng.choice(SEQ_EDGES)
    n = rng.randint(1, 40) if rng.random() < 0.9 else rng.randint(1, min(config.max_samples, 300))
    document: dict = {"samples": sample_rows(rng, n, channels, flat)}
    if seq is not None:
        document["seq"] = seq
    if rng.random() < 0.5:
        document["ts"] = 1.7e9 + (seq if type(seq) is int and 0 <= seq < MAX_SEQ else 0) * 0.004
    if kind == "stream":
        return dump(document)
    if kind == "bytes":
        return rng.randbytes(rng.randint(0, 48))
    if kind == "json":
        # json.dumps writes NaN/Infinity and ints beyond 64 bits, which orjson must refuse or handle.
        return json.dumps(junk if rng.random() < 0.5 else {"samples": junk, "seq": seq}).encode()
    if kind == "mutated":
        raw = bytearray(dump(document))
        for _ in range(rng.randint(1, 3)):
            position = rng.randrange(len(raw))
            operation = rng.randrange(4)
            if operation == 0:
                raw[position] = rng.randrange(256)
            elif operation == 1:
                del raw[position:]
            elif operation == 2:
                raw.insert(position, rng.choice(b'\xff\xc3\x80[]{},:"-.e0'))
            else:
                raw[position:position] = rng.choice([b"true", b"null", b'"x"', b"1e39", b"[[", b"]]", b"\xed\xa0\x80"])
            if not raw:
                break
        return bytes(raw)
    if kind == "oversize":
        # Beyond max_bytes, sometimes valid JSON and sometimes junk, exactly at or just past the limit.
        body = dump(document)
        filler = b" " if rng.random() < 0.5 else b"\xff"
        return body + filler * max(0, config.max_bytes + rng.choice([0, 1, 2, 1000]) - len(body))
    if kind == "too_many":
        # Exactly max_samples is still valid; repeated rows keep building a 4096-sample list cheap.
        extra = 0 if rng.random() < 0.1 else rng.choice([1, 5, 1000])
        document["samples"] = sample_rows(rng, 1, channels, flat) * (config.max_samples + extra)
        return dump(document)
    if kind == "values":
        samples = document["samples"]
        row = rng.randrange(len(samples))
        bad = rng.choice(EDGE_VALUES + JUNK_VALUES)
        if isinstance(samples[row], list):
            samples[row][rng.randrange(channels)] = bad
        else:
            samples[row] = bad
        return json.dumps(document).encode()
    if kind == "rows":
        # Every row of another width (wrong_channels), or one odd row (ragged: bad_samples).
        samples = document["samples"]
        width = max(0, channels + rng.choice([-1, 1, 2]))
        rows = range(len(samples)) if rng.random() < 0.5 else [rng.randrange(len(samples))]
        nested = rng.random() < 0.1
        for row in rows:
            samples[row] = [[1.0] * channels] if nested else [rng.random() for _ in range(width)]
        return dump(document)
    # "fields": bad seq/ts types and values, missing or renamed keys, non-object documents.
    choice = rng.randrange(5)
    if choice == 0:
        document["ts"] = rng.choice(TS_EDGES)
    elif choice == 1:
        document["seq"] = rng.choice(SEQ_EDGES)
    elif choice == 2:
        document["sample"] = document.pop("samples")
    elif choice == 3:
        document["samples"] = rng.choice(JUNK_VALUES)
    else:
        return json.dumps([document]).encode()
    return json.dumps(document).encode()


def run_batch(config: Config, batch: list[tuple[int, int]], junk: list[object], outcomes: Counter[str]) -> None:
    """Decodes and feeds one batch, counting payloads and what became of them in outcomes."""
    decoder = PayloadDecoder(config.channels, max_samples=config.max_samples, max_bytes=config.max_bytes)
    target = WindowAssembler(
        config.window,
        config.stride,
        config.channels,
        config.max_sensors,
        IDLE_SECONDS,
        seq_tolerance=config.seq_tolerance,
    )
    models: OrderedDict[str, StreamModel] = OrderedDict()  # least recently seen first, like the assembler
    now = 0.0
    for kind, seed in batch:
        rng = random.Random(seed)
        now += rng.choice(CLOCK_STEPS_SECONDS)
        topic = rng.choice(SENSOR_TOPICS) if rng.random() < 0.9 else rng.choice(ODD_TOPICS)
        model = models.get(topic.split("/")[1]) if "/" in topic else None
        payload = build_payload(KINDS[kind], rng, junk[seed % len(junk)], config, 0 if model is None else model.end)
        outcomes["payloads"] += 1
        try:
            message = decoder.decode(payload)
        except PayloadError as error:
            assert error.reason in REJECT_REASONS
            assert error.reason != "bad_topic"
            if len(payload) > config.max_bytes:
                assert error.reason == "too_large"
            outcomes[error.reason] += 1
            continue
        outcomes["accepted"] += 1
        assert len(payload) <= config.max_bytes
        check_message(message, config)
        try:
            sensor_id = sensor_id_from_topic(topic, 1)
        except PayloadError as error:
            assert error.reason == "bad_topic"
            outcomes[error.reason] += 1
            continue
        result = feed_and_check(target, models, sensor_id, message, now, config)
        if result is None:
            outcomes[SENSOR_LIMIT_REASON] += 1
        else:
            outcomes["windows"] += len(result.windows)
            outcomes["windows_with_start_ts"] += sum(window.start_ts is not None for window in result.windows)
            outcomes["gaps"] += result.gaps
            outcomes["gap_windows_dropped"] += result.gap_windows_dropped
            outcomes["duplicates"] += result.duplicate
            outcomes["restarts"] += result.restarted
            outcomes["restart_windows_dropped"] += result.restart_windows_dropped
            outcomes["trimmed"] += result.duplicate_samples > 0 and not result.duplicate
        if seed % 16 == 0:  # now and then the daemon's periodic sweep
            expected_evictions = evict(models, now)
            assert target.evict_idle(now) == expected_evictions
            outcomes["evicted"] += expected_evictions
        assert target.active_sensors == len(models)
        assert target.buffered_samples() <= target.active_sensors * 2 * (config.window - 1)  # 2: a stream kept aside


def evict(models: OrderedDict[str, StreamModel], now: float) -> int:
    idle = [sensor for sensor, model in models.items() if now - model.last_seen >= IDLE_SECONDS]
    for sensor in idle:
        del models[sensor]
    return len(idle)


def feed_and_check(
    target: WindowAssembler,
    models: OrderedDict[str, StreamModel],
    sensor_id: str,
    message: Message,
    now: float,
    config: Config,
) -> FeedResult | None:
    """Feeds and checks the result against the model; None when the assembler refused a sensor beyond max_sensors."""
    model = models.get(sensor_id)
    if model is None and len(models) >= config.max_sensors:
        evict(models, now)
        if len(models) >= config.max_sensors:
            try:
                target.feed(sensor_id, message, now)
            except PayloadError as error:
                assert error.reason == SENSOR_LIMIT_REASON
            else:
                raise AssertionError("a new sensor beyond max_sensors was accepted")
            return None
    result = target.feed(sensor_id, message, now)
    if model is None:
        model = models[sensor_id] = StreamModel(0 if message.seq is None else message.seq, config, now)
    model.last_seen = now
    models.move_to_end(sensor_id)
    models[sensor_id] = model.check(message, result, now)
    return result


def test_fuzz_decode_and_feed() -> None:
    outcomes: Counter[str] = Counter()

    # No shrink phase: shrinking 100-payload batches takes minutes; derandomize=True already replays a failure.
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(config=configs, batch=batches, junk=junk_lists)
    def fuzz(config: Config, batch: list[tuple[int, int]], junk: list[object]) -> None:
        run_batch(config, batch, junk, outcomes)

    fuzz()
    assert outcomes["payloads"] >= MIN_PAYLOADS
    # The generator really reaches every reject reason and every windowing path.
    json_reasons = set(REJECT_REASONS) - {*FRAME_ONLY_REASONS, *SPARKPLUG_ONLY_REASONS}
    assert json_reasons <= set(outcomes), json_reasons - set(outcomes)
    paths = ("windows", "windows_with_start_ts", "gaps", "gap_windows_dropped", "duplicates", "trimmed", "restarts")
    for outcome in ("accepted", *paths, "restart_windows_dropped"):
        assert outcomes[outcome] > 0, outcome
    assert outcomes["evicted"] > 0 and outcomes[SENSOR_LIMIT_REASON] > 0


@settings(max_examples=3000, deadline=None, derandomize=True, database=None)
@given(
    topic=st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from("/+#\x00 "), max_size=300),
    level=st.integers(-2, 6),
)
def test_fuzz_sensor_id_from_topic(topic: str, level: int) -> None:
    try:
        sensor_id = sensor_id_from_topic(topic, level)
    except PayloadError as error:
        assert error.reason == "bad_topic"
        return
    assert sensor_id == topic.split("/")[level] and level >= 0
    assert 1 <= len(sensor_id) <= MAX_SENSOR_ID_CHARS and sensor_id.isprintable()
    assert "+" not in sensor_id and "#" not in sensor_id and "/" not in sensor_id
