"""Sensor payloads: bytes -> validated samples, or a `PayloadError` whose reason is one of `REJECT_REASONS`.

The default input format is a UTF-8 JSON object (docs/interface.md; the binary frame and Sparkplug B are read by
monitor.ingest.frame and monitor.ingest.sparkplug, which share the reasons and the value checks here):
`{"samples": [...], "seq": <int, optional>, "ts": <Unix seconds, optional>, "sample_rate_hz": <optional>}`; other
keys are ignored. `sample_rate_hz` is not checked here: the input stage compares it with the configured rate.
Checks run in this order, and the first failing one names the reason: too_large, invalid_utf8,
invalid_json, not_object, missing_samples, bad_samples (not a list / empty), too_many_samples,
bad_samples (content), wrong_channels, non_finite, value_out_of_range, bad_seq.

A `ts` that is not seconds since the epoch in the plausible range (`ts_range`: not a number, milliseconds, 0, a
negative or an absurd value) refuses nothing: the samples are kept, the ts is ignored (`Message.ts` None) and the
reason given in `Message.ts_ignored` for the caller to count (`TS_IGNORED_REASONS`).

`value_out_of_range` bounds the magnitude of samples (`max_abs_value`): finite but extreme values (about 1e38)
would overflow the model's float32 arithmetic into inf/NaN scores.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import orjson

from monitor.config.schema import PLAUSIBLE_TS
from monitor.errors import PayloadError

# Closed set: these are Prometheus label values of the drop metric, so never add one casually.
REJECT_REASONS: tuple[str, ...] = (
    "too_large",
    "invalid_utf8",
    "invalid_json",
    "not_object",
    "missing_samples",
    "bad_samples",
    "wrong_channels",
    "non_finite",
    "value_out_of_range",
    "too_many_samples",
    "bad_seq",
    "bad_ts",  # Sparkplug B: a channel metric without a timestamp (a JSON or frame ts is ignored, not refused)
    "bad_topic",
    "bad_frame",  # binary frame: header, length or scale (monitor.ingest.frame)
    "invalid_protobuf",  # Sparkplug B (monitor.ingest.sparkplug) ...
    "no_birth",  # ... DATA from a device before its BIRTH
    "unknown_alias",  # ... a metric alias its BIRTH did not define
)

TS_IGNORED_REASONS = ("not_a_number", "out_of_range", "backwards")  # the last one is the windowing's
MAX_SEQ = 2**53  # exclusive: above this a float64 (JSON consumers, alerts) no longer holds every integer
MAX_SENSOR_ID_CHARS = 128
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_NUMERIC_KINDS = frozenset("iuf")  # bool ("b"), strings ("U") and mixed objects ("O") are not samples
_DECODE_ERRORS = (ValueError, TypeError, OverflowError, RecursionError)


@dataclass(frozen=True, slots=True, eq=False)
class Message:
    """One accepted sensor message; compared by identity because arrays have no single truth value."""

    samples: np.ndarray  # [n, C] float32, finite, read-only, 1 <= n <= max_samples
    seq: int | None  # index of samples[0] in the sensor's stream, 0 <= seq < 2**53
    ts: float | None  # Unix seconds of samples[0], within the decoder's plausible range
    ts_ignored: str | None = None  # why a ts the message carried was ignored (one of TS_IGNORED_REASONS)
    sample_rate_hz: float | None = None  # the rate the sensor says it samples at; NaN when given but not a number


class PayloadDecoder:
    """Decodes and validates payloads of one channel count; stateless, so safe to share between threads."""

    def __init__(
        self,
        channels: int,
        max_samples: int = 4096,
        max_bytes: int = 262144,
        max_abs_value: float = 1e6,
        ts_range: tuple[float, float] = PLAUSIBLE_TS,
    ) -> None:
        """Args: channels C per sample; max_samples per message; max_bytes of a payload, checked before decoding;
        max_abs_value: the largest sample magnitude accepted; ts_range: the plausible `ts`, inclusive."""
        if channels < 1 or max_samples < 1 or max_bytes < 1 or not max_abs_value > 0:
            raise ValueError(
                "channels, max_samples, max_bytes must be >= 1 and max_abs_value > 0, "
                f"got {channels}, {max_samples}, {max_bytes}, {max_abs_value}"
            )
        self.channels = channels
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.max_abs_value = max_abs_value
        self.ts_range = ts_range

    def decode(self, payload: bytes | bytearray | memoryview) -> Message:
        """Returns the validated message; raises only `PayloadError`, for any input bytes."""
        if len(payload) > self.max_bytes:
            raise PayloadError("too_large", f"{len(payload)} bytes > {self.max_bytes}")
        if type(payload) is not bytes:
            payload = bytes(payload)  # the byte searches below need bytes, not a memoryview
        try:
            document = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            # orjson reports bad UTF-8 as a JSON error; telling them apart costs a decode on the error path only.
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                raise PayloadError("invalid_utf8") from None
            raise PayloadError("invalid_json", str(exc)) from None
        if type(document) is not dict:
            raise PayloadError("not_object", type(document).__name__)
        if "samples" not in document:
            raise PayloadError("missing_samples")
        samples = self._samples(document["samples"], payload)
        seq, rate = document.get("seq"), document.get("sample_rate_hz")
        ts, ts_ignored = check_ts(document.get("ts"), self.ts_range)
        return Message(samples, None if seq is None else check_seq(seq), ts, ts_ignored, _rate(rate))

    def _samples(self, raw: object, payload: bytes) -> np.ndarray:
        if type(raw) is not list or not raw:
            raise PayloadError("bad_samples", "not a non-empty list")
        if len(raw) > self.max_samples:
            raise PayloadError("too_many_samples", f"{len(raw)} > {self.max_samples}")
        try:
            # One C-level conversion of the whole list; without a dtype numpy keeps strings as strings.
            array = np.array(raw)
        except _DECODE_ERRORS:
            raise PayloadError("bad_samples", "ragged or not numbers") from None
        if array.dtype.kind not in _NUMERIC_KINDS or array.ndim > 2:
            raise PayloadError("bad_samples", "elements are not numbers")
        # numpy silently turns True into 1 next to numbers; a byte search keeps the exact scan off the hot path.
        if (b"true" in payload or b"false" in payload) and _has_bool(raw):
            raise PayloadError("bad_samples", "booleans are not numbers")
        if array.ndim == 1:
            if self.channels != 1:
                raise PayloadError("wrong_channels", f"flat list but {self.channels} channels expected")
            array = array.reshape(-1, 1)
        elif array.shape[1] != self.channels:
            raise PayloadError("wrong_channels", f"{array.shape[1]} != {self.channels}")
        return checked_samples(array, self.max_abs_value)


def checked_samples(array: np.ndarray, max_abs_value: float) -> np.ndarray:
    """The value checks every input format shares: [n, C] numbers -> read-only float32, or `non_finite` /
    `value_out_of_range`."""
    # Comparing |x| <= max also rejects NaN; integers from JSON (< 2**64) always fit in float32 (the bound applies).
    largest = np.abs(array).max() if array.dtype.kind == "f" else max(abs(int(array.max())), abs(int(array.min())))
    if array.dtype.kind == "f" and not largest <= _FLOAT32_MAX:
        raise PayloadError("non_finite")
    if largest > max_abs_value:
        raise PayloadError("value_out_of_range", f"|x| up to {float(largest):.3g} > {max_abs_value:g}")
    samples = array.astype(np.float32)
    samples.flags.writeable = False
    return samples


def _has_bool(raw: list) -> bool:
    """Exact scan for JSON booleans among the samples (rows already known to be numbers or lists of numbers)."""
    for item in raw:
        if item is True or item is False:
            return True
        if type(item) is list and any(value is True or value is False for value in item):
            return True
    return False


def check_seq(raw: object) -> int:
    """A seq must be an integer in [0, MAX_SEQ) (a JSON `null` counts as absent: encoders often write it so)."""
    if type(raw) is not int or not 0 <= raw < MAX_SEQ:  # type() rather than isinstance() rejects bools
        raise PayloadError("bad_seq", repr(raw)[:40])
    return raw


def check_ts(raw: object, plausible: tuple[float, float]) -> tuple[float | None, str | None]:
    """(ts, None), or (None, why it is ignored: one of TS_IGNORED_REASONS); `null` counts as absent, as for seq."""
    if raw is None:
        return None, None
    if type(raw) is not float and type(raw) is not int:  # type() rather than isinstance() rejects bools
        return None, "not_a_number"
    try:
        ts = float(raw)
    except OverflowError:  # an integer beyond any float
        return None, "out_of_range"
    if not plausible[0] <= ts <= plausible[1]:  # also false for NaN
        return None, "out_of_range"
    return ts, None


def _rate(raw: object) -> float | None:
    """`null` counts as absent; anything else that is not a number is NaN, which matches no configured rate."""
    if raw is None:
        return None
    return float(raw) if type(raw) is int or type(raw) is float else float("nan")


def sensor_id_from_topic(topic: str, level: int, pattern: re.Pattern[str] | None = None) -> str:
    """Returns topic level `level` (the `+` of the subscription) as the sensor id, or raises PayloadError("bad_topic").

    `pattern` (`mqtt.sensor_id_pattern`), when given, must match the whole id: ids outside it (e.g. Cyrillic or
    full-width letters that look like another sensor's) are refused.
    """
    levels = topic.split("/")
    if not 0 <= level < len(levels):
        raise PayloadError("bad_topic", f"no level {level}")
    sensor_id = levels[level]
    if (
        not sensor_id
        or len(sensor_id) > MAX_SENSOR_ID_CHARS
        or "+" in sensor_id
        or "#" in sensor_id
        or not sensor_id.isprintable()
        or (pattern is not None and pattern.fullmatch(sensor_id) is None)
    ):
        raise PayloadError("bad_topic", repr(sensor_id)[:40])
    return sensor_id
