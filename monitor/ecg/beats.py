"""Beat windows: from a raw lead to one fixed-length, per-beat normalised window per detected R peak.

One code path for training, `monitor evaluate` and the daemon: each feeds a sensor's samples to a `BeatStream`
(the whole recording at once offline, message by message in the daemon) and gets the same `Beat`s, because
the detector and everything here depend only on the sample sequence.

A beat's window (`BeatSpec`): the span [R - before, R + after) seconds around its R peak, linearly resampled
to W points, so one model fits any sampling rate. Channels (`BeatSpec.channels`):

- `beat`: the span z-normalised on its own (mean 0, std 1): amplitude and offset do not matter;
- `template_diff`: `beat` minus the sensor's template, the point-wise median of its last `template_beats`
  beats of its dominant rhythm (below; before this one). One patient's normal beat does not describe another's;
  the difference from the sensor's own usual beat does;
- `rr`: RR / the sensor's reference RR, minus 1, the same value at every point (0 for a sensor's first beat): the
  reference is the median of the RR intervals before its last 8 dominant-rhythm beats. Premature
  supraventricular beats look normal but come early;
- `prematurity`: the same, but only how early a beat is, max(0, 1 - RR / median): a late beat is not
  abnormal by its timing (the normal beat after a PVC's compensatory pause is late by 30-70 %; with the signed
  `rr` channel those beats were most of the normal beats flagged on the 208 excerpt, bench/beat_quality.py).
- Detrending (`detrend`): the span's least-squares line is subtracted before the z-score. Electrode motion and
  breathing move the baseline by as much as the QRS within one span (MIT-BIH 105, 121); z-normalised, such a
  normal beat differs from its template by a tilt, and tilted normal beats were most of the normal beats flagged
  there (bench/beat_quality.py).
- Alignment (`align_seconds`): the fiducial point the detector gives (the largest band-passed deflection)
  jumps between the R and the S wave, or to a tall P wave, from one beat to the next (MIT-BIH 108, and 114's
  lead V5): the span is then cut ~50 ms off and differs from the template although the beat is normal. Each
  span is moved by the shift within +-align_seconds that brings it closest to the template (in squared
  distance of the z-normalised spans, i.e. the highest correlation), as Holter software aligns a beat to its
  class template before comparing (the template itself is the median of unaligned spans, see `_aligned`).
  The alerted `beat_seq` stays the detector's R peak.

The dominant rhythm (`dominant`): the template and the reference RR are learned only from the beats judged
normal, those whose distance from the template (RMS of `template_diff`) is at most `normal_distance`; an ectopic
beat feeds neither. A template of every clean beat sits between the normal and the ectopic shape in bigeminy
(ectopic beats are then about half of its beats): normal beats differ from it and ectopic beats less.
- Warm-up: the first `warmup_beats` clean beats are held; the template starts as the largest group among them, the
  beats within `normal_distance` of the beat with most such neighbours (its RR reference from the intervals before
  them), so a stream starting in trigeminy learns its normal beats; in bigeminy, where both groups are as large,
  the group whose beats came later after the beat before them (ectopic beats come early). A stream starting
  inside a longer ectopic run learns the run, and gets out of it by the relearn below.
- Relearn (the way out): when fewer than `relearn_share` of the last `relearn_beats` clean beats were judged
  normal, the template and the RR reference are forgotten and the warm-up starts again (`BeatStream.relearns`,
  counted and logged by the daemon). A lead moved or a morphology that really changed then becomes the new
  dominant rhythm instead of every later beat being flagged; a run of ectopic beats as long as `relearn_beats`
  does too, once it has been flagged that long.
Without `dominant` (models from before it) the template and the RR history take every clean beat.

Timing (`timing_gain`): the autoencoder reconstructs a constant prematurity channel well at small values, so a beat
that is 15-25 % early scores little more than a normal one. A beat's score is therefore at least
`timing_gain` * its timing, the timing being its prematurity divided by the sensor's own normal RR spread
(`rr_spread`): the median of |RR / reference RR - 1| over the last `rr_spread_beats` beats whose RR fed the
reference (the warm-up group's to start with), at least `rr_spread_floor`. A sensor with sinus arrhythmia, whose
normal beats come up to a fifth early with each breath, thus needs a larger departure to score by timing than a
sensor whose rhythm is regular, where a beat 10 % early already stands out. Training calibrates the threshold on
the normal calibration beats' reconstruction errors (divided by their stretch scale, below) and sets the gain so that
the normal fit beats' timing at `timing_quantile` scores as much as that threshold (`BeatSpec.beat_scores`
combines the two). Without a floor (models from before the spread) the timing is the prematurity itself.

The interval after the beat (`next_beat_seconds`): a premature beat is followed by a pause (a full compensatory
one after a V beat), whereas a rhythm that sped up (sinus arrhythmia) goes on at its new pace, and an extra
detection (noise, a tall T wave) splits one normal interval in two. With `next_beat_seconds` a beat is cut only
once the next beat is detected, or once that long has passed without one (the decision waits at most that long
plus the detector's look-ahead), and the timing uses its `earliness` instead of its prematurity: at most how
much shorter its interval is than the next one (1 - RR / next RR), and, when its interval and the one before
together come within INTERPOSED_TOLERANCE of the reference RR (the beat before was interposed: an extra detection
or an interpolated beat), at most the prematurity of the two together. The model's channels do not change. Without
it (models from before it) a beat is cut as soon as its span is complete and its earliness is its prematurity.

Signal quality: a beat is scored only if it is judged scorable:

- `warmup`: the sensor has no template yet (`dominant`: its warm-up is not complete after a start, a reset or a
  relearn; else fewer than `warmup_beats` beats in its template);
- `flat`: the span has no variation (a disconnected lead);
- `noise`: its noise ratio is above `max_noise_ratio`, or above `relative_noise` times the median noise ratio
  of the sensor's last `NOISE_HISTORY` beats. The noise ratio is the median |QRS-band signal| (the detector's
  5-15 Hz band) over [R - 1 s, R + 0.3 s] divided by the median QRS-band peak of the sensor's last 8 beats.
  The median over 1.3 s ignores the QRS complexes in it (they fill about a tenth of it) and measures the
  floor between them, where muscle noise and electrode motion put QRS-band energy and P and T waves little;
  dividing by the sensor's usual QRS peak (not this beat's) keeps a wide ectopic beat, whose own band peak is
  low, from being taken for noise. The absolute limit catches a sensor noisy from its start, the relative one
  a noisy stretch of a sensor whose usual floor is higher (lead V5, small QRS).
  Learning is stricter than scoring (`learn_max_noise_ratio`, `learn_relative_noise`): a beat above those limits
  but within the scoring ones is scored (`Beat.noisy`), but feeds neither the template, the RR reference nor the
  judgement of the dominant rhythm, and training leaves it out. A wide ectopic beat's own QRS band and that of the
  beat before it fill more of the 1.3 s than a narrow beat's (MIT-BIH 208: about twice the noise ratio of its
  normal beats), so the limits that keep the template clean would leave such a beat unscored. Without them (models
  from before) both are the scoring limits.

Noisy stretches (`stretch_limit`): a beat's `stretch` is the smallest distance from the template (RMS of
`template_diff`) among the STRETCH_BEATS beats before it that had a template (with `dominant`; the median without).
A beat cut without a template (warm-up) has no distance from one: after a relearn the first beats are measured
against the beats that made the sensor relearn, which differed from its template, not against a distance of 0
(with it, the beats right after a relearn were never scored leniently). One odd beat among
usual ones has a small stretch, and so has a beat in bigeminy or in couplets, since one of the beats before it is
normal; a beat in a stretch where every beat differs from the template (electrode motion slower than the QRS band,
which the noise ratio does not see) has a large one, and its reconstruction error is then mostly that disturbance.
The score is the error divided by `error_scale` = max(1, stretch / stretch_limit), so the threshold rises in
proportion in such a stretch instead of the beat going unscored: an ectopic beat there still alerts if it stands
out by more. Training sets the limit to a quantile (`stretch_quantile`) of the stretch of its normal beats; the same
division applies to calibration, `monitor evaluate` and the daemon. The false alarms it removes and the recall it
costs on MIT-BIH are in bench/beat_quality.py's results.

The QRS part (`qrs_correlation`): electrode motion also moves the baseline within a single beat's span, its
neighbours clean (MIT-BIH 105), so the stretch does not see it; the span then differs from the template although its
QRS complex does not. Arrhythmia monitors classify a beat by its QRS complex and leave the rest (ST segment, T wave,
baseline) out of the comparison; ectopic beats are other QRS complexes (a V beat's is wide, differently shaped). A
beat's `qrs_correlation` is Pearson's correlation of its span's QRS part (QRS_SECONDS around the aligned fiducial
point) with the template's (0 without a template: nothing to match, no leniency), and its error is further divided
by its QRS scale, (1 - the spec's `qrs_correlation`) / (1 - its own), at least 1: a beat whose QRS matches the
template's closely needs a much larger reconstruction error to alert by its shape; one whose QRS correlates less
than `qrs_correlation` is scored as before. Premature beats with a normal QRS (S) alert by their timing, which the
scale does not touch. `error_scale` is the product of the two scales; the threshold is calibrated on the calibration
beats' errors divided by their stretch scale only (divided by the QRS scale too, it would fall with it, and flag as
many normal beats as before). The recipe's value and the false alarms it removes come from leave-one-record-out
(bench/beat_loro.py). Without it (models from before) the QRS scale is 1.

Other normal classes (`normal_classes`, with `dominant` and `next_beat_seconds`): a sensor's normal beats need not
all have one shape. When the lead's axis moves with breathing, a few beats in a row have a taller R wave (MIT-BIH
114, lead V5): they differ from the template as much as the sensor's ectopic beats do, in their QRS part too, so
neither the distance nor the QRS scale tells them apart. Holter software keeps several classes of the dominant
rhythm; the stream keeps up to `normal_classes` besides the template, each formed only by beats that persist and
come on time: `class_run` clean beats in a row off the template (farther than `normal_distance`), each within
`normal_distance` of the first of them (as aligned to the template), none of them early, or followed by an interval
longer than its own, by more than `class_timing` times the sensor's normal RR spread (at least `rr_spread_floor`; a
beat with no next one within `next_beat_seconds` was followed by a pause). A class's template is the median of its
last `template_beats` members (spans at the fiducial point, as the template's); a later beat off the template, as
timed and within `normal_distance` of a class's template, joins that class; a new class takes the place of the one
joined longest ago. A beat nearer to a class's template than to the dominant one is compared with that class:
aligned to it, its `template_diff` is its difference from it and its `qrs_correlation` is with its QRS part. The
dominant rhythm is untouched: its template, the RR reference and spread, the judgement (`Beat.normal`), the stretch
and the relearn (which forgets the classes too) are as without classes. What must not become a class is an ectopic
rhythm: a contaminated template hides ectopic beats (the dominant rhythm above). In bigeminy the ectopic beats never
come in a row; couplets and V beats with a compensatory pause are early or followed by a pause. With `class_run` 2,
a pair of fusion beats on time formed a class on the 208 excerpt that its V beats then joined (docs/user-guide.md,
leave-one-record-out); a run of ectopic beats at the sinus rate (an idioventricular rhythm) does form one. Without
it (models from before) the template is the only class.
"""

from __future__ import annotations

import functools
import statistics
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monitor.ecg.qrs import QRSDetector
from monitor.errors import ArtifactError
from monitor.window import decode_array, encode_array

CHANNELS = ("beat", "template_diff", "rr", "prematurity")
QRS_HALF_SECONDS = 0.06
NOISE_BEFORE_SECONDS = 1.0
NOISE_AFTER_SECONDS = 0.3  # the QRS band lags the raw signal by 0.125 s: up to here it is there when the beat is cut
NOISE_HISTORY = 64
PEAK_HISTORY = 8
RR_HISTORY = 8
STRETCH_BEATS = 4
QRS_SECONDS = (-0.06, 0.08)  # the QRS part of a beat's span (around its R peak) that `Beat.qrs_correlation` compares
MAX_ALIGN_STEPS = 32  # shifts tried on each side at most (every sample up to 32 samples, coarser beyond)
UNSCORABLE_REASONS = ("warmup", "flat", "noise")
INTERPOSED_TOLERANCE = 0.15  # two intervals within this of the reference RR together: the beat between was interposed


@dataclass(frozen=True)
class BeatSpec:
    """How beats are cut; recorded in the artifact so the daemon cuts them as the model was trained."""

    before_seconds: float = 0.25
    after_seconds: float = 0.45
    window: int = 64
    channels: tuple[str, ...] = ("beat", "template_diff", "prematurity")
    template_beats: int = 16
    warmup_beats: int = 8
    max_noise_ratio: float = 0.25
    relative_noise: float = 2.0
    learn_max_noise_ratio: float | None = None  # a beat noisier than these is scored but not learned from (module
    learn_relative_noise: float | None = None  # doc); None: the scoring limits above
    align_seconds: float = 0.05  # template alignment search, +-; 0 = the detector's fiducial point as it is
    detrend: bool = True  # subtract the span's least-squares line before the z-score (baseline wander)
    stretch_limit: float | None = None  # set by training; None: scores are not scaled by the stretch (module doc)
    dominant: bool = False  # template and RR reference from the beats judged normal only (module doc)
    normal_distance: float = 0.5  # a beat at most this far from the template (RMS) is judged normal
    relearn_beats: int = 64  # the relearn looks at this many last clean beats ...
    relearn_share: float = 0.1  # ... and starts again when fewer than this share of them were judged normal
    timing_gain: float | None = None  # set by training; a beat scores at least timing_gain * its timing (module doc)
    rr_spread_beats: int = 32  # the sensor's normal RR spread is measured over this many last normal beats ...
    rr_spread_floor: float | None = None  # ... and taken as at least this; None: prematurity is not divided by it
    next_beat_seconds: float | None = None  # a beat waits up to this long for the next (module doc); None: no wait
    qrs_correlation: float | None = None  # a beat whose QRS correlates more with the template's is scored leniently
    normal_classes: int = 0  # other normal classes kept besides the template (module doc; with `dominant` and
    # `next_beat_seconds` only)
    class_run: int = 3  # ... each formed by this many similar, normally timed beats in a row off the template
    class_timing: float = 3.0  # normally timed: early, and the next interval longer, by at most this many RR spreads

    def __post_init__(self) -> None:
        if not (0 < self.before_seconds <= 1 and 0 < self.after_seconds <= 1 and self.window >= 8):
            raise ValueError(
                f"beat span and window out of range: {self.before_seconds}, {self.after_seconds}, {self.window}"
            )
        unknown = [name for name in self.channels if name not in CHANNELS]
        if unknown or not self.channels or len(set(self.channels)) != len(self.channels):
            raise ValueError(
                f"beat channels must be distinct names among {', '.join(CHANNELS)}, got {list(self.channels)}"
            )
        if (
            self.template_beats < 1
            or not 0 <= self.warmup_beats <= self.template_beats
            or not self.max_noise_ratio > 0
            or not self.relative_noise > 0
            or not (self.learn_max_noise_ratio is None or 0 < self.learn_max_noise_ratio <= self.max_noise_ratio)
            or not (self.learn_relative_noise is None or 0 < self.learn_relative_noise <= self.relative_noise)
            or not 0 <= self.align_seconds <= 0.2
            or not (self.stretch_limit is None or self.stretch_limit > 0)
            or not self.normal_distance > 0
            or self.relearn_beats < 1
            or not 0 <= self.relearn_share <= 1
            or not (self.timing_gain is None or self.timing_gain >= 0)
            or self.rr_spread_beats < 1
            or not (self.rr_spread_floor is None or self.rr_spread_floor > 0)
            or not (self.next_beat_seconds is None or 0 < self.next_beat_seconds <= 5)
            or not (self.qrs_correlation is None or -1 < self.qrs_correlation < 1)
            or self.normal_classes < 0
            or self.class_run < 2
            or not self.class_timing > 0
        ):
            raise ValueError(
                "template_beats >= 1, 0 <= warmup_beats <= template_beats, noise limits > 0 (the learning ones at "
                "most the scoring ones), "
                "0 <= align_seconds <= 0.2, stretch_limit > 0 (or none), normal_distance > 0, relearn_beats >= 1, "
                "0 <= relearn_share <= 1, timing_gain >= 0 (or none), rr_spread_beats >= 1, "
                "rr_spread_floor > 0 (or none), 0 < next_beat_seconds <= 5 (or none), -1 < qrs_correlation < 1 "
                "(or none), normal_classes >= 0, class_run >= 2 and class_timing > 0 are required"
            )

    def stretch_scale(self, stretch: np.ndarray | float) -> np.ndarray:
        """The noisy stretch's part of the error scale: stretch / stretch_limit, at least 1 (always 1 without a
        limit)."""
        stretch = np.asarray(stretch, dtype=np.float64)
        return np.ones_like(stretch) if self.stretch_limit is None else np.maximum(1.0, stretch / self.stretch_limit)

    def error_scale(self, stretch: np.ndarray | float, qrs_correlation: np.ndarray | float) -> np.ndarray:
        """What a beat's reconstruction error is divided by before the threshold: its stretch scale times its QRS
        scale, (1 - the spec's qrs_correlation) / (1 - the beat's), each at least 1 (module doc; 1 without a stretch
        limit and a QRS correlation)."""
        scale = self.stretch_scale(stretch)
        if self.qrs_correlation is None:
            return scale
        apart = np.maximum(1.0 - np.asarray(qrs_correlation, dtype=np.float64), 1e-9)
        return scale * np.maximum(1.0, (1.0 - self.qrs_correlation) / apart)

    def timing_score(self, earliness: np.ndarray | float, rr_spread: np.ndarray | float) -> np.ndarray:
        """The least score a beat gets from its timing alone: timing_gain * its earliness (`Beat.earliness`) divided
        by the sensor's normal RR spread (at least `rr_spread_floor`; not divided without a floor); 0 without a
        gain."""
        earliness = np.asarray(earliness, dtype=np.float64)
        if self.timing_gain is None:
            return np.zeros_like(earliness)
        if self.rr_spread_floor is None:
            return self.timing_gain * earliness
        return self.timing_gain * earliness / np.maximum(self.rr_spread_floor, rr_spread)

    def beat_scores(
        self,
        errors: np.ndarray,
        stretch: np.ndarray,
        qrs_correlation: np.ndarray,
        earliness: np.ndarray,
        rr_spread: np.ndarray,
    ) -> np.ndarray:
        """Beats' scores: reconstruction error / error scale, at least the timing score (module doc)."""
        shape = np.asarray(errors) / self.error_scale(stretch, qrs_correlation)
        return np.maximum(shape, self.timing_score(earliness, rr_spread))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["channels"] = list(self.channels)
        if self.qrs_correlation is None:  # as a spec from before it wrote itself (a saved state's spec compares equal)
            del data["qrs_correlation"]
        if self.normal_classes == 0:  # as a spec from before them wrote itself
            for key in ("normal_classes", "class_run", "class_timing"):
                del data[key]
        return {"mode": "beats", **data, "resampling": "linear", "normalisation": "per-beat z-score"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BeatSpec:
        keys = {
            "before_seconds",
            "after_seconds",
            "window",
            "channels",
            "template_beats",
            "warmup_beats",
            "max_noise_ratio",
            "relative_noise",
            "learn_max_noise_ratio",
            "learn_relative_noise",
            "align_seconds",
            "detrend",
            "stretch_limit",
            "dominant",
            "normal_distance",
            "relearn_beats",
            "relearn_share",
            "timing_gain",
            "rr_spread_beats",
            "rr_spread_floor",
            "next_beat_seconds",
            "qrs_correlation",
            "normal_classes",
            "class_run",
            "class_timing",
        }
        values = {key: data[key] for key in keys if key in data}
        values.setdefault("align_seconds", 0.0)  # artifacts from before alignment cut beats at the fiducial point
        values.setdefault("detrend", False)  # ... and did not detrend them
        if "channels" in values:
            values["channels"] = tuple(values["channels"])
        return cls(**values)


@dataclass(frozen=True, slots=True, eq=False)
class Beat:
    """One beat of a sensor's stream; `window` is `[W, C]` float32, `reason` None when scorable."""

    index: int  # the beat's number in its stream (since the start or the last reset)
    r_seq: int  # absolute sample index of the R peak
    rr_seconds: float | None
    start_seq: int  # first sample of the span the window covers
    end_seq: int  # exclusive end of that span
    window: np.ndarray
    reason: str | None
    noise_ratio: float
    noisy: bool  # above the learning noise limits (scored if within the scoring ones): not learned from
    stretch: float  # distance from the template of the STRETCH_BEATS beats with one before this (module doc)
    prematurity: float  # max(0, 1 - RR / the sensor's reference RR); 0 for its first beat
    normal: bool  # judged normal (dominant rhythm): the template and RR reference learned from it
    rr_spread: float  # the sensor's normal RR spread before this beat (module doc); 0 before it has one
    earliness: float  # what the timing scores: the prematurity, less when no pause follows (module doc)
    qrs_correlation: float  # of its QRS part with the template's (module doc); 0 without a template

    @property
    def scorable(self) -> bool:
        return self.reason is None


@dataclass
class BeatStream:
    """One sensor's stream from `origin` on: detector, raw and QRS-band history, template and RR history."""

    fs: float
    spec: BeatSpec
    origin: int = 0
    detector: QRSDetector = field(init=False)

    def __post_init__(self) -> None:
        self.detector = QRSDetector(self.fs)
        align = int(round(self.spec.align_seconds * self.fs))
        step = max(1, int(np.ceil(align / MAX_ALIGN_STEPS)))
        # candidate shifts of the fiducial point, nearest first, so a tie keeps the smaller shift
        self.shifts = np.array(sorted(range(-align, align + 1, step) if align else [0], key=lambda k: (abs(k), k)))
        self.before = int(np.ceil(self.spec.before_seconds * self.fs)) + 1 + align
        self.after = int(np.ceil(self.spec.after_seconds * self.fs)) + 1 + align
        self.offsets = (
            np.linspace(-self.spec.before_seconds, self.spec.after_seconds, self.spec.window, endpoint=False) * self.fs
        )
        self.qrs_half = int(round(QRS_HALF_SECONDS * self.fs))
        inside = np.flatnonzero((self.offsets >= QRS_SECONDS[0] * self.fs) & (self.offsets < QRS_SECONDS[1] * self.fs))
        # the window's points in QRS_SECONDS (none for a window too coarse to have one there: correlation 0)
        self._qrs_part = slice(int(inside[0]), int(inside[-1]) + 1) if inside.size else slice(0, 0)
        self._offset_floor = np.floor(self.offsets).astype(np.int64)
        self._offset_fraction = self.offsets - self._offset_floor
        ramp = np.linspace(-1.0, 1.0, self.spec.window)
        constant = np.full((1, self.spec.window), self.spec.window**-0.5)
        self._trend = np.vstack((constant, ramp / np.linalg.norm(ramp))) if self.spec.detrend else constant
        self.noise_before = int(round(NOISE_BEFORE_SECONDS * self.fs))
        self.noise_after = int(round(NOISE_AFTER_SECONDS * self.fs))
        self.lookahead = int(np.ceil(self.detector.lookahead_seconds * self.fs)) + 1
        seconds = self.spec.next_beat_seconds
        self.wait = None if seconds is None else int(round(seconds * self.fs))  # samples a beat waits for the next
        self._raw = np.zeros(0)  # raw samples from stream index self._raw_start on
        self._raw_start = 0
        self._band = np.zeros(0)  # QRS-band signal, delay removed: _band[i] belongs to raw index _raw_start + i
        self._pending: deque[int] = deque()  # R peaks (stream indices) waiting for their span to arrive
        self._templates: deque[np.ndarray] = deque(maxlen=self.spec.template_beats)
        self._rr: deque[int] = deque(maxlen=RR_HISTORY)
        # |RR / reference - 1| of the last beats whose RR fed the reference: the sensor's normal RR spread
        self._rr_deviation: deque[float] = deque(maxlen=self.spec.rr_spread_beats)
        self._peaks: deque[float] = deque(maxlen=PEAK_HISTORY)  # QRS-band peaks of the last beats
        self._noise: deque[float] = deque(maxlen=NOISE_HISTORY)  # noise ratios of the last beats
        self._distances: deque[float] = deque(maxlen=STRETCH_BEATS)  # the last beats' distances from the template
        self._last_r: int | None = None
        self._last_rr: int | None = None  # the interval before the last beat cut
        self.beats = 0
        self._warm: list[tuple[np.ndarray, int | None]] = []  # dominant: clean warm-up beats (shape, RR before it)
        self._judged: deque[bool] = deque(maxlen=self.spec.relearn_beats)  # dominant: the last clean beats, normal?
        self.relearns = 0  # times the dominant rhythm was forgotten and learned again
        self._classes: list[deque[np.ndarray]] = []  # the other normal classes' beats (spans at the fiducial point)
        self._joined: list[int] = []  # the number of the beat that last joined each
        self._class_templates: list[np.ndarray] = []  # each class's template (median), kept as its members change
        # the last similar, normally timed beats in a row off the template: (span at the fiducial point, aligned span)
        self._run: list[tuple[np.ndarray, np.ndarray]] = []

    @property
    def received(self) -> int:
        return self.detector.received

    @property
    def buffered_samples(self) -> int:
        """Raw samples held (about 1.5 s: the noise measure's look-back, the span and the detector's look-ahead;
        up to `next_beat_seconds` more while a beat waits for the next)."""
        return len(self._raw)

    def feed(self, samples: np.ndarray) -> list[Beat]:
        """Consumes the next samples (1-D, in the stream's order); returns the beats whose span is complete."""
        x = np.asarray(samples, dtype=np.float64).reshape(-1)
        peaks = self.detector.feed(x)
        self._raw = np.concatenate((self._raw, x))
        # band output n is the QRS band at raw index n - delay; the first `delay` outputs belong before the stream
        skip = max(0, self.detector.filters.bandpass_delay - (self.received - len(x)))
        self._band = np.concatenate((self._band, self.detector.last_band[skip:]))
        self._pending.extend(peaks)
        out: list[Beat] = []
        while self._pending and self._decidable(self._pending[0]):
            r = self._pending.popleft()
            out.append(self._cut(r, self._pending[0] - r if self._pending else None))
        self._trim()
        return out

    def _decidable(self, r: int) -> bool:
        """Whether the beat at r can be cut: its span is complete and, with `next_beat_seconds`, the next beat is
        detected or cannot come within that long any more. A beat the detector has not reported yet lies at most its
        look-ahead plus its fiducial search before the samples received, so the answer does not depend on how the
        stream was cut into messages."""
        if r + self.after > self.received:
            return False
        settled = r + self.wait + self.lookahead + self.detector.fiducial if self.wait is not None else r
        return len(self._pending) > 1 or self.received > settled

    def _earliness(self, rr: int | None, next_rr: int | None, reference: float | None, prematurity: float) -> float:
        """The beat's earliness (module doc): its prematurity, at most how much shorter its interval is than the
        next, and after an interposed beat at most the prematurity of its interval and the one before together."""
        if self.wait is None or rr is None or reference is None:
            return prematurity
        earliness = prematurity
        if next_rr is not None and next_rr <= self.wait:
            earliness = min(earliness, max(0.0, 1.0 - rr / next_rr))
        if self._last_rr is not None:
            together = (self._last_rr + rr) / reference
            if abs(together - 1.0) <= INTERPOSED_TOLERANCE:
                earliness = min(earliness, max(0.0, 1.0 - together))
        return earliness

    def _cut(self, r: int, next_rr: int | None = None) -> Beat:
        rr = None if self._last_r is None else r - self._last_r
        self._last_r = r
        template = _median(np.stack(self._templates)) if self._templates else None
        others = self._class_templates if template is not None else []  # classes only next to a template
        shift, shape, std, at_fiducial, nearest = self._aligned(r, template, others)
        noise, noisy, unscorable = self._noise_ratio(r)
        clean = std > 1e-9 and not noisy
        warming = template is None if self.spec.dominant else len(self._templates) < self.spec.warmup_beats
        if warming:
            reason = "warmup"
        elif std <= 1e-9:
            reason = "flat"
        elif unscorable:
            reason = "noise"
        else:
            reason = None
        diff = shape - (shape if template is None else template)
        distance = _rms(diff)
        qrs_correlation = 0.0 if template is None else _correlation(shape[self._qrs_part], template[self._qrs_part])
        reference = statistics.median(self._rr) if self._rr else None
        relative_rr = 0.0 if rr is None or reference is None else rr / reference - 1.0
        earliness = self._earliness(rr, next_rr, reference, max(0.0, -relative_rr))
        aligned = shape  # aligned to the template, for the classes' learning
        near_class, class_distance = None, np.inf  # the nearest other normal class
        for k, (other, (other_shift, other_shape)) in enumerate(zip(others, nearest, strict=True)):
            other_diff = other_shape - other
            other_distance = _rms(other_diff)
            if other_distance < class_distance:
                near_class, class_distance = k, other_distance
                if other_distance < distance:  # nearer than the template: the beat is compared with this class
                    shift, shape, diff = other_shift, other_shape, other_diff
                    qrs_correlation = _correlation(shape[self._qrs_part], other[self._qrs_part])
        self._last_rr = rr
        rr_spread = statistics.median(self._rr_deviation) if self._rr_deviation else 0.0
        channels = {
            "beat": shape,
            "template_diff": diff,
            "rr": np.full_like(shape, relative_rr),
            "prematurity": np.full_like(shape, max(0.0, -relative_rr)),
        }
        window = np.stack([channels[name] for name in self.spec.channels], axis=1).astype(np.float32)
        stretch = self._stretch()
        if template is not None:
            self._distances.append(distance)
        normal = False
        if not self.spec.dominant:
            if clean:
                self._templates.append(at_fiducial)
            if rr is not None:
                self._learn_rr(rr, relative_rr)
        elif clean and template is None:
            self._warm_up(at_fiducial, rr)
        elif clean:
            normal = distance <= self.spec.normal_distance
            if self.spec.normal_classes and not normal and self._normally_timed(rr, next_rr, relative_rr, rr_spread):
                self._learn_class(at_fiducial, aligned, near_class, class_distance)
            else:
                self._run.clear()
            self._judge(normal, at_fiducial, rr, relative_rr)
        else:
            self._run.clear()
        index, self.beats = self.beats, self.beats + 1
        start = self.origin + r + shift - int(round(self.spec.before_seconds * self.fs))
        end = self.origin + r + shift + int(round(self.spec.after_seconds * self.fs))
        rr_seconds = None if rr is None else rr / self.fs
        return Beat(
            index, self.origin + r, rr_seconds, max(start, self.origin), end, window, reason, noise, noisy, stretch,
            max(0.0, -relative_rr), normal, rr_spread, earliness, qrs_correlation,
        )  # fmt: skip

    def _normally_timed(self, rr: int | None, next_rr: int | None, relative_rr: float, rr_spread: float) -> bool:
        """Whether a beat came on time and no pause followed it: it is early, and the interval after it longer than
        its own, by at most `class_timing` times the sensor's normal RR spread (at least `rr_spread_floor`). A beat
        with no next one within `next_beat_seconds` was followed by a pause."""
        if rr is None or next_rr is None or self.wait is None or next_rr > self.wait:
            return False
        tolerance = self.spec.class_timing * max(self.spec.rr_spread_floor or 0.0, rr_spread)
        return -relative_rr <= tolerance and next_rr <= rr * (1.0 + tolerance)

    def _learn_class(
        self, shape: np.ndarray, aligned: np.ndarray, near_class: int | None, class_distance: float
    ) -> None:
        """Learns from a clean, normally timed beat off the template (module doc): it joins the nearest other normal
        class within `normal_distance`, else the run of such beats; `class_run` similar ones in a row form a class
        (in place of the class joined longest ago when there are `normal_classes`)."""
        if near_class is not None and class_distance <= self.spec.normal_distance:
            self._classes[near_class].append(shape)
            self._joined[near_class] = self.beats
            self._class_templates[near_class] = _median(np.stack(self._classes[near_class]))
            self._run.clear()
            return
        if self._run and _rms(aligned - self._run[0][1]) > self.spec.normal_distance:
            self._run.clear()
        self._run.append((shape, aligned))
        if len(self._run) < self.spec.class_run:
            return
        members = deque((held for held, _ in self._run), maxlen=self.spec.template_beats)
        self._run.clear()
        template = _median(np.stack(members))
        if len(self._classes) < self.spec.normal_classes:
            self._classes.append(members)
            self._joined.append(self.beats)
            self._class_templates.append(template)
        else:
            oldest = int(np.argmin(self._joined))
            self._classes[oldest], self._joined[oldest] = members, self.beats
            self._class_templates[oldest] = template

    def _learn_rr(self, rr: int, relative_rr: float) -> None:
        """Adds a normal beat's RR to the reference and, when there was a reference, its deviation to the spread."""
        if self._rr:
            self._rr_deviation.append(abs(relative_rr))
        self._rr.append(rr)

    def _stretch(self) -> float:
        """The stretch of the beat being cut (module doc): the smallest (dominant) or the median distance from the
        template of the beats before it."""
        if not self._distances:
            return 0.0
        return min(self._distances) if self.spec.dominant else statistics.median(self._distances)

    def _warm_up(self, shape: np.ndarray, rr: int | None) -> None:
        """Holds a clean warm-up beat; with `warmup_beats` of them, starts the template from their largest group."""
        self._warm.append((shape, rr))
        if len(self._warm) < max(1, self.spec.warmup_beats):
            return
        shapes = np.stack([held for held, _ in self._warm])
        distances = np.sqrt(((shapes[:, None, :] - shapes[None, :, :]) ** 2).mean(axis=2))
        close = distances <= self.spec.normal_distance
        # the beat with the most neighbours; of equal ones (bigeminy), that whose neighbours came latest (the
        # ectopic beats of a pattern are the premature ones)
        before = np.array([0 if rr is None else rr for _, rr in self._warm], dtype=np.float64)
        sizes = close.sum(axis=1)
        lateness = np.array([np.median(before[members]) for members in close])
        group = close[max(range(len(close)), key=lambda i: (sizes[i], lateness[i]))]
        self._templates.extend(shapes[group])
        intervals = [rr for (_, rr), member in zip(self._warm, group, strict=True) if member and rr is not None]
        self._rr.extend(intervals)
        if intervals:  # the spread starts as that of the group's intervals
            reference = statistics.median(self._rr)
            self._rr_deviation.extend(abs(rr / reference - 1.0) for rr in intervals)
        self._warm.clear()

    def _judge(self, normal: bool, shape: np.ndarray, rr: int | None, relative_rr: float) -> bool:
        """Learns from a clean beat judged normal; forgets the dominant rhythm when too few recent ones were."""
        self._judged.append(normal)
        if normal:
            self._templates.append(shape)
            if rr is not None:
                self._learn_rr(rr, relative_rr)
        elif len(self._judged) == self.spec.relearn_beats and sum(self._judged) < self.spec.relearn_share * len(
            self._judged
        ):
            self.relearns += 1
            self._templates.clear()
            self._classes.clear()
            self._joined.clear()
            self._class_templates.clear()
            self._run.clear()
            self._rr.clear()
            self._rr_deviation.clear()
            self._judged.clear()
        return normal

    def _aligned(
        self, r: int, template: np.ndarray | None, others: list[np.ndarray] | None = None
    ) -> tuple[int, np.ndarray, float, np.ndarray, list[tuple[int, np.ndarray]]]:
        """(shift, z-normalised span, its std, the z-normalised span at r itself, and the shift and span for each of
        the other classes' templates) of the beat at r, its fiducial point moved by the shift that brings the span
        closest to the sensor's template (squared distance of the z-normalised spans, i.e. the highest
        correlation), within +-align_seconds; without a template, shift 0.

        The template is the median of spans cut at the detector's fiducial points, not of aligned spans: the median
        sits where most beats' fiducial points put it, whereas a template of aligned spans could walk, a sample at
        a time, to the end of the search range (measured: it did, and the beat channel of one sensor then no
        longer lined up with another's)."""
        shifts = self.shifts if template is not None else self.shifts[:1]
        left = (r - self._raw_start) + shifts[:, None] + self._offset_floor  # linear interpolation, vectorised
        if left.min() >= 0:
            below = self._raw[left]
            spans = below + self._offset_fraction * (self._raw[left + 1] - below)
        else:  # a span starting before the stream: clamped to its first sample
            positions = np.maximum(left + self._offset_fraction, 0.0)
            spans = np.interp(positions, np.arange(len(self._raw)), self._raw)
        # minus the projection on [1, t] (the least-squares line), or on [1] (the mean)
        spans = spans - (spans @ self._trend.T) @ self._trend
        stds = np.sqrt((spans * spans).mean(axis=1))
        flat = stds <= 1e-9
        shapes = spans / np.where(flat, 1.0, stds)[:, None]
        shapes[flat] = 0.0
        references = [] if template is None else [template, *(others or [])]
        picks = [int(np.argmin(((shapes - reference) ** 2).sum(axis=1))) for reference in references]
        best = picks[0] if picks else 0
        nearest = [(int(shifts[pick]), shapes[pick]) for pick in picks[1:]]
        return int(shifts[best]), shapes[best], float(stds[best]), shapes[0], nearest

    def _noise_ratio(self, r: int) -> tuple[float, bool, bool]:
        """(noise ratio, too noisy to learn from, too noisy to score) of the beat at r; updates the sensor's peak and
        noise history."""
        local = r - self._raw_start
        band = self._band
        qrs = np.abs(band[max(0, local - self.qrs_half) : local + self.qrs_half + 1])
        self._peaks.append(float(qrs.max()) if qrs.size else 0.0)
        usual_peak = statistics.median(self._peaks)  # a few dozen floats: sorting beats np.median's overhead
        floor = np.abs(band[max(0, local - self.noise_before) : local + self.noise_after + 1])
        ratio = float(_median(floor)) / usual_peak if usual_peak > 0 and floor.size else float("inf")
        self._noise.append(ratio)
        usual = statistics.median(self._noise)
        spec = self.spec
        unscorable = ratio > spec.max_noise_ratio or ratio > spec.relative_noise * usual
        learn_max = spec.max_noise_ratio if spec.learn_max_noise_ratio is None else spec.learn_max_noise_ratio
        learn_relative = spec.relative_noise if spec.learn_relative_noise is None else spec.learn_relative_noise
        return ratio, unscorable or ratio > learn_max or ratio > learn_relative * usual, unscorable

    def _trim(self) -> None:
        if not self.detector.learned:  # beats of the learning phase are reported when it ends: keep all of it
            return
        # the oldest beat still to cut, or the oldest the detector may still report
        oldest = min(self._pending[0] if self._pending else self.received, self.received - self.lookahead)
        keep_from = max(0, oldest - max(self.before, self.noise_before) - 1)
        drop = keep_from - self._raw_start
        if drop > 0:
            self._raw, self._band = self._raw[drop:], self._band[drop:]
            self._raw_start += drop

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready state; `restore` continues the stream exactly."""
        encode = functools.partial(encode_array, dtype="<f8")
        return {
            "fs": self.fs,
            "origin": self.origin,
            "detector": self.detector.snapshot(),
            "raw": encode(self._raw),
            "band": encode(self._band),
            "raw_start": self._raw_start,
            "pending": list(self._pending),
            "templates": [encode(template) for template in self._templates],
            "rr": list(self._rr),
            "rr_deviation": list(self._rr_deviation),
            "peaks": list(self._peaks),
            "noise": list(self._noise),
            "distances": list(self._distances),
            "last_r": self._last_r,
            "last_rr": self._last_rr,
            "beats": self.beats,
            "warm": [[encode(shape), rr] for shape, rr in self._warm],
            "judged": [int(normal) for normal in self._judged],
            "relearns": self.relearns,
            "classes": [[encode(shape) for shape in members] for members in self._classes],
            "joined": list(self._joined),
            "run": [[encode(shape), encode(aligned)] for shape, aligned in self._run],
        }

    def max_abs_sample(self) -> float:
        """The largest |sample| the stream holds (NaN if one is not a number): a restored state is checked by it."""
        return float(np.max(np.abs(self._raw), initial=0.0))

    @classmethod
    def restore(cls, state: dict[str, Any], spec: BeatSpec) -> BeatStream:
        """Rebuilds a stream from `snapshot()`; raises ValueError, KeyError or TypeError for one that does not fit."""
        stream = cls(float(state["fs"]), spec, int(state["origin"]))
        stream.detector = QRSDetector.restore(state["detector"])
        stream._raw, stream._band = decode_array(state["raw"], "<f8"), decode_array(state["band"], "<f8")
        stream._raw_start = int(state["raw_start"])
        stream._pending = deque(int(r) for r in state["pending"])
        templates = [decode_array(text, "<f8") for text in state["templates"]]
        if any(template.shape != (spec.window,) for template in templates):
            raise ValueError(f"beat templates do not have {spec.window} points")
        stream._templates.extend(templates)
        stream._rr.extend(int(rr) for rr in state["rr"])
        stream._rr_deviation.extend(float(value) for value in state["rr_deviation"])
        stream._peaks.extend(float(value) for value in state["peaks"])
        stream._noise.extend(float(value) for value in state["noise"])
        stream._distances.extend(float(value) for value in state.get("distances", ()))  # absent before stretch scaling
        stream._last_r = None if state["last_r"] is None else int(state["last_r"])
        stream._last_rr = None if state["last_rr"] is None else int(state["last_rr"])
        stream.beats = int(state["beats"])
        stream._warm = [(decode_array(shape, "<f8"), None if rr is None else int(rr)) for shape, rr in state["warm"]]
        stream._judged.extend(bool(normal) for normal in state["judged"])
        stream.relearns = int(state["relearns"])
        stream._classes = [
            deque((decode_array(shape, "<f8") for shape in members), maxlen=spec.template_beats)
            for members in state["classes"]
        ]
        stream._joined = [int(beat) for beat in state["joined"]]
        stream._class_templates = [_median(np.stack(members)) for members in stream._classes]
        stream._run = [(decode_array(shape, "<f8"), decode_array(aligned, "<f8")) for shape, aligned in state["run"]]
        held = [shape for members in stream._classes for shape in members] + [s for pair in stream._run for s in pair]
        if len(stream._classes) > spec.normal_classes or len(stream._joined) != len(stream._classes):
            raise ValueError(f"{len(stream._classes)} other normal classes, at most {spec.normal_classes} allowed")
        if any(shape.shape != (spec.window,) for shape in held):
            raise ValueError(f"beat class shapes do not have {spec.window} points")
        if any(shape.shape != (spec.window,) for shape, _ in stream._warm):
            raise ValueError(f"beat warm-up shapes do not have {spec.window} points")
        if stream._raw_start + len(stream._raw) != stream.received or len(stream._band) > len(stream._raw):
            raise ValueError("beat stream buffers do not end at the samples received")
        return stream


def _median(values: np.ndarray) -> np.ndarray:
    """`np.median(values, axis=0)`, the same values, without its generic overhead (a fifth of a beat's cost in the
    daemon's network thread): the middle row of a partition, or the mean of the two middle rows."""
    half = len(values) // 2
    if len(values) % 2:
        return np.partition(values, half, axis=0)[half]
    middle = np.partition(values, (half - 1, half), axis=0)
    return (middle[half - 1] + middle[half]) / 2


def _rms(values: np.ndarray) -> float:
    """The root mean square: a beat's distance from a template is the RMS of their difference."""
    return float(np.sqrt(np.mean(values**2)))


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's correlation of two segments (0 when one is flat or they have fewer than two points)."""
    if a.size < 2:
        return 0.0
    a, b = a - a.mean(), b - b.mean()
    norms = float(np.sqrt((a @ a) * (b @ b)))
    return float(a @ b) / norms if norms > 1e-12 else 0.0


def cut_beats(recording: np.ndarray, fs: float, spec: BeatSpec) -> list[Beat]:
    """Every beat of a whole recording (1-D), exactly as the daemon cuts them from the same stream."""
    return BeatStream(fs, spec).feed(np.asarray(recording).reshape(-1))


def beat_spec(metadata: dict[str, Any], where: Path | str) -> BeatSpec | None:
    """The artifact's beat spec, or None for a fixed-window model; an unreadable one is an ArtifactError."""
    segmentation = metadata.get("segmentation")
    if segmentation is None or segmentation.get("mode", "fixed") == "fixed":
        return None
    if segmentation.get("mode") != "beats":
        raise ArtifactError(f"{where}: segmentation mode {segmentation.get('mode')!r} is not supported")
    try:
        return BeatSpec.from_dict(segmentation)
    except (TypeError, ValueError) as error:
        raise ArtifactError(f"{where}: segmentation does not describe beat windows ({error})") from None
