"""Readers for the data files the trainer, evaluator and replayer take (docs/user-guide.md, "Training your own").

- UCR text (`.txt`, `.tsv`): one window a line, the class label first, then W values.
- Unlabelled windows (`.npy` of shape `[N, W]` or `[N, W, C]`), all taken as normal.
- Continuous recordings (`.npy` or `.csv` of shape `[T]` or `[T, C]`), cut with a window and stride; a CSV may
  begin with a header line naming its channels.

Any of them may be compressed (`.gz` or `.xz` after the format's suffix, e.g. `test.txt.xz`); the
file is read as it is, and its fingerprint is the SHA-256 of the uncompressed content.

Every reader returns float32 windows shaped `[N, W, C]` and refuses bad files with a `DataError`
that says what is wrong and where.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from itertools import chain
from pathlib import Path
from typing import IO, Any

import numpy as np

from monitor.errors import DataError

UCR_SUFFIXES = {".txt", ".tsv", ".ucr"}
DECOMPRESSORS: dict[str, Callable[..., Any]] = {".gz": gzip.open, ".xz": lzma.open}
# A `.npy` of shape [N, W] with W below this is a [T, C] recording (no model has 3-sample windows):
# refused without --window rather than trained on as windows.
MIN_NPY_WINDOW = 4
# The key of a beat model's `architecture` that names its input lead, when the training CSVs had a header (its
# `channel_names` would be the derived channels'); a fixed-window model records its names as `channel_names`.
INPUT_CHANNEL_NAMES = "input_channel_names"
# What a damaged or mislabelled compressed file raises while it is read.
READ_ERRORS = (OSError, EOFError, lzma.LZMAError)


@dataclass(frozen=True)
class WindowSet:
    """Windows `[N, W, C]` with their labels (None for unlabelled data) and the file's fingerprint."""

    windows: np.ndarray
    labels: np.ndarray | None
    source: str
    sha256: str
    channel_names: tuple[str, ...] | None = None  # from a CSV recording's header

    @property
    def window(self) -> int:
        return int(self.windows.shape[1])

    @property
    def channels(self) -> int:
        return int(self.windows.shape[2])

    def is_anomaly(self, normal_label: int) -> np.ndarray:
        """Boolean `[N]`: True where the label is not the normal class."""
        if self.labels is None:
            raise DataError(f"{self.source}: has no labels; evaluation needs labelled (UCR format) data")
        return self.labels != normal_label

    def normal(self, normal_label: int) -> WindowSet:
        """Only the windows of the normal class (all windows when unlabelled)."""
        if self.labels is None:
            return self
        keep = self.labels == normal_label
        if not keep.any():
            found = sorted(set(self.labels.tolist()))
            raise DataError(f"{self.source}: no rows of the normal class {normal_label} (labels found: {found})")
        return replace(self, windows=self.windows[keep], labels=self.labels[keep])


def data_suffix(path: str | Path) -> str:
    """The format's suffix, past a compression suffix: `.txt` for `test.txt.xz`."""
    path = Path(path)
    if path.suffix.lower() in DECOMPRESSORS:
        path = path.with_suffix("")
    return path.suffix.lower()


def open_data(path: Path, mode: str = "rb", encoding: str | None = None, errors: str | None = None) -> IO[Any]:
    """Open a data file, decompressing `.gz` and `.xz` on the fly."""
    opener = DECOMPRESSORS.get(path.suffix.lower())
    if opener:
        return opener(path, mode, encoding=encoding, errors=errors)
    return open(path, mode, encoding=encoding, errors=errors)


def file_sha256(path: Path) -> str:
    """SHA-256 of the file's content (uncompressed), so recompressing a data file keeps its fingerprint."""
    digest = hashlib.sha256()
    try:
        with open_data(path) as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except READ_ERRORS as error:
        raise DataError(f"{path}: cannot be read ({error})") from None
    return digest.hexdigest()


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return path


def _check_finite(values: np.ndarray, source: str) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise DataError(f"{source}: NaN or infinite value at row {row + 1}")


def read_ucr(path: str | Path) -> WindowSet:
    """Read a UCR text file: a label then W values per line, whitespace (or comma) separated."""
    path = _existing(path)
    try:
        with open_data(path, "rt", encoding="utf-8", errors="replace") as handle:
            table, width = _parse_ucr(handle, path)
    except READ_ERRORS as error:
        raise DataError(f"{path}: cannot be read ({error})") from None
    if table is None or width < 3:
        raise DataError(f"{path}: no windows (a UCR line is a label and at least 2 values)")
    _check_finite(table, str(path))
    labels = table[:, 0]
    if not np.all(labels == np.round(labels)):
        raise DataError(f"{path}: the first column must hold integer class labels")
    windows = table[:, 1:, np.newaxis].astype(np.float32)
    return WindowSet(windows, labels.astype(np.int64), str(path), file_sha256(path))


def _parse_ucr(handle: IO[str], path: Path) -> tuple[np.ndarray | None, int]:
    """The rows of a UCR text file as one float64 table (None when empty), and their width."""
    rows: list[list[float]] = []
    width = 0
    for number, line in enumerate(handle, start=1):
        fields = line.replace(",", " ").split()
        if not fields:
            continue
        try:
            values = [float(field) for field in fields]
        except ValueError as error:
            raise DataError(f"{path}: line {number}: not a number ({error})") from None
        if not width:
            width = len(values)
        elif len(values) != width:
            raise DataError(f"{path}: line {number} has {len(values) - 1} values, the first line has {width - 1}")
        rows.append(values)
    return (np.asarray(rows, dtype=np.float64) if rows else None), width


def cut_windows(recording: np.ndarray, window: int, stride: int, source: str) -> np.ndarray:
    """Cut a `[T, C]` recording into `[N, window, C]` windows starting every `stride` samples."""
    if window < 2 or stride < 1:
        raise DataError(f"{source}: window must be >= 2 and stride >= 1 (got {window}, {stride})")
    length = recording.shape[0]
    if length < window:
        raise DataError(f"{source}: recording has {length} samples, shorter than one window of {window}")
    starts = np.arange(0, length - window + 1, stride)
    return np.stack([recording[start : start + window] for start in starts]).astype(np.float32)


def _as_recording(values: np.ndarray, source: str) -> np.ndarray:
    if values.ndim == 1:
        values = values[:, np.newaxis]
    if values.ndim != 2 or values.shape[1] < 1:
        raise DataError(f"{source}: a recording must have shape [T] or [T, C], got {list(values.shape)}")
    return values


def read_samples(path: str | Path, channel_names: Sequence[str] | None = None) -> np.ndarray:
    """Read a continuous `.npy` or `.csv` recording as float32 `[T, C]`; a CSV header, when there is one, must name
    `channel_names` (those of the model, when it recorded them)."""
    return read_named_samples(path, channel_names)[0]


def read_named_samples(
    path: str | Path, channel_names: Sequence[str] | None = None
) -> tuple[np.ndarray, tuple[str, ...] | None]:
    """A recording `[T, C]` and the channel names its CSV header gives (None without a header, or for `.npy`).

    A CSV may start with one header line naming the channels (`time` columns are not special: every column is a
    channel); a header that names other channels than `channel_names` is refused with one line.
    """
    path = _existing(path)
    names = None
    if data_suffix(path) == ".npy":
        values = _load_npy(path)
    else:
        try:
            with open_data(path, "rt", encoding="utf-8") as handle:
                first = handle.readline()
                names = csv_header(first, path)
                rows = handle if names else chain([first], handle)
                values = np.loadtxt(rows, delimiter=",", ndmin=1, dtype=np.float64)
        except (ValueError, UnicodeDecodeError) as error:
            raise DataError(f"{path}: not a numeric CSV recording ({error})") from None
        except READ_ERRORS as error:
            raise DataError(f"{path}: cannot be read ({error})") from None
    values = _as_recording(values, str(path))
    _check_finite(values, str(path))
    if names is not None and len(names) != values.shape[1]:
        raise DataError(f"{path}: the header names {len(names)} channels, the rows have {values.shape[1]} values")
    if names is not None and channel_names is not None and names != tuple(channel_names):
        raise DataError(
            f"{path}: the header names the channels {','.join(names)}, the model's are {','.join(channel_names)}"
        )
    return values.astype(np.float32), names


def csv_header(line: str, path: Path) -> tuple[str, ...] | None:
    """The channel names of a CSV's first line, or None when it is a row of numbers."""
    fields = [field.strip().strip('"').strip() for field in line.split(",")]
    try:
        [float(field) for field in fields]
    except ValueError:
        if not all(fields) or len(set(fields)) != len(fields):
            raise DataError(f"{path}: line 1: a header needs a different, non-empty name for every column") from None
        return tuple(fields)
    return None


def input_channel_names(metadata: dict[str, Any]) -> tuple[str, ...] | None:
    """The input channel names a model recorded (`--channel-names`, or its training CSVs' header), or None."""
    architecture = metadata.get("architecture", {})
    names = architecture.get(INPUT_CHANNEL_NAMES, architecture.get("channel_names"))
    return None if names is None else tuple(str(name) for name in names)


def same_channel_names(named: Sequence[tuple[str, tuple[str, ...] | None]]) -> tuple[str, ...] | None:
    """The channel names that the headers of several recordings `(source, names)` agree on (None without headers);
    recordings whose headers differ are refused with one line."""
    given = [(source, names) for source, names in named if names is not None]
    for source, names in given[1:]:
        if names != given[0][1]:
            raise DataError(
                f"{source}: the header names the channels {','.join(names)}, {given[0][0]}'s names "
                f"{','.join(given[0][1] or ())}: one model takes one set of channels"
            )
    return given[0][1] if given else None


def read_labels(path: str | Path, length: int) -> np.ndarray:
    """Per-sample 0/1 labels (`.npy`, or text with one value a line) as bool `[length]`; 1 = anomalous."""
    path = _existing(path)
    if path.suffix == ".npy":
        values = _load_npy(path)
    else:
        try:
            values = np.loadtxt(path, ndmin=1, dtype=np.float64)
        except ValueError as error:
            raise DataError(f"{path}: not one 0/1 label a line ({error})") from None
    if values.ndim != 1 or len(values) != length:
        raise DataError(f"{path}: {list(values.shape)} labels for a recording of {length} samples (one label a sample)")
    if not np.isin(values, (0, 1)).all():
        raise DataError(f"{path}: labels must be 0 (normal) or 1 (anomalous)")
    return values.astype(bool)


@dataclass(frozen=True)
class Recording:
    """A continuous recording `[T, C]`, one sensor's stream, with optional per-sample anomaly labels `[T]` and the
    channel names of its CSV header."""

    samples: np.ndarray
    labels: np.ndarray | None
    source: str
    sha256: str
    channel_names: tuple[str, ...] | None = None

    def window_starts(self, window: int, stride: int) -> np.ndarray:
        return np.arange(0, len(self.samples) - window + 1, stride)

    def windows(self, window: int, stride: int) -> np.ndarray:
        return cut_windows(self.samples, window, stride, self.source)

    def window_anomalous(self, window: int, stride: int) -> np.ndarray:
        """Bool `[N]`: a window is anomalous when any of its samples is labelled so."""
        if self.labels is None:
            raise DataError(f"{self.source}: has no labels")
        ends = np.r_[0, np.cumsum(self.labels)]
        starts = self.window_starts(window, stride)
        return ends[starts + window] - ends[starts] > 0


def read_labelled_recording(
    path: str | Path, labels: str | Path | None = None, channel_names: Sequence[str] | None = None
) -> Recording:
    """A `.npy`/`.csv` recording and, when given, its per-sample labels; a CSV header must name `channel_names`."""
    samples, names = read_named_samples(path, channel_names)
    per_sample = None if labels is None else read_labels(labels, len(samples))
    return Recording(samples, per_sample, str(path), file_sha256(Path(path)), names)


def read_recording(path: str | Path, window: int, stride: int, channel_names: Sequence[str] | None = None) -> WindowSet:
    """Read a continuous `.npy` or `.csv` recording and cut it into windows."""
    samples, names = read_named_samples(path, channel_names)
    windows = cut_windows(samples, window, stride, str(path))
    return WindowSet(windows, None, str(path), file_sha256(Path(path)), names)


def _load_npy(path: Path) -> np.ndarray:
    try:
        with open_data(path) as handle:
            values = np.load(handle, allow_pickle=False)
    except (ValueError, *READ_ERRORS) as error:
        raise DataError(f"{path}: not a readable numeric .npy file ({error})") from None
    if not np.issubdtype(values.dtype, np.number):
        raise DataError(f"{path}: holds {values.dtype}, not numbers")
    return values.astype(np.float64)


def read_npy_windows(path: str | Path) -> WindowSet:
    """Read unlabelled windows `[N, W]` or `[N, W, C]` from a `.npy` file."""
    path = _existing(path)
    values = _load_npy(path)
    if values.ndim == 1:
        raise DataError(
            f"{path}: holds one recording of {len(values)} samples, not windows: give --window (and --stride)"
        )
    if values.ndim == 2 and values.shape[1] < MIN_NPY_WINDOW:
        raise DataError(
            f"{path}: shape {list(values.shape)} reads as {values.shape[1]}-sample windows; if it is a recording "
            f"of {values.shape[1]} channels, give --window (and --stride)"
        )
    if values.ndim == 2:
        values = values[:, :, np.newaxis]
    if values.ndim != 3 or values.shape[0] < 1 or values.shape[1] < 2:
        raise DataError(f"{path}: windows must have shape [N, W] or [N, W, C], got {list(values.shape)}")
    _check_finite(values, str(path))
    return WindowSet(values.astype(np.float32), None, str(path), file_sha256(path))


def read_windows(
    path: str | Path, window: int | None = None, stride: int | None = None, channel_names: Sequence[str] | None = None
) -> WindowSet:
    """Read any supported file; with `window` set, `.npy`/`.csv` files are continuous recordings (a CSV header must
    then name `channel_names`, when given)."""
    path = Path(path)
    suffix = data_suffix(path)
    if suffix in UCR_SUFFIXES:
        return read_ucr(path)
    if suffix == ".csv" or (suffix == ".npy" and window is not None):
        if window is None:
            raise DataError(f"{path}: a continuous recording needs --window (and --stride)")
        return read_recording(path, window, stride or window, channel_names)
    if suffix == ".npy":
        return read_npy_windows(path)
    raise DataError(f"{path}: unknown data format (expected .txt/.tsv UCR text, .npy or .csv, optionally .gz or .xz)")


def require_window(data: WindowSet, window: int, channels: int) -> None:
    """Refuse data whose windows do not fit a model of `window` samples and `channels` channels."""
    if data.window < window:
        raise DataError(f"{data.source}: windows have {data.window} samples, shorter than the model's {window}")
    if data.window != window:
        raise DataError(f"{data.source}: windows have {data.window} samples, the model takes {window}")
    if data.channels != channels:
        raise DataError(f"{data.source}: windows have {data.channels} channels, the model takes {channels}")
