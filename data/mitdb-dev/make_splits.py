"""Rebuilds this directory's files from the mitdb-dev set (its `.npz` files), as they were made:

    python data/mitdb-dev/make_splits.py --source PATH/TO/mitdb-dev

Each recording is split at 600 s (100 s for the 5-minute 208 excerpt): `train/<rec>.npy` holds the first part,
`test/<rec>.npy` the rest; `<rec>.csv` beside each holds that part's annotations (`sample,symbol`, positions
relative to the part's first sample). Signals are int16 in ADC units above the ADC zero, i.e. round(mV * 200):
the original 11-bit values, exactly (beat mode normalises every beat, so the unit does not matter).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

RECORDS = ("105", "108", "114", "116", "121", "123", "208_excerpt")
SPLIT_SECONDS = {"208_excerpt": 100}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="the mitdb-dev directory with the .npz files")
    args = parser.parse_args()
    here = Path(__file__).resolve().parent
    for name in RECORDS:
        with np.load(args.source / f"{name}.npz") as z:
            signal, fs = z["signal"], int(z["fs"])
            samples, symbols = z["ann_sample"], z["ann_symbol"]
        adc = np.rint(signal.astype(np.float64) * 200).astype(np.int16)
        split = SPLIT_SECONDS.get(name, 600) * fs
        for part, lo, hi in (("train", 0, split), ("test", split, len(adc))):
            (here / part).mkdir(exist_ok=True)
            np.save(here / part / f"{name}.npy", adc[lo:hi])
            keep = (samples >= lo) & (samples < hi)
            with (here / part / f"{name}.csv").open("w", newline="") as handle:
                writer = csv.writer(handle, lineterminator="\n")
                writer.writerow(["sample", "symbol"])
                writer.writerows(zip((samples[keep] - lo).tolist(), symbols[keep].tolist(), strict=True))


if __name__ == "__main__":
    main()
