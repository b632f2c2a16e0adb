"""The benchmark's own code: data readers, typed records, rendering and the part registry (no timing here)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from bench import records
from bench.data import read_split, split_path
from bench.parts import PARTS
from bench.records import RunConfig
from bench.report import render
from bench.run import list_parts, parse_args

RESULTS = Path(__file__).resolve().parents[3] / "bench" / "results.json"


def write_split(directory: Path, name: str, text: str, packed: bool) -> Path:
    (directory / "splits").mkdir(parents=True, exist_ok=True)
    path = directory / "splits" / (f"{name}.txt.gz" if packed else f"{name}.txt")
    path.write_bytes(gzip.compress(text.encode()) if packed else text.encode())
    return path


def test_splits_are_read_plain_or_gzip_compressed(tmp_path: Path) -> None:
    text = "1 0.5 0.25 0.125\n2 1.0 2.0 3.0\n"
    plain = read_split(write_split(tmp_path / "plain", "test", text, packed=False))
    packed_path = write_split(tmp_path / "packed", "test", text, packed=True)
    assert split_path(tmp_path / "packed", "test") == packed_path
    packed = read_split(packed_path)
    np.testing.assert_array_equal(packed.windows, plain.windows)
    np.testing.assert_array_equal(packed.labels, [1, 2])


def test_plain_split_is_preferred_to_the_compressed_one(tmp_path: Path) -> None:
    write_split(tmp_path, "test", "1 0 1\n", packed=True)
    plain = write_split(tmp_path, "test", "1 0 1\n", packed=False)
    assert split_path(tmp_path, "test") == plain


def test_results_file_round_trips_and_renders_every_section(tmp_path: Path) -> None:
    results = records.load(RESULTS)
    copy = tmp_path / "results.json"
    records.save(results, copy)
    assert records.load(copy) == results
    report = render(results)
    for heading in ("## Machine", "## Summary", "## (a)", "## (b, c)", "### GIL", "## ONNX", "## (d)", "## (e)"):
        assert heading in report


def test_missing_results_file_gives_empty_results(tmp_path: Path) -> None:
    assert records.load(tmp_path / "none.json") == records.Results()
    assert render(records.Results()).startswith("# Benchmark results")


def test_run_config_parses_every_option() -> None:
    config = RunConfig.parse("onnx:2:qos0:b32:w25:c140:p311")
    assert config == RunConfig("onnx", 2, 0, 32, 0.025, 140, "3.1.1")
    assert RunConfig.parse("torch:1") == RunConfig()
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
