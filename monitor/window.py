"""The unit of work every stage passes on: one window of one sensor, and the array codec of saved state.

Fixed mode cuts `Window`s of W samples; beat mode cuts one per heartbeat and marks it with a `BeatMark` (its
span's end, its R peak and RR interval). Ingest, acknowledgements, the journal, scoring and alerts handle both
alike through this one type, so none of them needs to know about ECG.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class BeatMark:
    """Where a beat window's heartbeat lies in its sensor's stream."""

    end_seq: int  # exclusive end of the span the window was resampled from
    beat_seq: int  # the R peak's sample index
    rr_seconds: float | None  # since the previous R peak; None for the first beat after a start or reset


@dataclass(frozen=True, slots=True, eq=False)
class Window:
    """One complete window; compared by identity because arrays have no single truth value."""

    sensor_id: str
    start_seq: int  # absolute index of the first sample
    samples: np.ndarray  # [W, C] float32, a copy owned by this window
    start_ts: float | None  # Unix seconds of the first sample, when the input carried ts
    completed_at: float  # the monotonic `now` given to feed() when the last sample arrived
    error_scale: float = 1.0  # the reconstruction error is divided by this (beat mode's noisy stretches)
    timing_score: float = 0.0  # the score is at least this (beat mode: a premature beat's, beats.BeatSpec)
    beat: BeatMark | None = None  # set in beat mode

    @property
    def end_seq(self) -> int:
        """Exclusive end of the samples the window covers."""
        return self.beat.end_seq if self.beat is not None else self.start_seq + len(self.samples)


def encode_array(values: np.ndarray, dtype: str = "<f4") -> str:
    """An array's values as base64 text of little-endian `dtype` (the shape is the caller's to keep)."""
    return base64.b64encode(np.ascontiguousarray(values, dtype=dtype).tobytes()).decode("ascii")


def decode_array(text: str, dtype: str = "<f4") -> np.ndarray:
    """The flat array `encode_array` wrote, as float32 (`<f4`) or float64 (`<f8`); raises ValueError on bad text."""
    raw = np.frombuffer(base64.b64decode(text, validate=True), dtype=dtype)
    return raw.astype(np.float32 if dtype == "<f4" else np.float64)
