"""The window state file: one checksummed line a sensor, so one bad entry costs one sensor's partial window."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from monitor.ingest.payload import Message
from monitor.ingest.state_file import read_state, write_state
from monitor.ingest.windowing import WindowAssembler

W = 140


def assembler_with_partial_windows(sensors: int = 20) -> WindowAssembler:
    assembler = WindowAssembler(W, W, 1, 100, 300.0)
    for index in range(sensors):
        samples = np.random.default_rng(index).normal(size=(70, 1)).astype(np.float32)
        assembler.feed(f"s{index:02d}", Message(samples, 0, 1.7e9), 0.0)
    return assembler


def restore(path, max_abs_value: float = 1e6) -> tuple[int, list[str], int]:
    state, damaged = read_state(path)
    fresh = WindowAssembler(W, W, 1, 100, 300.0)
    return fresh.restore(state, 0.0, max_abs_value), fresh.refused, damaged


def test_every_sensor_comes_back_from_an_intact_file(tmp_path):
    write_state(tmp_path / "state", assembler_with_partial_windows().snapshot())
    assert restore(tmp_path / "state") == (20, [], 0)


@pytest.mark.parametrize("fault", ["nan_sample", "huge_sample", "next_seq_not_a_number", "ts_not_finite"])
def test_one_bad_entry_costs_that_sensor_only(tmp_path, fault):
    state = assembler_with_partial_windows().snapshot()
    entry = state["sensors"][7]
    samples = np.frombuffer(base64.b64decode(entry["samples"]), dtype="<f4").copy()
    if fault == "nan_sample":
        samples[3] = np.nan
    if fault == "huge_sample":
        samples[3] = 1e30  # restored, it would be scored: out of range as in a message
    entry["samples"] = base64.b64encode(samples.tobytes()).decode()
    if fault == "next_seq_not_a_number":
        entry["next_seq"] = "seventy"
    if fault == "ts_not_finite":
        entry["last_anchor"] = [0, "inf"]
    write_state(tmp_path / "state", state)
    assert restore(tmp_path / "state") == (19, ["s07"], 0)


def test_damaged_bytes_cost_only_the_lines_they_touch(tmp_path):
    path = tmp_path / "state"
    write_state(path, assembler_with_partial_windows().snapshot())
    data = bytearray(path.read_bytes())
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01  # a flipped bit: restored silently without the checksums
    path.write_bytes(bytes(flipped))
    assert restore(path)[0] == 19 and restore(path)[2] == 1
    middle = len(data) // 2
    data[middle : middle + 64] = np.random.default_rng(0).bytes(64).replace(b"\n", b"x")
    path.write_bytes(bytes(data))
    assert restore(path)[0] >= 18  # the two sensors whose lines the 64 bytes overlap, at most
    path.write_bytes(b"x" + bytes(data)[1:])  # the first line holds the shape every entry needs
    with pytest.raises(ValueError, match="first line"):
        read_state(path)
