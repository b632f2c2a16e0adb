"""The PCA yardstick beside the LSTM: what `monitor train` records and `monitor evaluate` reports for it, checked
against a direct computation (an eigendecomposition of the covariance, not the trainer's SVD), on the SMD excerpt."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from monitor.errors import DataError
from monitor.model.baseline import normalise_recording
from monitor.training.trainer import TrainingResult, TrainSettings, train
from tests.support import REPO, run_cli

EXCERPT = REPO / "data" / "smd-excerpt"
MACHINES = ("machine-1-3", "machine-2-4")
WINDOW, STRIDE, WARM_UP, RATE = 30, 10, 20, 0.02


def cut(rows: np.ndarray) -> np.ndarray:
    return np.stack([rows[start : start + WINDOW] for start in range(0, len(rows) - WINDOW + 1, STRIDE)])


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Every (anomalous, normal) pair: 1 when the anomalous window scores higher, a half for a tie."""
    pos, neg = scores[positive][:, None], scores[~positive][None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


def train_small(output: Path, score_scale: str = "none") -> TrainingResult:
    settings = TrainSettings(
        train_data=[EXCERPT / f"{m}_train.npy" for m in MACHINES],
        window=WINDOW,
        stride=STRIDE,
        baseline="sensor",
        baseline_windows=WARM_UP,
        baseline_follow_rate=RATE,
        output=output,
        embedding_dim=4,
        epochs=1,
        threads=1,
        report=False,
        score_scale=score_scale,
    )
    return train(settings)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    output = tmp_path_factory.mktemp("yardstick") / "model"
    return train_small(output), output


def training_parts() -> dict[str, list[np.ndarray]]:
    """Each machine's train half as the trainer splits it: warm-up, fit, validation and calibration windows, the
    calibration part normalised as by a daemon starting WARM_UP windows before it, and that warm-up."""
    parts: dict[str, list[np.ndarray]] = {
        "warm_up": [],
        "fit": [],
        "validation": [],
        "calibration_warm_up": [],
        "calibration": [],
    }
    for machine in MACHINES:
        raw = cut(np.load(EXCERPT / f"{machine}_train.npy"))
        windows, _ = normalise_recording(raw, WARM_UP, RATE)
        n = len(windows)
        n_cal = n_val = int(round(n * 0.15))
        restarted, _ = normalise_recording(raw[n - n_cal - WARM_UP :], WARM_UP, RATE)
        parts["warm_up"].append(windows[:WARM_UP])
        parts["fit"].append(windows[: n - n_val - n_cal])
        parts["validation"].append(windows[n - n_val - n_cal : n - n_cal])
        parts["calibration_warm_up"].append(restarted[:WARM_UP])
        parts["calibration"].append(restarted[WARM_UP:])
    return parts


def direct_pca(fit: list[np.ndarray]) -> tuple[int, Callable[[np.ndarray], np.ndarray]]:
    """PCA by an eigendecomposition of the fit windows' covariance: its components and its window scores."""
    flat = np.concatenate(fit).reshape(-1, WINDOW * 38).astype(np.float64)
    mean = flat.mean(axis=0)
    values, vectors = np.linalg.eigh((flat - mean).T @ (flat - mean))
    values, vectors = values[::-1], vectors[:, ::-1]
    components = int(np.argmax(np.cumsum(values) / values.sum() >= 0.9)) + 1
    basis = vectors[:, :components]

    def score(windows: np.ndarray) -> np.ndarray:
        centred = windows.reshape(len(windows), -1).astype(np.float64) - mean
        return np.abs(centred - centred @ basis @ basis.T).mean(axis=1)

    return components, score


def test_pca_figures_match_a_direct_computation(trained):
    result, output = trained
    parts = training_parts()
    calibration, validation = parts["calibration"], parts["validation"]
    components, score = direct_pca(parts["fit"])
    threshold = float(np.median([np.quantile(score(part), 0.99) for part in calibration]))
    meta = result.artifact.metadata
    assert meta["yardstick"]["components"] == components
    lstm = meta["threshold"]  # the LSTM's by the same rule: the median of the machines' own
    assert len(lstm["recording_thresholds"]) == len(MACHINES)
    assert lstm["value"] == pytest.approx(float(np.median(lstm["recording_thresholds"])))
    assert meta["yardstick"]["threshold"]["value"] == pytest.approx(threshold, rel=1e-6)
    held_out = meta["held_out_false_alarms"]
    nominal = [float((score(part) > threshold).mean()) for part in calibration]
    assert [item["nominal"]["pca"] for item in held_out["recordings"]] == pytest.approx(nominal)
    assert held_out["nominal"]["pca"] == pytest.approx(float(np.median(nominal)))
    pooled = float((score(np.concatenate(calibration)) > threshold).mean())
    assert held_out["calibration_share"]["pca"] == pytest.approx(pooled)
    realised = [float((score(part) > threshold).mean()) for part in validation]
    assert [item["realised"]["pca"] for item in held_out["recordings"]] == pytest.approx(realised)
    assert set(held_out["means"]) == {"nominal", "realised", "calibration_share"}
    for item, windows in zip(meta["training"]["recordings"], parts["calibration"], strict=True):
        end = item["windows"] - len(windows)
        assert item["calibration_warm_up_windows"] == [end - WARM_UP, end]

    data = [str(EXCERPT / f"{m}_test.npy") for m in MACHINES]
    labels = [str(EXCERPT / f"{m}_test_labels.npy") for m in MACHINES]
    done = run_cli(
        "evaluate", "--model", str(output), "--data", *data, "--labels", *labels, "--stride", str(STRIDE), "--json"
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    scores, anomalous = [], []
    for machine, recording in zip(MACHINES, report["pca"]["recordings"], strict=True):
        rows = np.load(EXCERPT / f"{machine}_test.npy")
        windows, _ = normalise_recording(cut(rows), WARM_UP, RATE)
        flags = cut(np.load(EXCERPT / f"{machine}_test_labels.npy")[:, None].astype(np.float32)).any(axis=(1, 2))
        scores.append(score(windows[WARM_UP:]))
        anomalous.append(flags[WARM_UP:])
        assert recording["auc"] == pytest.approx(auc(scores[-1], anomalous[-1]), abs=1e-9)
        normal = ~anomalous[-1]
        assert recording["fpr"] == pytest.approx(float((scores[-1][normal] > threshold).mean()))
    assert report["pca"]["auc"] == pytest.approx(auc(np.concatenate(scores), np.concatenate(anomalous)), abs=1e-9)
    assert report["pca"]["components"] == components and "auc" in report  # the LSTM's figures beside it


def test_with_the_score_scale_each_recording_is_divided_by_its_warm_ups_median(tmp_path):
    """`--score-scale sensor`: the yardstick's threshold is the median of each machine's 0.99 quantile of its
    calibration scores, divided by the median score of the warm-up just before them; the realised false alarms are on
    validation scores divided by the median score of the recording's first warm-up, and `monitor evaluate` divides
    each test recording's scores by its own warm-up's median."""
    result = train_small(tmp_path / "model", "sensor")
    parts = training_parts()
    _, score = direct_pca(parts["fit"])
    scales = {
        part: [float(np.median(score(warm_up))) for warm_up in parts[warm_ups]]
        for part, warm_ups in (("validation", "warm_up"), ("calibration", "calibration_warm_up"))
    }
    meta = result.artifact.metadata
    assert meta["score_scale"]["training_recordings"]["pca"] == pytest.approx(scales["validation"], rel=1e-5)
    assert meta["score_scale"]["calibration_warm_ups"]["pca"] == pytest.approx(scales["calibration"], rel=1e-5)
    assert scales["calibration"] != pytest.approx(scales["validation"], rel=1e-3)  # two warm-ups, two scales
    scaled = {
        part: [score(windows) / scale for windows, scale in zip(parts[part], scales[part], strict=True)]
        for part in ("calibration", "validation")
    }
    threshold = float(np.median([np.quantile(part, 0.99) for part in scaled["calibration"]]))
    assert meta["yardstick"]["threshold"]["value"] == pytest.approx(threshold, rel=1e-5)
    held_out = meta["held_out_false_alarms"]
    realised = [float((part > threshold).mean()) for part in scaled["validation"]]
    assert [item["realised"]["pca"] for item in held_out["recordings"]] == pytest.approx(realised)
    nominal = [float((part > threshold).mean()) for part in scaled["calibration"]]
    assert [item["nominal"]["pca"] for item in held_out["recordings"]] == pytest.approx(nominal)
    assert held_out["nominal"]["pca"] == pytest.approx(float(np.median(nominal)))

    data = [str(EXCERPT / f"{m}_test.npy") for m in MACHINES]
    labels = [str(EXCERPT / f"{m}_test_labels.npy") for m in MACHINES]
    done = run_cli(
        "evaluate",
        "--model",
        str(tmp_path / "model"),
        "--data",
        *data,
        "--labels",
        *labels,
        "--stride",
        str(STRIDE),
        "--json",
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["score_scale"] == "sensor"
    for machine, recording in zip(MACHINES, report["pca"]["recordings"], strict=True):
        windows, _ = normalise_recording(cut(np.load(EXCERPT / f"{machine}_test.npy")), WARM_UP, RATE)
        assert recording["score_scale"] == pytest.approx(float(np.median(score(windows[:WARM_UP]))), rel=1e-5)


@pytest.mark.parametrize(
    ("rows", "calibration_fraction", "message"),
    [
        # each recording's calibration part gives a threshold of its own, so each needs 10 normal windows in it
        (600, 0.15, r"short_train\.npy: 9 normal windows in its calibration part .* at least 10"),  # 58 windows
        # its calibration part is normalised by a baseline fitted on the warm-up's worth of windows before it: fewer
        # are refused, not used as a shorter warm-up
        (320, 0.45, r"short_train\.npy: 16 windows before its calibration part .* needs 20"),  # 30 windows, 14 last
    ],
)
def test_a_recording_too_short_for_its_calibration_is_refused_by_name(tmp_path, rows, calibration_fraction, message):
    short = tmp_path / "short_train.npy"
    np.save(short, np.load(EXCERPT / f"{MACHINES[0]}_train.npy")[:rows])
    settings = TrainSettings(
        train_data=[EXCERPT / f"{MACHINES[1]}_train.npy", short],
        window=WINDOW,
        stride=STRIDE,
        baseline="sensor",
        baseline_windows=WARM_UP,
        calibration_fraction=calibration_fraction,
        output=tmp_path / "model",
        embedding_dim=4,
        epochs=1,
        threads=1,
        report=False,
    )
    with pytest.raises(DataError, match=message):
        train(settings)
    assert not (tmp_path / "model").exists()
