#!/usr/bin/env python3
"""Make the deployment split of ECG5000 (splits/*.txt.xz) from the two UCR files beside this script.

The recipe (PROVENANCE.md): the 5000 beats of ECG5000_TRAIN then ECG5000_TEST, one generator
`numpy.random.default_rng(20261121)`, used in this order:
1. the 2919 normal beats (class 1) are permuted; the first 1459 are `train_normal`, the next 438
   (15 %) `calibration_normal`, the last 1022 (35 %) go to the test set;
2. the 2081 anomalous beats (classes 2-5) are permuted;
3. `test` is those 1022 normal beats followed by the permuted anomalous ones, permuted as a whole.
Each line is the source line's fields, each preceded by two spaces: the values are copied as text,
never re-printed, so the split holds exactly the source's digits.

    python data/ecg5000/make_splits.py           # write splits/*.txt.xz
    python data/ecg5000/make_splits.py --check   # rebuild in memory, compare with the committed files
"""

from __future__ import annotations

import argparse
import hashlib
import lzma
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SOURCES = ("ECG5000_TRAIN.txt.xz", "ECG5000_TEST.txt.xz")
SEED = 20261121
NORMAL_LABEL = 1.0
CALIBRATION_FRACTION = 0.15
TEST_NORMAL_FRACTION = 0.35
# SHA-256 of the uncompressed split files as first published (PROVENANCE.md); a rebuild must match them.
EXPECTED_SHA256 = {
    "train_normal": "20034157460317c703afdfddd8645c3f132a101db0d7a836c40331bbe3283fc3",
    "calibration_normal": "4f4b78b64bf92d040ef5c57b527c504114845123408f2cbe1d794a63217fa791",
    "test": "148fa40d251684727782a43b1de0fec70c5a78522327e20b9a7f72e4ff997342",
}


def read_lines(directory: Path) -> list[str]:
    lines: list[str] = []
    for name in SOURCES:
        with lzma.open(directory / name, "rt", encoding="ascii") as handle:
            lines += [line for line in handle.read().splitlines() if line.strip()]
    return lines


def make_splits(lines: list[str]) -> dict[str, bytes]:
    """The three split files' contents, from the 5000 source lines (TRAIN first, then TEST)."""
    labels = np.array([float(line.split()[0]) for line in lines])
    normal = np.flatnonzero(labels == NORMAL_LABEL)
    anomalous = np.flatnonzero(labels != NORMAL_LABEL)
    rng = np.random.default_rng(SEED)
    normal = rng.permutation(normal)
    n_calibration = round(len(normal) * CALIBRATION_FRACTION)
    n_test = round(len(normal) * TEST_NORMAL_FRACTION)
    n_train = len(normal) - n_calibration - n_test
    anomalous = rng.permutation(anomalous)
    test = np.concatenate([normal[n_train + n_calibration :], anomalous])
    rows = {
        "train_normal": normal[:n_train],
        "calibration_normal": normal[n_train : n_train + n_calibration],
        "test": test[rng.permutation(len(test))],
    }
    return {name: "".join(_line(lines[i]) for i in index).encode("ascii") for name, index in rows.items()}


def _line(source: str) -> str:
    return "".join("  " + field for field in source.split()) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed splits, write nothing")
    parser.add_argument("--directory", type=Path, default=HERE, help="the UCR files' folder (default: this script's)")
    args = parser.parse_args(argv)
    splits = make_splits(read_lines(args.directory))
    failed = False
    for name, content in splits.items():
        digest = hashlib.sha256(content).hexdigest()
        rows = content.count(b"\n")
        path = args.directory / "splits" / f"{name}.txt.xz"
        if digest != EXPECTED_SHA256[name]:
            print(f"{name}: sha256 {digest}, expected {EXPECTED_SHA256[name]}", file=sys.stderr)
            failed = True
        elif args.check:
            same = path.is_file() and lzma.decompress(path.read_bytes()) == content
            print(f"{path}: {'identical' if same else 'DIFFERENT'} ({rows} rows, sha256 {digest})")
            failed |= not same
        else:
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(lzma.compress(content, preset=9 | lzma.PRESET_EXTREME))
            print(f"{path}: {rows} rows, sha256 {digest}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
