"""FrameDecoder: the binary frame's layout, every accept path and reject reason, and a fuzz of arbitrary bytes."""

from __future__ import annotations

import math
import random
import struct

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.errors import PayloadError
from monitor.ingest.frame import FLOAT32, FRAME_ONLY_REASONS, HEADER, INT16, FrameDecoder, encode_frame
from monitor.ingest.payload import MAX_SEQ, REJECT_REASONS, PayloadDecoder


def reason_of(decoder: FrameDecoder, payload: bytes) -> str:
    with pytest.raises(PayloadError) as info:
        decoder.decode(payload)
    assert info.value.reason in REJECT_REASONS
    return info.value.reason


def test_layout_byte_for_byte() -> None:
    """The documented example: 2 samples x 1 channel, int16 with scale 0.005, seq 7, ts 1700000000.5."""
    frame = encode_frame(np.array([[1.0], [-0.5]]), seq=7, ts=1700000000.5, sample_type=INT16, scale=0.005)
    expected = (
        b"MF\x01\x01"  # magic, version 1, int16
        + b"\x01\x00\x02\x00"  # 1 channel, 2 samples
        + struct.pack("<Q", 7)
        + struct.pack("<d", 1700000000.5)
        + struct.pack("<f", 0.005)
        + struct.pack("<hh", 200, -100)
    )
    assert frame == expected and HEADER.size == 28
    message = FrameDecoder(1).decode(frame)
    assert (message.seq, message.ts) == (7, 1700000000.5)
    np.testing.assert_allclose(message.samples[:, 0], [1.0, -0.5], rtol=1e-6)


def test_float32_frame_gives_the_json_message() -> None:
    rows = np.random.default_rng(0).normal(size=(140, 2)).astype(np.float32)
    from_frame = FrameDecoder(2).decode(encode_frame(rows, seq=1000, ts=1.5))
    from_json = PayloadDecoder(2).decode(orjson.dumps({"samples": rows.tolist(), "seq": 1000, "ts": 1.5}))
    np.testing.assert_array_equal(from_frame.samples, from_json.samples)
    assert (from_frame.seq, from_frame.ts) == (from_json.seq, from_json.ts)
    assert from_frame.samples.dtype == np.float32 and not from_frame.samples.flags.writeable


def test_seq_and_ts_may_be_absent() -> None:
    message = FrameDecoder(1).decode(encode_frame(np.ones(3)))
    assert (message.seq, message.ts) == (None, None)
    assert message.samples.shape == (3, 1)


def header(**fields: object) -> bytes:
    values = {"magic": b"MF", "version": 1, "kind": FLOAT32, "channels": 1, "count": 1, "seq": 0, "ts": 0.0}
    values |= fields
    values.setdefault("scale", 1.0)
    return HEADER.pack(*values.values())


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "bad_frame"),
        (b"MF\x01\x02", "bad_frame"),
        (header(magic=b'{"'), "bad_frame"),
        (header(version=2) + b"\0" * 4, "bad_frame"),
        (header(kind=3) + b"\0" * 4, "bad_frame"),
        (header() + b"\0" * 3, "bad_frame"),
        (header() + b"\0" * 8, "bad_frame"),
        (header(scale=0.0) + b"\0" * 4, "bad_frame"),
        (header(scale=math.nan) + b"\0" * 4, "bad_frame"),
        (header(count=0), "bad_samples"),
        (header(count=5) + b"\0" * 20, "too_many_samples"),
        (header(channels=2) + b"\0" * 8, "wrong_channels"),
        (header() + struct.pack("<f", math.inf), "non_finite"),
        (header() + struct.pack("<f", math.nan), "non_finite"),
        (header(kind=INT16, scale=3e38) + struct.pack("<h", 2), "non_finite"),
        (header() + struct.pack("<f", 2e6), "value_out_of_range"),
        (header(seq=MAX_SEQ) + b"\0" * 4, "bad_seq"),
        (b"\0" * 100, "bad_frame"),
    ],
)
def test_reject_reasons(payload: bytes, reason: str) -> None:
    assert reason_of(FrameDecoder(1, max_samples=4, max_abs_value=1e6), payload) == reason


@pytest.mark.parametrize("ts", [-1.0, math.inf, 0.0, 1.8e12])
def test_an_implausible_ts_is_ignored_and_the_samples_kept(ts: float) -> None:
    message = FrameDecoder(1).decode(encode_frame(np.array([0.5, 1.5]), seq=3, ts=ts))
    assert (message.ts, message.ts_ignored, message.seq, message.samples[:, 0].tolist()) == (
        None,
        "out_of_range",
        3,
        [0.5, 1.5],
    )


def test_too_large_is_checked_before_the_header() -> None:
    assert reason_of(FrameDecoder(1, max_bytes=64), encode_frame(np.zeros(20))) == "too_large"


def test_int16_is_clipped_at_encoding() -> None:
    message = FrameDecoder(1).decode(encode_frame(np.array([1e9, -1e9]), sample_type=INT16, scale=1.0))
    np.testing.assert_array_equal(message.samples[:, 0], [32767, -32768])


@settings(max_examples=3000, deadline=None, derandomize=True, database=None)
@given(seed=st.integers(0, 2**32 - 1), cut=st.integers(0, 64), flips=st.integers(0, 4))
def test_fuzz_frames(seed: int, cut: int, flips: int) -> None:
    """Valid frames, cut short, extended and with flipped bytes, and pure noise: a valid message or a listed reason,
    never another exception; an accepted message meets the decoder's bounds."""
    rng = random.Random(seed)
    decoder = FrameDecoder(rng.choice((1, 2)), max_samples=64, max_bytes=2048, max_abs_value=1e4)
    rows = np.array([[rng.uniform(-2e4, 2e4) for _ in range(decoder.channels)] for _ in range(rng.randint(1, 80))])
    kind = rng.choice((INT16, FLOAT32))
    payload = bytearray(
        encode_frame(rows, rng.choice((None, rng.randrange(2**54))), rng.choice((None, 1.7e9)), kind, rng.random())
        if rng.random() < 0.9
        else rng.randbytes(rng.randint(0, 200))
    )
    if cut and rng.random() < 0.3:
        del payload[-cut:]
    for _ in range(flips):
        if payload:
            payload[rng.randrange(len(payload))] = rng.randrange(256)
    try:
        message = decoder.decode(bytes(payload))
    except PayloadError as error:
        assert error.reason in REJECT_REASONS
        return
    assert message.samples.dtype == np.float32 and message.samples.shape[1] == decoder.channels
    assert 1 <= len(message.samples) <= decoder.max_samples
    assert np.isfinite(message.samples).all() and np.abs(message.samples).max() <= decoder.max_abs_value
    assert message.seq is None or 0 <= message.seq < MAX_SEQ
    assert message.ts is None or (math.isfinite(message.ts) and message.ts >= 0)


def test_only_frames_raise_bad_frame() -> None:
    assert FRAME_ONLY_REASONS == ("bad_frame",)
    assert reason_of(FrameDecoder(1), b'{"samples": [1]}') == "bad_frame"
