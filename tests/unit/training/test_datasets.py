"""Data readers: good files give exact windows, bad files one `DataError` naming the problem."""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from monitor.errors import DataError
from monitor.training.datasets import (
    WindowSet,
    cut_windows,
    read_labelled_recording,
    read_named_samples,
    read_npy_windows,
    read_recording,
    read_samples,
    read_ucr,
    read_windows,
    require_window,
    same_channel_names,
)
from tests.support import DATA, SPLITS


def ucr_line(label: float, values) -> str:
    return " ".join(f"{v:16.7e}" for v in [label, *values])


# --- good files -------------------------------------------------------------------------------


def test_ucr_real_split():
    path = SPLITS / "train_normal.txt.xz"
    data = read_ucr(path)
    reference = np.loadtxt(path)
    assert data.windows.shape == (len(reference), 140, 1)
    assert data.windows.dtype == np.float32
    assert (data.window, data.channels) == (140, 1)
    np.testing.assert_array_equal(data.windows[:, :, 0], reference[:, 1:].astype(np.float32))
    np.testing.assert_array_equal(data.labels, reference[:, 0].astype(np.int64))
    assert set(data.labels.tolist()) == {1}
    # The fingerprint is the uncompressed content's: the published split's SHA-256 (data/ecg5000/PROVENANCE.md).
    assert data.sha256 == hashlib.sha256(lzma.decompress(path.read_bytes())).hexdigest()
    assert data.sha256 == "20034157460317c703afdfddd8645c3f132a101db0d7a836c40331bbe3283fc3"
    assert data.source == str(path)
    assert not data.is_anomaly(1).any()
    assert read_windows(path).windows.shape == data.windows.shape


def test_the_split_script_reproduces_the_committed_splits():
    """data/ecg5000/make_splits.py rebuilds the three split files from the UCR files, byte for byte."""
    script = DATA / "make_splits.py"
    process = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stdout + process.stderr
    assert process.stdout.count("identical") == 3, process.stdout
    assert "1459 rows" in process.stdout and "438 rows" in process.stdout and "3103 rows" in process.stdout


@pytest.mark.parametrize("compress", [gzip.compress, lzma.compress], ids=["gz", "xz"])
def test_compressed_files_read_as_the_plain_ones(tmp_path, compress):
    suffix = ".gz" if compress is gzip.compress else ".xz"
    ucr = tmp_path / "beats.txt"
    ucr.write_text("\n".join(ucr_line(label, [label, 2.5, -1]) for label in (1, 2, 1)) + "\n")
    recording = tmp_path / "rec.csv"
    recording.write_text("\n".join(f"{i},{-i}" for i in range(12)) + "\n")
    np.save(tmp_path / "windows.npy", np.arange(40, dtype=np.float32).reshape(4, 10))
    for plain, window in ((ucr, None), (recording, 4), (tmp_path / "windows.npy", None)):
        packed = plain.with_name(plain.name + suffix)
        packed.write_bytes(compress(plain.read_bytes()))
        expected, got = read_windows(plain, window), read_windows(packed, window)
        np.testing.assert_array_equal(got.windows, expected.windows)
        assert got.sha256 == expected.sha256 == hashlib.sha256(plain.read_bytes()).hexdigest()
    assert read_ucr(ucr.with_name("beats.txt" + suffix)).labels.tolist() == [1, 2, 1]


def test_damaged_compressed_file_is_one_line(tmp_path):
    packed = tmp_path / "beats.txt.xz"
    packed.write_bytes(lzma.compress(b"1 2 3\n" * 100)[:-20])
    with pytest.raises(DataError, match="beats.txt.xz: cannot be read") as error:
        read_windows(packed)
    assert_one_line(error)
    (tmp_path / "not.txt.gz").write_bytes(b"plain text, not gzip")
    with pytest.raises(DataError, match="not.txt.gz: cannot be read"):
        read_windows(tmp_path / "not.txt.gz")


def test_ucr_labels_and_normal_class(tmp_path):
    path = tmp_path / "mixed.txt"
    rows = [(1, [0.0, 1.0, 2.0]), (2, [3.0, 4.0, 5.0]), (1, [6.0, 7.0, 8.0]), (5, [9.0, 10.0, 11.0])]
    # A blank line and a trailing one are allowed; commas work as separators too.
    path.write_text(ucr_line(*rows[0]) + "\n\n" + "\n".join(ucr_line(*row) for row in rows[1:3]) + "\n5,9,10,11\n")
    data = read_ucr(path)
    assert data.labels.tolist() == [1, 2, 1, 5]
    np.testing.assert_array_equal(data.windows[:, :, 0], np.arange(12, dtype=np.float32).reshape(4, 3))
    assert data.is_anomaly(1).tolist() == [False, True, False, True]
    normal = data.normal(1)
    assert normal.labels.tolist() == [1, 1]
    np.testing.assert_array_equal(normal.windows[:, :, 0], [[0, 1, 2], [6, 7, 8]])
    assert normal.sha256 == data.sha256


def test_npy_windows_two_and_three_dimensional(tmp_path):
    two = np.arange(24, dtype=np.float64).reshape(4, 6)
    np.save(tmp_path / "two.npy", two)
    data = read_npy_windows(tmp_path / "two.npy")
    assert data.windows.shape == (4, 6, 1) and data.labels is None
    np.testing.assert_array_equal(data.windows[:, :, 0], two.astype(np.float32))
    assert data.sha256 == hashlib.sha256((tmp_path / "two.npy").read_bytes()).hexdigest()

    three = np.random.default_rng(0).normal(size=(5, 7, 3)).astype(np.float32)
    np.save(tmp_path / "three.npy", three)
    data = read_windows(tmp_path / "three.npy")
    assert data.windows.shape == (5, 7, 3)
    assert (data.window, data.channels) == (7, 3)
    np.testing.assert_array_equal(data.windows, three)
    # Unlabelled windows are all normal.
    assert data.normal(1) is data
    with pytest.raises(DataError, match="no labels"):
        data.is_anomaly(1)


def test_recording_npy_one_channel_cut_with_window_and_stride(tmp_path):
    samples = np.arange(10, dtype=np.float64)
    np.save(tmp_path / "rec.npy", samples)
    data = read_recording(tmp_path / "rec.npy", window=4, stride=3)
    # Starts 0, 3, 6; 9 would need samples up to 12.
    assert data.windows.shape == (3, 4, 1)
    np.testing.assert_array_equal(data.windows[:, :, 0], [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]])
    assert data.labels is None
    # read_windows with a window treats .npy as a recording; stride defaults to the window.
    data = read_windows(tmp_path / "rec.npy", window=5)
    np.testing.assert_array_equal(data.windows[:, :, 0], [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])


def test_recording_npy_multi_channel(tmp_path):
    samples = np.stack([np.arange(8), 100 + np.arange(8)], axis=1).astype(np.float32)
    np.save(tmp_path / "rec2.npy", samples)
    data = read_recording(tmp_path / "rec2.npy", window=3, stride=2)
    assert data.windows.shape == (3, 3, 2)
    np.testing.assert_array_equal(data.windows[1], [[2, 102], [3, 103], [4, 104]])
    np.testing.assert_array_equal(data.windows[2], samples[4:7])


def test_recording_csv_one_and_two_channels(tmp_path):
    one = tmp_path / "one.csv"
    one.write_text("\n".join(str(v) for v in [0.5, 1.5, -2.0, 3.25, 4.0, 5.0, 6.0]) + "\n")
    data = read_recording(one, window=3, stride=2)
    np.testing.assert_array_equal(data.windows[:, :, 0], [[0.5, 1.5, -2.0], [-2.0, 3.25, 4.0], [4.0, 5.0, 6.0]])
    np.testing.assert_array_equal(read_samples(one)[:, 0], [0.5, 1.5, -2.0, 3.25, 4.0, 5.0, 6.0])

    two = tmp_path / "two.csv"
    two.write_text("".join(f"{t},{10 * t}\n" for t in range(6)))
    assert read_samples(two).shape == (6, 2)
    data = read_windows(two, window=4, stride=1)
    assert data.windows.shape == (3, 4, 2)
    np.testing.assert_array_equal(data.windows[2], [[2, 20], [3, 30], [4, 40], [5, 50]])


def test_cut_windows_exact_fit_and_bad_arguments():
    recording = np.arange(6, dtype=np.float32)[:, None]
    assert cut_windows(recording, 6, 1, "x").shape == (1, 6, 1)
    assert cut_windows(recording, 2, 2, "x")[:, :, 0].tolist() == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(DataError, match="window must be >= 2 and stride >= 1"):
        cut_windows(recording, 4, 0, "x")


# --- bad files: one DataError naming the problem ---------------------------------------------


def assert_one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path):
    for reader in (read_ucr, read_npy_windows, read_samples, read_windows):
        with pytest.raises(DataError, match="no such file") as error:
            reader(tmp_path / "absent.txt")
        assert str(tmp_path / "absent.txt") in assert_one_line(error)


def test_ragged_rows_name_the_line(tmp_path):
    path = tmp_path / "ragged.txt"
    path.write_text(
        "\n".join([ucr_line(1, [1, 2, 3]), ucr_line(1, [4, 5, 6]), ucr_line(2, [7, 8]), ucr_line(1, [1, 2, 3])])
    )
    with pytest.raises(DataError, match=r"line 3 has 2 values, the first line has 3") as error:
        read_ucr(path)
    assert str(path) in assert_one_line(error)


def test_non_numeric_field(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(ucr_line(1, [1, 2, 3]) + "\n1 2 abc 4\n")
    with pytest.raises(DataError, match=r"line 2: not a number.*abc") as error:
        read_ucr(path)
    assert_one_line(error)
    csv = tmp_path / "text-row.csv"
    csv.write_text("1.0\nabc\n3.0\n")  # a word after the first line is no header
    with pytest.raises(DataError, match="not a numeric CSV recording"):
        read_recording(csv, 2, 1)


def test_a_csv_header_names_the_channels(tmp_path):
    plain, headed = tmp_path / "plain.csv", tmp_path / "headed.csv.gz"
    rows = "".join(f"{t},{10 * t}\n" for t in range(6))
    plain.write_text(rows)
    headed.write_bytes(gzip.compress(f' ch1 , "ch2"\n{rows}'.encode()))
    samples, names = read_named_samples(headed)
    assert names == ("ch1", "ch2")
    np.testing.assert_array_equal(samples, read_samples(plain))  # no row lost or gained
    assert read_named_samples(plain)[1] is None
    assert read_windows(headed, window=4, stride=1).channel_names == ("ch1", "ch2")
    assert read_labelled_recording(headed, channel_names=("ch1", "ch2")).channel_names == ("ch1", "ch2")
    assert read_samples(plain, channel_names=("x", "y")).shape == (6, 2)  # no header: nothing to compare


@pytest.mark.parametrize(
    ("header", "expected", "message"),
    [
        ("a,b", ("ch1", "ch2"), "the header names the channels a,b, the model's are ch1,ch2"),
        ("a,b,c", None, "the header names 3 channels, the rows have 2 values"),
        ("a,a", None, "line 1: a header needs a different, non-empty name for every column"),
        ("a,", None, "line 1: a header needs a different, non-empty name for every column"),
    ],
)
def test_a_header_that_does_not_fit_is_one_line(tmp_path, header, expected, message):
    path = tmp_path / "headed.csv"
    path.write_text(f"{header}\n1,2\n3,4\n")
    with pytest.raises(DataError) as error:
        read_samples(path, channel_names=expected)
    assert str(error.value) == f"{path}: {message}"


def test_recordings_with_different_headers_make_no_model():
    assert same_channel_names([("a.csv", ("x",)), ("b.npy", None), ("c.csv", ("x",))]) == ("x",)
    assert same_channel_names([("b.npy", None)]) is None
    with pytest.raises(DataError, match=r"^c.csv: the header names the channels y, a.csv's names x: one model"):
        same_channel_names([("a.csv", ("x",)), ("c.csv", ("y",))])


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_nan_and_inf(tmp_path, bad):
    path = tmp_path / "bad.txt"
    path.write_text("\n".join([ucr_line(1, [1, 2, 3]), ucr_line(1, [4, 5, 6]), f"1 7 {bad} 9"]) + "\n")
    with pytest.raises(DataError, match="NaN or infinite value at row 3") as error:
        read_ucr(path)
    assert_one_line(error)

    windows = np.zeros((4, 5))
    windows[2, 1] = float(bad)
    np.save(tmp_path / "bad.npy", windows)
    with pytest.raises(DataError, match="NaN or infinite value at row 3"):
        read_npy_windows(tmp_path / "bad.npy")

    csv = tmp_path / "bad.csv"
    csv.write_text(f"1.0\n2.0\n{bad}\n4.0\n")
    with pytest.raises(DataError, match="NaN or infinite"):
        read_recording(csv, 2, 1)


def test_recording_shorter_than_a_window(tmp_path):
    np.save(tmp_path / "short.npy", np.zeros(99))
    with pytest.raises(DataError, match="recording has 99 samples, shorter than one window of 140") as error:
        read_recording(tmp_path / "short.npy", 140, 140)
    assert_one_line(error)


def test_no_rows_of_the_normal_class(tmp_path):
    path = tmp_path / "anomalies.txt"
    path.write_text("\n".join([ucr_line(2, [1, 2, 3]), ucr_line(3, [4, 5, 6])]) + "\n")
    data = read_ucr(path)
    with pytest.raises(DataError, match=r"no rows of the normal class 1 \(labels found: \[2, 3\]\)") as error:
        data.normal(1)
    assert str(path) in assert_one_line(error)


def test_non_integer_labels_and_empty_file(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("1.5 1 2 3\n")
    with pytest.raises(DataError, match="integer class labels"):
        read_ucr(path)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no windows"):
        read_ucr(empty)


class _Marker:
    """Unpickling this touches a file: proof that a reader executed pickled code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch '{self.path}'",))


def test_pickled_object_npy_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "objects.npy"
    np.save(path, np.array([_Marker(marker), 1], dtype=object), allow_pickle=True)
    for read in (read_npy_windows, lambda p: read_recording(p, 2, 1), read_samples):
        with pytest.raises(DataError, match="not a readable numeric .npy file") as error:
            read(path)
        assert "allow_pickle" in assert_one_line(error)
    assert not marker.exists()
    # Control: the same file really does run code when pickles are allowed.
    np.load(path, allow_pickle=True)
    assert marker.exists()


def test_non_numeric_and_wrong_shape_npy(tmp_path):
    np.save(tmp_path / "strings.npy", np.array([["a", "b"], ["c", "d"]]))
    with pytest.raises(DataError, match="not numbers"):
        read_npy_windows(tmp_path / "strings.npy")
    np.save(tmp_path / "flat.npy", np.zeros(10))
    with pytest.raises(DataError, match=r"one recording of 10 samples, not windows: give --window"):
        read_npy_windows(tmp_path / "flat.npy")
    np.save(tmp_path / "two_leads.npy", np.zeros((1000, 2)))
    with pytest.raises(DataError, match=r"shape \[1000, 2\] reads as 2-sample windows; .* 2 channels, give --window"):
        read_npy_windows(tmp_path / "two_leads.npy")
    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 4)))
    with pytest.raises(DataError, match=r"\[T\] or \[T, C\], got \[2, 3, 4\]"):
        read_recording(tmp_path / "cube.npy", 2, 1)
    (tmp_path / "garbage.npy").write_bytes(b"not an npy file at all")
    with pytest.raises(DataError, match="not a readable numeric .npy file"):
        read_npy_windows(tmp_path / "garbage.npy")


def test_unknown_format_and_csv_without_window(tmp_path):
    with pytest.raises(DataError, match="unknown data format"):
        read_windows(tmp_path / "data.parquet")
    (tmp_path / "rec.csv").write_text("1\n2\n3\n")
    with pytest.raises(DataError, match="needs --window"):
        read_windows(tmp_path / "rec.csv")


def test_require_window():
    data = WindowSet(np.zeros((3, 100, 1), np.float32), None, "beats.npy", "0" * 64)
    require_window(data, 100, 1)
    with pytest.raises(DataError, match="beats.npy: windows have 100 samples, shorter than the model's 140"):
        require_window(data, 140, 1)
    with pytest.raises(DataError, match="windows have 100 samples, the model takes 50"):
        require_window(data, 50, 1)
    with pytest.raises(DataError, match="windows have 1 channels, the model takes 3"):
        require_window(data, 100, 3)
