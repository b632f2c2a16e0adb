"""Beat-mode data: recordings and WFDB annotation files in, labelled beat windows and detector figures out.

An annotation file is CSV with the header `sample,symbol` (more columns are allowed and ignored), one row per
annotation; `sample` indexes the recording, `symbol` is the WFDB code. Found beats are matched to annotated
beats within 150 ms (the standard window of ANSI/AAMI EC57), each used once, nearest first.

AAMI classes (ANSI/AAMI EC57): normal N = `N L R e j`; anomalous S = `A a J S`, V = `V E`, F = `F`;
Q = `/ f Q ?` and unmatched beats are not scored. The anomaly decision is one label, anomalous or not, so a class's
sensitivity is the share of its beats flagged anomalous (whatever the class the model would have said), the
normal class's figure the share of its beats flagged, and the alerts' positive predictivity the share of flagged
beats that are S, V or F (`aami_figures`).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from monitor.ecg.beats import Beat, BeatSpec, BeatStream
from monitor.ecg.qrs import match_beats
from monitor.errors import DataError
from monitor.training.datasets import file_sha256, read_named_samples

AAMI_CLASSES = {"N": "NLRej", "S": "AaJS", "V": "VE", "F": "F", "Q": "/fQ?"}
BEAT_SYMBOLS = frozenset("NLRBAaJSVrFejnE/fQ?")  # every WFDB beat code; the rest (+ ~ | x ...) are not beats
DEFAULT_NORMAL_SYMBOLS = ("N", "L", "R", "e", "j")
ANOMALOUS_CLASSES = ("S", "V", "F")
SCORED_CLASSES = ("N", *ANOMALOUS_CLASSES)
MATCH_SECONDS = 0.15
CUT_CHUNK_SECONDS = 60.0  # recordings are fed in chunks of this length, so the progress bar moves


def aami_class(symbol: str) -> str:
    """The AAMI class of a WFDB beat code, or '' for a code outside the five classes."""
    for name, codes in AAMI_CLASSES.items():
        if len(symbol) == 1 and symbol in codes:  # '' (a found beat matching no annotation) is in every string
            return name
    return ""


def read_annotations(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(sample indices int64, symbols str) of a `sample,symbol` CSV; a bad row is a DataError naming its line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    samples: list[int] = []
    symbols: list[str] = []
    with path.open(newline="", encoding="utf-8", errors="replace") as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        if header[:2] != ["sample", "symbol"]:
            raise DataError(
                f"{path}: line 1: the header must start with sample,symbol (got {','.join(header) or 'nothing'})"
            )
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) < 2:
                raise DataError(f"{path}: line {line}: needs a sample and a symbol, got {','.join(row)!r}")
            try:
                sample = int(row[0])
            except ValueError:
                raise DataError(f"{path}: line {line}: sample {row[0]!r} is not a whole number") from None
            symbol = row[1].strip()
            if sample < 0 or not symbol:
                raise DataError(
                    f"{path}: line {line}: sample must be >= 0 and symbol not empty, got {row[0]!r}, {row[1]!r}"
                )
            if samples and sample < samples[-1]:
                raise DataError(f"{path}: line {line}: sample {sample} comes before the previous row's {samples[-1]}")
            samples.append(sample)
            symbols.append(symbol)
    return np.asarray(samples, dtype=np.int64), np.asarray(symbols, dtype=str)


@dataclass(frozen=True)
class Recording:
    """One lead (1-D float) at `fs` Hz, with its annotations when given."""

    signal: np.ndarray
    fs: float
    source: str
    sha256: str
    ann_samples: np.ndarray | None = None
    ann_symbols: np.ndarray | None = None
    channel_names: tuple[str, ...] | None = None  # the lead's name, from a CSV recording's header

    def reference_beats(self) -> tuple[np.ndarray, np.ndarray]:
        """(sample indices, symbols) of the annotated beats (every beat code)."""
        if self.ann_samples is None or self.ann_symbols is None:
            raise DataError(f"{self.source}: has no annotations")
        beats = np.isin(self.ann_symbols, sorted(BEAT_SYMBOLS))
        return self.ann_samples[beats], self.ann_symbols[beats]


def read_recording(
    path: str | Path, fs: float, annotations: str | Path | None = None, channel_names: Sequence[str] | None = None
) -> Recording:
    """A `.npy`/`.csv` recording of shape `[T]` (or `[T, 1]`) and, optionally, its annotation file; a CSV header
    must name `channel_names` (the model's lead, when it recorded one)."""
    values, names = read_named_samples(path, channel_names)
    if values.shape[1] != 1:
        raise DataError(f"{path}: beat mode takes one lead, shape [T]; got {values.shape[1]} channels")
    ann_samples = ann_symbols = None
    if annotations is not None:
        ann_samples, ann_symbols = read_annotations(annotations)
        if len(ann_samples) and ann_samples[-1] >= len(values):
            raise DataError(
                f"{annotations}: sample {int(ann_samples[-1])} is beyond the recording's {len(values)} samples"
            )
    signal = values[:, 0].astype(np.float64)
    return Recording(signal, float(fs), str(path), file_sha256(Path(path)), ann_samples, ann_symbols, names)


def pair_files(recordings: Sequence[Path], annotations: Sequence[Path] | None) -> list[tuple[Path, Path | None]]:
    """Recordings with their annotation files, in the same order; the counts must agree."""
    if annotations and len(annotations) != len(recordings):
        raise DataError(
            f"{len(recordings)} recordings but {len(annotations)} annotation files; "
            "give one per recording, in the same order"
        )
    if not annotations:
        return [(path, None) for path in recordings]
    return list(zip(recordings, annotations, strict=True))


def cut_recording(recording: Recording, spec: BeatSpec, progress: tqdm | None = None) -> list[Beat]:
    """Every beat of a recording, cut exactly as the daemon cuts the same stream (chunks do not matter)."""
    stream = BeatStream(recording.fs, spec)
    chunk = max(1, int(CUT_CHUNK_SECONDS * recording.fs))
    beats: list[Beat] = []
    for start in range(0, len(recording.signal), chunk):
        beats.extend(stream.feed(recording.signal[start : start + chunk]))
        if progress is not None:
            progress.update(min(chunk, len(recording.signal) - start))
    return beats


@dataclass(frozen=True)
class LabelledBeats:
    """Beats of one recording with the annotation each matched ('' when none)."""

    beats: list[Beat]
    symbols: np.ndarray  # str [n]
    detected: int  # annotated beats matched by a found beat
    missed: int  # annotated beats with no found beat
    extra: int  # found beats with no annotated beat

    @property
    def classes(self) -> np.ndarray:
        return np.asarray([aami_class(symbol) for symbol in self.symbols.tolist()], dtype=str)

    @property
    def windows(self) -> np.ndarray:
        return np.stack([beat.window for beat in self.beats]) if self.beats else np.zeros((0, 0, 0), np.float32)

    @property
    def scorable(self) -> np.ndarray:
        return np.asarray([beat.scorable for beat in self.beats], dtype=bool)

    @property
    def r_seq(self) -> np.ndarray:
        return np.asarray([beat.r_seq for beat in self.beats], dtype=np.int64)

    @property
    def prematurity(self) -> np.ndarray:
        return np.asarray([beat.prematurity for beat in self.beats], dtype=np.float64)

    @property
    def stretch(self) -> np.ndarray:
        return np.asarray([beat.stretch for beat in self.beats], dtype=np.float64)

    @property
    def rr_spread(self) -> np.ndarray:
        return np.asarray([beat.rr_spread for beat in self.beats], dtype=np.float64)

    @property
    def earliness(self) -> np.ndarray:
        return np.asarray([beat.earliness for beat in self.beats], dtype=np.float64)

    @property
    def qrs_correlation(self) -> np.ndarray:
        return np.asarray([beat.qrs_correlation for beat in self.beats], dtype=np.float64)


def label_beats(recording: Recording, beats: list[Beat]) -> LabelledBeats:
    """Matches found beats to annotated ones (150 ms) and labels each found beat with its annotation."""
    reference, symbols_ref = recording.reference_beats()
    found = np.asarray([beat.r_seq for beat in beats], dtype=np.int64)
    match, used = match_beats(found, reference, int(round(MATCH_SECONDS * recording.fs)))
    symbols = np.full(len(beats), "", dtype="<U1")
    symbols[match[match >= 0]] = symbols_ref[match >= 0]
    detected = int((match >= 0).sum())
    return LabelledBeats(beats, symbols, detected, len(reference) - detected, int((~used).sum()))


def load_labelled(
    files: Sequence[tuple[Path, Path | None]],
    fs: float,
    spec: BeatSpec,
    description: str = "cutting beats",
    channel_names: Sequence[str] | None = None,
) -> list[tuple[Recording, LabelledBeats | list[Beat]]]:
    """Reads and cuts every recording with a progress bar; labels the beats of those with annotations."""
    recordings = [read_recording(path, fs, annotations, channel_names) for path, annotations in files]
    out: list[tuple[Recording, LabelledBeats | list[Beat]]] = []
    with tqdm(
        total=sum(len(r.signal) for r in recordings),
        desc=description,
        unit="sample",
        unit_scale=True,
        dynamic_ncols=True,
    ) as bar:
        for recording in recordings:
            beats = cut_recording(recording, spec, bar)
            out.append((recording, beats if recording.ann_samples is None else label_beats(recording, beats)))
    return out


def aami_counts(labelled: LabelledBeats, flagged: np.ndarray) -> dict[str, int]:
    """One recording's counts in ANSI/AAMI EC57 terms (module docstring): the detector's annotated, detected and
    extra beats; per class its matched beats, those flagged and those left unscored; every flagged found beat."""
    classes = labelled.classes
    unscorable = ~labelled.scorable
    counts = {
        "qrs_annotated": labelled.detected + labelled.missed,
        "qrs_detected": labelled.detected,
        "qrs_extra": labelled.extra,
        "flagged": int(flagged.sum()),
    }
    for name in SCORED_CLASSES:
        members = classes == name
        counts[f"{name}_beats"] = int(members.sum())
        counts[f"{name}_flagged"] = int((flagged & members).sum())
        counts[f"{name}_unscorable"] = int((unscorable & members).sum())
    return counts


def aami_figures(counts: dict[str, int]) -> dict[str, float | int | None]:
    """The counts with their rates (None where there is nothing to divide by): the detector's Se and +P, the Se of
    each anomalous class (beats flagged, unscored beats counted as missed), the share of normal beats flagged, and
    the +P of the alerts (flagged S, V and F beats / every flagged beat, Q and unmatched ones included)."""

    def share(part: int, whole: int) -> float | None:
        return part / whole if whole else None

    ectopic = sum(counts[f"{name}_flagged"] for name in ANOMALOUS_CLASSES)
    return {
        **counts,
        "qrs_se": share(counts["qrs_detected"], counts["qrs_annotated"]),
        "qrs_ppv": share(counts["qrs_detected"], counts["qrs_detected"] + counts["qrs_extra"]),
        **{f"{name}_se": share(counts[f"{name}_flagged"], counts[f"{name}_beats"]) for name in ANOMALOUS_CLASSES},
        "normal_flagged": share(counts["N_flagged"], counts["N_beats"]),
        "alert_ppv": share(ectopic, counts["flagged"]),
    }


def gross_counts(rows: Sequence[dict[str, int]]) -> dict[str, int]:
    """Gross figures' counts: every recording's counts summed (EC57's gross statistics weight beats, not records)."""
    return {key: sum(int(row[key]) for row in rows) for key in rows[0]}
