"""The compact binary frame: bytes -> validated samples, or a `PayloadError` (the reasons of `REJECT_REASONS`).

For high-rate leads: a 28-byte little-endian header, then the samples row by row (every channel of sample 0,
then of sample 1, ...), as int16 with a scale or as float32; decoded with one `numpy.frombuffer`. The layout,
byte for byte, is in docs/payload-formats.md:

    offset size type  field
    0      2    bytes magic b"MF"
    2      1    u8    version, 1
    3      1    u8    sample type: 1 int16, 2 float32
    4      2    u16   channels C
    6      2    u16   samples n (>= 1)
    8      8    u64   seq of sample 0; 2**64 - 1 = absent
    16     8    f64   ts of sample 0, Unix seconds; NaN = absent
    24     4    f32   scale: each value is raw * scale (finite, > 0)
    28     n*C*2 (int16) or n*C*4 (float32) bytes of samples

A frame whose length is not exactly header + samples is refused (`bad_frame`): a truncated frame must not pass.
The value checks after decoding are the JSON payload's (`checked_samples`), so a frame and a JSON object with the
same samples give the same `Message`.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from monitor.errors import PayloadError
from monitor.ingest.payload import Message, PayloadDecoder, check_seq, check_ts, checked_samples

MAGIC = b"MF"
VERSION = 1
INT16 = 1
FLOAT32 = 2
NO_SEQ = 2**64 - 1
FRAME_ONLY_REASONS = ("bad_frame",)  # of REJECT_REASONS, those only a frame can have
HEADER = struct.Struct("<2sBBHHQdf")
_DTYPES: dict[int, np.dtype] = {INT16: np.dtype("<i2"), FLOAT32: np.dtype("<f4")}


class FrameDecoder(PayloadDecoder):
    """Decodes binary frames with the limits of the JSON decoder (channels, max_samples, max_bytes, max_abs_value)."""

    def decode(self, payload: bytes | bytearray | memoryview) -> Message:
        """Returns the validated message; raises only `PayloadError`, for any input bytes."""
        if len(payload) > self.max_bytes:
            raise PayloadError("too_large", f"{len(payload)} bytes > {self.max_bytes}")
        if len(payload) < HEADER.size:
            raise PayloadError("bad_frame", f"{len(payload)} bytes, shorter than the {HEADER.size}-byte header")
        magic, version, sample_type, channels, count, seq, ts, scale = HEADER.unpack_from(payload)
        if magic != MAGIC or version != VERSION:
            raise PayloadError("bad_frame", f"magic {magic!r} version {version}")
        dtype = _DTYPES.get(sample_type)
        if dtype is None:
            raise PayloadError("bad_frame", f"sample type {sample_type}")
        if HEADER.size + count * channels * dtype.itemsize != len(payload):
            raise PayloadError("bad_frame", f"{len(payload)} bytes for {count} x {channels} samples")
        if count == 0:
            raise PayloadError("bad_samples", "no samples")
        if count > self.max_samples:
            raise PayloadError("too_many_samples", f"{count} > {self.max_samples}")
        if channels != self.channels:
            raise PayloadError("wrong_channels", f"{channels} != {self.channels}")
        if not (math.isfinite(scale) and scale > 0):
            raise PayloadError("bad_frame", f"scale {scale!r}")
        raw = np.frombuffer(payload, dtype, count * channels, HEADER.size).reshape(count, channels)
        with np.errstate(over="ignore"):  # an overflow to inf is refused below, as non_finite
            values = raw.astype(np.float32) * np.float32(scale)
        checked_ts, ts_ignored = check_ts(None if math.isnan(ts) else ts, self.ts_range)
        return Message(
            samples=checked_samples(values, self.max_abs_value),
            seq=None if seq == NO_SEQ else check_seq(seq),
            ts=checked_ts,
            ts_ignored=ts_ignored,
        )


def encode_frame(
    samples: np.ndarray, seq: int | None = None, ts: float | None = None, sample_type: int = FLOAT32, scale: float = 1.0
) -> bytes:
    """One frame of `samples` [n, C] (or [n]); int16 values are `round(x / scale)`, clipped to the int16 range."""
    rows = np.asarray(samples, dtype=np.float64)
    rows = rows.reshape(len(rows), -1)
    if sample_type == INT16:
        body = np.clip(np.rint(rows / scale), -32768, 32767).astype("<i2")
    elif sample_type == FLOAT32:
        body = rows.astype("<f4")
    else:
        raise ValueError(f"sample type {sample_type}: 1 (int16) or 2 (float32)")
    header = HEADER.pack(
        MAGIC,
        VERSION,
        sample_type,
        rows.shape[1],
        rows.shape[0],
        NO_SEQ if seq is None else seq,
        math.nan if ts is None else ts,
        scale,
    )
    return header + body.tobytes()
