"""PayloadDecoder and sensor_id_from_topic: every accept path and every reject reason."""

from __future__ import annotations

import inspect
import json
import re
import timeit

import numpy as np
import orjson
import pytest

import monitor.ingest.payload as payload_module
from monitor.config.schema import MqttSettings
from monitor.errors import PayloadError
from monitor.ingest import frame, sparkplug
from monitor.ingest.payload import (
    MAX_SENSOR_ID_CHARS,
    MAX_SEQ,
    REJECT_REASONS,
    Message,
    PayloadDecoder,
    sensor_id_from_topic,
)


def reason_of(decoder: PayloadDecoder, payload: bytes) -> str:
    with pytest.raises(PayloadError) as info:
        decoder.decode(payload)
    return info.value.reason


def dumps(document: object) -> bytes:
    return orjson.dumps(document)


def test_reject_reasons_are_exactly_the_reasons_the_module_raises() -> None:
    """The closed set is a metric's label values: a reason raised by a decoder (JSON, binary frame, Sparkplug B) but
    not listed, or listed but never raised, fails."""
    source = "".join(inspect.getsource(module) for module in (payload_module, frame, sparkplug))
    raised = set(re.findall(r'PayloadError\("(\w+)"', source))
    assert raised == set(REJECT_REASONS)
    assert len(REJECT_REASONS) == len(raised)  # no reason listed twice


def test_flat_single_channel_with_seq_and_ts() -> None:
    message = PayloadDecoder(1).decode(b'{"samples": [0.5, -1, 2e3], "seq": 42, "ts": 1700000000.25}')
    assert isinstance(message, Message)
    assert message.samples.dtype == np.float32
    assert message.samples.shape == (3, 1)
    np.testing.assert_array_equal(message.samples[:, 0], np.array([0.5, -1.0, 2000.0], dtype=np.float32))
    assert message.seq == 42
    assert message.ts == 1700000000.25
    assert type(message.ts) is float


def test_seq_and_ts_are_optional_and_null_means_absent() -> None:
    decoder = PayloadDecoder(1)
    assert (decoder.decode(b'{"samples": [1]}').seq, decoder.decode(b'{"samples": [1]}').ts) == (None, None)
    message = decoder.decode(b'{"samples": [1], "seq": null, "ts": null}')
    assert (message.seq, message.ts) == (None, None)


def test_integer_ts_becomes_float() -> None:
    message = PayloadDecoder(1).decode(b'{"samples": [1], "ts": 1700000000}')
    assert message.ts == 1700000000.0 and type(message.ts) is float


def test_single_channel_accepts_one_element_rows() -> None:
    message = PayloadDecoder(1).decode(b'{"samples": [[1.5], [2.5]]}')
    np.testing.assert_array_equal(message.samples, np.array([[1.5], [2.5]], dtype=np.float32))


def test_multi_channel_rows() -> None:
    message = PayloadDecoder(3).decode(b'{"samples": [[1, 2, 3], [4.5, 5, 6]], "seq": 0}')
    assert message.samples.shape == (2, 3)
    np.testing.assert_array_equal(message.samples, np.array([[1, 2, 3], [4.5, 5, 6]], dtype=np.float32))
    assert message.samples.flags.c_contiguous


def test_samples_are_read_only() -> None:
    message = PayloadDecoder(1).decode(b'{"samples": [1, 2]}')
    with pytest.raises(ValueError):
        message.samples[0, 0] = 3.0


def test_extra_keys_are_ignored_even_booleans() -> None:
    message = PayloadDecoder(1).decode(b'{"samples": [1, 2], "calibrated": true, "lead": "II", "meta": {"x": false}}')
    assert message.samples.shape == (2, 1)


def test_bytearray_and_memoryview_payloads() -> None:
    decoder = PayloadDecoder(1)
    payload = b'{"samples": [1, 2], "seq": 3}'
    assert decoder.decode(bytearray(payload)).seq == 3
    assert decoder.decode(memoryview(payload)).seq == 3
    assert reason_of(decoder, memoryview(b'{"samples": [1, true]}')) == "bad_samples"


def test_too_large_is_checked_before_decoding() -> None:
    decoder = PayloadDecoder(1, max_bytes=32)
    fits = b'{"samples": [1]}'.ljust(32)  # trailing whitespace is valid JSON
    assert decoder.decode(fits).samples.shape == (1, 1)
    assert reason_of(decoder, fits + b" ") == "too_large"
    # Invalid UTF-8 that is too large reports too_large: nothing was decoded.
    assert reason_of(decoder, b"\xff" * 33) == "too_large"


def test_default_max_bytes_is_256_kib() -> None:
    decoder = PayloadDecoder(1)
    padding = b" " * (262144 - len(b'{"samples": [1]}'))
    assert decoder.decode(b'{"samples": [1]}' + padding).samples.shape == (1, 1)
    assert reason_of(decoder, b'{"samples": [1]}' + padding + b" ") == "too_large"


@pytest.mark.parametrize(
    "payload", [b"\xff", b'{"samples": [1], "x": "\xc3"}', b'{"samples": [1]}\xed\xa0\x80', b"\x80abc"]
)
def test_invalid_utf8(payload: bytes) -> None:
    assert reason_of(PayloadDecoder(1), payload) == "invalid_utf8"


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"{",
        b'{"samples": [1,]}',
        b'{"samples": [NaN]}',
        b'{"samples": [Infinity]}',
        b'{"samples": [1e400]}',  # orjson refuses numbers that overflow a double
        b'{"samples": [-1e400]}',
        b"\xef\xbb\xbf{}",  # byte order mark
        b'{"samples": [1]} {}',
        b'{"a": "\\ud800"}',  # lone surrogate escape: valid UTF-8 bytes, invalid JSON string
        b"[" * 2000 + b"]" * 2000,  # beyond orjson's depth limit
    ],
)
def test_invalid_json(payload: bytes) -> None:
    assert reason_of(PayloadDecoder(1), payload) == "invalid_json"


@pytest.mark.parametrize("payload", [b"[1, 2]", b"1", b'"samples"', b"null", b"true"])
def test_not_object(payload: bytes) -> None:
    assert reason_of(PayloadDecoder(1), payload) == "not_object"


@pytest.mark.parametrize("payload", [b"{}", b'{"sample": [1]}', b'{"seq": 1, "ts": 2}'])
def test_missing_samples(payload: bytes) -> None:
    assert reason_of(PayloadDecoder(1), payload) == "missing_samples"


@pytest.mark.parametrize(
    "samples",
    [
        None,
        1.5,
        "1,2,3",
        {"0": 1},
        [],
        ["1.5"],  # numpy would happily convert this string
        [1, "2"],
        [1, None],
        [True],
        [1.0, True],  # numpy would silently turn True into 1.0
        [[1], [False]],
        [{"v": 1}],
        [[1], 2],  # ragged
        [[[1]]],  # too deep
        [[1, [2]]],
    ],
)
def test_bad_samples(samples: object) -> None:
    assert reason_of(PayloadDecoder(1), dumps({"samples": samples})) == "bad_samples"


def test_ragged_multi_channel_rows_are_bad_samples() -> None:
    assert reason_of(PayloadDecoder(2), dumps({"samples": [[1, 2], [3]]})) == "bad_samples"


@pytest.mark.parametrize(
    ("channels", "samples"),
    [
        (2, [1, 2, 3]),  # flat list is only for one channel
        (2, [[1, 2, 3]]),
        (3, [[1, 2], [3, 4]]),
        (1, [[1, 2]]),
        (1, [[]]),
        (2, [[], []]),
    ],
)
def test_wrong_channels(channels: int, samples: list) -> None:
    assert reason_of(PayloadDecoder(channels), dumps({"samples": samples})) == "wrong_channels"


@pytest.mark.parametrize("value", [3.5e38, -3.5e38, 1e39, 1.7e308])
def test_numbers_that_overflow_float32_are_non_finite(value: float) -> None:
    assert reason_of(PayloadDecoder(1), dumps({"samples": [1.0, value]})) == "non_finite"


def test_largest_float32_is_accepted() -> None:
    largest = float(np.finfo(np.float32).max)
    message = PayloadDecoder(2, max_abs_value=float("inf")).decode(dumps({"samples": [[largest, -largest]]}))
    assert np.isfinite(message.samples).all()


def test_huge_json_integers_are_finite_samples() -> None:
    # orjson parses integers beyond 64 bits as floats; they still fit in float32 (without a magnitude bound).
    decoder = PayloadDecoder(1, max_abs_value=float("inf"))
    message = decoder.decode(b'{"samples": [18446744073709551615, -9223372036854775808, 18446744073709551616]}')
    assert np.isfinite(message.samples).all()
    assert message.samples[0, 0] == np.float32(2.0**64)


def test_too_many_samples() -> None:
    decoder = PayloadDecoder(1, max_samples=4)
    assert decoder.decode(dumps({"samples": [1, 2, 3, 4]})).samples.shape == (4, 1)
    assert reason_of(decoder, dumps({"samples": [1, 2, 3, 4, 5]})) == "too_many_samples"


def test_default_max_samples_is_4096() -> None:
    decoder = PayloadDecoder(1)
    assert decoder.decode(dumps({"samples": [0.5] * 4096})).samples.shape == (4096, 1)
    assert reason_of(decoder, dumps({"samples": [0.5] * 4097})) == "too_many_samples"


@pytest.mark.parametrize("seq", [-1, MAX_SEQ, 2**63, 1.0, 2.5, "3", True, False, [1], {"a": 1}])
def test_bad_seq(seq: object) -> None:
    assert reason_of(PayloadDecoder(1), dumps({"samples": [1], "seq": seq})) == "bad_seq"


def test_seq_bounds_accepted() -> None:
    decoder = PayloadDecoder(1)
    assert decoder.decode(dumps({"samples": [1], "seq": 0})).seq == 0
    assert decoder.decode(dumps({"samples": [1], "seq": MAX_SEQ - 1})).seq == MAX_SEQ - 1


@pytest.mark.parametrize(
    ("ts", "reason"),
    [
        (-0.001, "out_of_range"),
        (-1, "out_of_range"),
        (0, "out_of_range"),
        (1.8e12, "out_of_range"),  # milliseconds
        (2**70, "out_of_range"),
        (1e308, "out_of_range"),
        ("1700000000", "not_a_number"),
        ("NaN", "not_a_number"),
        (True, "not_a_number"),
        ([1.0], "not_a_number"),
        ({"s": 1}, "not_a_number"),
    ],
)
def test_an_implausible_ts_is_ignored_and_the_samples_kept(ts: object, reason: str) -> None:
    payload = b'{"samples": [1, 2], "seq": 7, "ts": %s}' % json.dumps(ts).encode()  # 2**70: beyond orjson.dumps
    message = PayloadDecoder(1).decode(payload)
    assert (message.ts, message.ts_ignored, message.seq, message.samples.tolist()) == (None, reason, 7, [[1], [2]])
    plausible = PayloadDecoder(1).decode(dumps({"samples": [1], "ts": 1.7e9}))
    assert (plausible.ts, plausible.ts_ignored) == (1.7e9, None)


def test_check_order_samples_before_seq_before_ts() -> None:
    decoder = PayloadDecoder(1)
    assert reason_of(decoder, dumps({"samples": ["x"], "seq": -1, "ts": -1})) == "bad_samples"
    assert reason_of(decoder, dumps({"samples": [1], "seq": -1, "ts": -1})) == "bad_seq"


def test_every_payload_reason_is_reachable() -> None:
    decoder = PayloadDecoder(2, max_samples=2, max_bytes=64)
    payloads = {
        "too_large": b" " * 65,
        "invalid_utf8": b"\xfe",
        "invalid_json": b"{]",
        "not_object": b"[]",
        "missing_samples": b"{}",
        "bad_samples": b'{"samples": []}',
        "wrong_channels": b'{"samples": [[1]]}',
        "non_finite": b'{"samples": [[1, 1e39]]}',
        "value_out_of_range": b'{"samples": [[1, 1e38]]}',
        "too_many_samples": b'{"samples": [[1, 2], [1, 2], [1, 2]]}',
        "bad_seq": b'{"samples": [[1, 2]], "seq": -5}',
    }
    assert {reason: reason_of(decoder, payload) for reason, payload in payloads.items()} == {r: r for r in payloads}
    other_formats = {*frame.FRAME_ONLY_REASONS, *sparkplug.SPARKPLUG_ONLY_REASONS}
    assert set(payloads) | {"bad_topic"} | other_formats == set(REJECT_REASONS)


@pytest.mark.parametrize("value", [1e38, -3.4e38, 1000.5, 2**63, -(2**62)])
def test_extreme_finite_samples_are_out_of_range(value: float) -> None:
    decoder = PayloadDecoder(1, max_abs_value=1000.0)
    assert reason_of(decoder, dumps({"samples": [0.5, value, 1]})) == "value_out_of_range"
    assert decoder.decode(dumps({"samples": [1000.0, -1000]})).samples.tolist() == [[1000.0], [-1000.0]]


def test_decoder_rejects_bad_limits() -> None:
    with pytest.raises(ValueError):
        PayloadDecoder(0)
    with pytest.raises(ValueError):
        PayloadDecoder(1, max_samples=0)


def test_decode_140_samples_is_fast() -> None:
    # Best of several repeats, so a busy shared machine does not make this flaky; the budget is 50 µs.
    samples = np.random.default_rng(0).normal(size=140).tolist()
    payload = dumps({"samples": samples, "seq": 1_000_000, "ts": 1700000000.5})
    decoder = PayloadDecoder(1)
    seconds_per_decode = min(timeit.repeat(lambda: decoder.decode(payload), number=500, repeat=7)) / 500
    assert seconds_per_decode < 50e-6


@pytest.mark.parametrize(
    ("topic", "level", "sensor_id"),
    [
        ("sensors/ecg-17/ecg", 1, "ecg-17"),
        ("sensors/patient 3/ecg", 1, "patient 3"),
        ("a/b/c/d", 3, "d"),
        ("sensors/капибара/ecg", 1, "капибара"),
        ("sensors/" + "x" * MAX_SENSOR_ID_CHARS + "/ecg", 1, "x" * MAX_SENSOR_ID_CHARS),
    ],
)
def test_sensor_id_from_topic(topic: str, level: int, sensor_id: str) -> None:
    assert sensor_id_from_topic(topic, level) == sensor_id


@pytest.mark.parametrize(
    ("topic", "level"),
    [
        ("sensors/a/ecg", 3),
        ("sensors/a/ecg", -1),
        ("sensors//ecg", 1),
        ("", 0),
        ("sensors/+/ecg", 1),
        ("sensors/a#/ecg", 1),
        ("sensors/a\x00b/ecg", 1),
        ("sensors/a\nb/ecg", 1),
        ("sensors/\u200bzero-width/ecg", 1),
        ("sensors/" + "x" * (MAX_SENSOR_ID_CHARS + 1) + "/ecg", 1),
    ],
)
def test_bad_topic(topic: str, level: int) -> None:
    with pytest.raises(PayloadError) as info:
        sensor_id_from_topic(topic, level)
    assert info.value.reason == "bad_topic"


@pytest.mark.parametrize(
    ("sensor_id", "accepted"),
    [
        ("ecg-17", True),
        ("ward3.bed_12:lead-II", True),
        ("x" * 128, True),
        ("ecg-1\u0437", False),  # Cyrillic ze, looks like a 3
        ("\u0435cg-17", False),  # Cyrillic ie for the e
        ("\uff45cg-17", False),  # full-width e
        ("ecg\u0301-17", False),  # combining acute accent
        ("patient 3", False),
    ],
)
def test_default_sensor_id_pattern_refuses_look_alikes(sensor_id: str, accepted: bool) -> None:
    pattern = re.compile(MqttSettings().sensor_id_pattern)
    if accepted:
        assert sensor_id_from_topic(f"sensors/{sensor_id}/ecg", 1, pattern) == sensor_id
    else:
        with pytest.raises(PayloadError, match="bad_topic"):
            sensor_id_from_topic(f"sensors/{sensor_id}/ecg", 1, pattern)
