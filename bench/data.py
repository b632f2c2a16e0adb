"""Where the bench reads the ECG5000 splits: `--data-dir` (default data/ecg5000 in the repository).

The splits live in `DIR/splits/NAME.txt`, or gzip-compressed as `NAME.txt.gz`; either is read.
"""

from __future__ import annotations

import gzip
import shutil
import tempfile
from pathlib import Path

from monitor.datasets import WindowSet, read_ucr

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / "data" / "ecg5000"
TEST = "test"
TRAIN_NORMAL = "train_normal"


def split_path(data_dir: Path, name: str) -> Path:
    """The file of split `name` under `data_dir`: `.txt` if present, else `.txt.gz`."""
    plain = data_dir / "splits" / f"{name}.txt"
    packed = plain.with_name(plain.name + ".gz")
    if not plain.is_file() and packed.is_file():
        return packed
    return plain  # read_ucr names it in its error when neither exists


def read_split(path: Path) -> WindowSet:
    """A UCR split, plain or gzip-compressed (decompressed into a temporary file for `read_ucr`)."""
    if path.suffix != ".gz":
        return read_ucr(path)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as directory:
        plain = Path(directory) / path.stem
        with gzip.open(path, "rb") as source, plain.open("wb") as target:
            shutil.copyfileobj(source, target)
        return read_ucr(plain)
