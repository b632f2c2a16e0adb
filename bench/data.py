"""Where the bench reads the ECG5000 splits: `--data-dir` (default data/ecg5000 in the repository).

The splits live in `DIR/splits/NAME.txt`, plain or compressed (`NAME.txt.xz`, `NAME.txt.gz`); `read_ucr` reads each.
"""

from __future__ import annotations

from pathlib import Path

from monitor.training.datasets import WindowSet, read_ucr

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / "data" / "ecg5000"
TEST = "test"
TRAIN_NORMAL = "train_normal"
SUFFIXES = (".txt", ".txt.xz", ".txt.gz")


def split_path(data_dir: Path, name: str) -> Path:
    """The file of split `name` under `data_dir`: the first of `.txt`, `.txt.xz`, `.txt.gz` that exists."""
    candidates = [data_dir / "splits" / f"{name}{suffix}" for suffix in SUFFIXES]
    return next((path for path in candidates if path.is_file()), candidates[0])  # read_ucr names a missing file


def read_split(path: Path) -> WindowSet:
    """A UCR split, plain or compressed."""
    return read_ucr(path)
