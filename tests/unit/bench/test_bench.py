"""The benchmark's own code: data paths, the results file and its rendering, stepping and the part registry (no
timing here; the load generator's runs against a broker are in tests/e2e/test_loadgen.py)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from bench import results
from bench.e2e import RunConfig
from bench.harness import split_path, step_up
from bench.parts import PARTS
from bench.run import list_parts, parse_args
from monitor.training.datasets import read_ucr

RESULTS = Path(__file__).resolve().parents[3] / "bench" / "results.json"


def write_split(directory: Path, name: str, text: str, packed: bool) -> Path:
    (directory / "splits").mkdir(parents=True, exist_ok=True)
    path = directory / "splits" / (f"{name}.txt.gz" if packed else f"{name}.txt")
    path.write_bytes(gzip.compress(text.encode()) if packed else text.encode())
    return path


def test_splits_are_read_plain_or_gzip_compressed(tmp_path: Path) -> None:
    text = "1 0.5 0.25 0.125\n2 1.0 2.0 3.0\n"
    plain = read_ucr(write_split(tmp_path / "plain", "test", text, packed=False))
    packed_path = write_split(tmp_path / "packed", "test", text, packed=True)
    assert split_path(tmp_path / "packed", "test") == packed_path
    packed = read_ucr(packed_path)
    np.testing.assert_array_equal(packed.windows, plain.windows)
    np.testing.assert_array_equal(packed.labels, [1, 2])


def test_plain_split_is_preferred_to_the_compressed_one(tmp_path: Path) -> None:
    write_split(tmp_path, "test", "1 0 1\n", packed=True)
    plain = write_split(tmp_path, "test", "1 0 1\n", packed=False)
    assert split_path(tmp_path, "test") == plain


def test_results_file_round_trips_and_results_md_is_rendered_from_it(tmp_path: Path) -> None:
    recorded = results.load(RESULTS)
    copy = tmp_path / "results.json"
    results.save(recorded, copy)
    assert results.load(copy) == recorded
    report = results.render(recorded, PARTS.values())
    assert report == (RESULTS.parent / "RESULTS.md").read_text()  # regenerated, never edited by hand
    for part in PARTS.values():
        if part.field in recorded:
            assert f"## {part.title}\n" in report
            assert recorded[part.field]["stamp"]["measured_at"] in report


def test_missing_results_file_gives_empty_results(tmp_path: Path) -> None:
    assert results.load(tmp_path / "none.json") == {}
    assert results.render({}, PARTS.values()).startswith("# Benchmark results")


def test_cells_are_formatted_for_reading() -> None:
    row = {"n": 12345, "rate": 4866.4, "ms": 33.46, "auc": 0.99594, "none": None, "ok": True, "by": {1: 2.0}}
    assert results.table([row])[2] == "| 12,345 | 4,866 | 33.5 | 0.9959 | n/a | yes | 1: 2 |"


def test_run_config_parses_every_option() -> None:
    config = RunConfig.parse("onnx:2:qos0:b32:w25:c140:p311:beats:frame")
    assert config == RunConfig("onnx", 2, 0, 32, 0.025, 140, "3.1.1", "beats", "frame")
    assert RunConfig.parse(config.text) == config
    assert RunConfig.parse("torch:1") == RunConfig()
    assert RunConfig().text == "torch:1"
    assert RunConfig.parse("torch:1:c140:beats:frame") == RunConfig(chunk=140, mode="beats", input_format="frame")
    with pytest.raises(ValueError, match="unknown option"):
        RunConfig.parse("torch:1:x9")
    with pytest.raises(ValueError, match="backend"):
        RunConfig.parse("tensorflow:1")


def test_parts_are_listed_and_unknown_parts_refused(capsys: pytest.CaptureFixture[str]) -> None:
    listing = list_parts()
    assert all(name in listing for name in PARTS)
    assert parse_args(["--parts", "gil,accuracy"]).part_list == ["gil", "accuracy"]
    assert "model-table" not in parse_args([]).part_list  # trained only when named
    with pytest.raises(SystemExit):
        parse_args(["--parts", "gil,nosuchpart"])
    assert "unknown parts: nosuchpart" in capsys.readouterr().err


def test_stepping_retries_a_failed_step_and_stops_at_a_throughput_failure() -> None:
    """A failed step is run again and the better attempt counts; stepping goes on past a latency failure only."""
    attempts: list[int] = []

    def step(sensors: int) -> dict:
        attempts.append(sensors)
        second = attempts.count(sensors) == 2
        throughput_ok = sensors < 300 or (sensors == 300 and second)
        latency_ok = sensors != 200
        return {
            "sensors": sensors,
            "keeps_up": throughput_ok and latency_ok,
            "throughput_ok": throughput_ok,
            "latency_ok": latency_ok,
            "generator_on_time": True,
            "scored_windows_per_second": float(sensors + second),
            "latency_p50_seconds": None,
            "latency_p99_seconds": None,
            "dropped_windows": 0.0,
            "cpu_cores": {},
        }

    rows = step_up(step, [100, 200, 300, 400, 500], retry=True)
    assert attempts == [100, 200, 200, 300, 300, 400, 400]
    assert [(row["sensors"], row["keeps_up"]) for row in rows] == [(100, True), (200, False), (300, True), (400, False)]
    assert (
        rows[1]["scored_windows_per_second"] == 201.0 and rows[1]["other_attempt"]["scored_windows_per_second"] == 200
    )
    assert "other_attempt" not in rows[0] and not rows[2]["other_attempt"]["keeps_up"]
