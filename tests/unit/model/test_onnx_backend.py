"""The ONNX Runtime backend scores like the torch Scorer, and the Scorer's CUDA path agrees with its CPU path.

Tolerances (measured on the default model over all 3,103 windows of splits/test.txt, ORT 1.31 / torch 2.13):
window scores differ by at most ~1e-5 absolute (~1e-5 relative), so they are checked with rtol 1e-4 + atol 1e-5;
per-timestep profiles by at most ~2e-3 at single timesteps of strongly anomalous beats (ORT's LSTM kernel uses its
own sigmoid/tanh approximations and the recurrence carries the difference), checked with atol 1e-2, and 99.9 % of
profile values within 1e-4. No test window scores within 2e-4 of the threshold, so the flagged sets are identical.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monitor.config.schema import ModelSettings
from monitor.model.artifact import load_artifact
from monitor.model.scoring import Scorer
from monitor.training.datasets import read_ucr
from tests.support import DEFAULT_MODEL, SPLITS

ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install -e '.[onnx]')")
from monitor.model.onnx_backend import OnnxScorer  # noqa: E402

SCORE_RTOL, SCORE_ATOL = 1e-4, 1e-5
PROFILE_ATOL = 1e-2


@pytest.fixture(scope="module")
def test_split():
    return read_ucr(SPLITS / "test.txt.xz")


@pytest.fixture(scope="module")
def artifact():
    return load_artifact(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def reference(artifact, test_split):
    return Scorer.from_artifact(artifact).score_all(test_split.windows)


@pytest.fixture(scope="module")
def onnx_scorer(artifact):
    return OnnxScorer(artifact, threads=1)


def test_scores_match_torch_on_the_whole_test_split(artifact, test_split, reference, onnx_scorer):
    scores = onnx_scorer.score_all(test_split.windows)
    assert scores.errors.shape == (len(test_split.windows),) and scores.profiles.shape == (
        len(test_split.windows),
        artifact.window,
    )
    assert scores.errors.dtype == np.float32 and scores.profiles.dtype == np.float32
    np.testing.assert_allclose(scores.errors, reference.errors, rtol=SCORE_RTOL, atol=SCORE_ATOL)
    np.testing.assert_allclose(scores.profiles, reference.profiles, rtol=0, atol=PROFILE_ATOL)
    assert np.quantile(np.abs(scores.profiles - reference.profiles), 0.999) < 1e-4
    # the window score is the mean of the profile, in both backends
    np.testing.assert_allclose(scores.profiles.mean(axis=1), scores.errors, rtol=1e-5, atol=1e-6)


def test_flags_the_same_windows_at_the_artifacts_threshold(artifact, test_split, reference, onnx_scorer):
    scores = onnx_scorer.score_all(test_split.windows)
    flagged_torch = reference.errors > artifact.threshold
    flagged_onnx = scores.errors > artifact.threshold
    assert flagged_torch.sum() > 0
    # Only a window scoring within the stated tolerance of the threshold could change side; the
    # default model has none (the closest is ~2.6e-4 away), so the flagged sets must be identical.
    borderline = np.abs(reference.errors - artifact.threshold) <= SCORE_ATOL + SCORE_RTOL * artifact.threshold
    assert not ((flagged_onnx != flagged_torch) & ~borderline).any()
    assert np.array_equal(flagged_onnx, flagged_torch), (
        f"{int((flagged_onnx != flagged_torch).sum())} borderline decisions differ"
    )


def test_a_windows_score_does_not_depend_on_its_batch(artifact, test_split, onnx_scorer):
    windows = test_split.windows[:130]
    whole = onnx_scorer.score(windows)
    one_by_one = np.concatenate([onnx_scorer.score(windows[i : i + 1]).errors for i in range(len(windows))])
    in_sevens = onnx_scorer.score_all(windows, batch_size=7)
    np.testing.assert_allclose(one_by_one, whole.errors, rtol=0, atol=1e-6)
    np.testing.assert_allclose(in_sevens.errors, whole.errors, rtol=0, atol=1e-6)
    np.testing.assert_allclose(in_sevens.profiles, whole.profiles, rtol=0, atol=1e-5)
    # reversed order: the same scores, reversed
    np.testing.assert_allclose(onnx_scorer.score(windows[::-1]).errors[::-1], whole.errors, rtol=0, atol=1e-6)

    # a batch above run_batch is run in slices: the same scores as in one session run
    assert len(windows) > onnx_scorer.run_batch
    one_run = OnnxScorer(artifact, threads=1, run_batch=len(windows)).score(windows)
    np.testing.assert_array_equal(one_run.errors, whole.errors)
    np.testing.assert_array_equal(one_run.profiles, whole.profiles)


def test_accepts_float64_and_non_contiguous_windows(test_split, onnx_scorer):
    windows = test_split.windows[:20]
    expected = onnx_scorer.score(windows).errors
    np.testing.assert_allclose(onnx_scorer.score(windows.astype(np.float64)).errors, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        onnx_scorer.score(test_split.windows[:40:2]).errors, onnx_scorer.score(test_split.windows[:40:2].copy()).errors
    )


@pytest.mark.parametrize("threads", [0, 2])
def test_thread_settings_do_not_change_scores(artifact, test_split, onnx_scorer, threads):
    windows = test_split.windows[:64]
    scores = OnnxScorer(artifact, threads=threads).score(windows)
    np.testing.assert_allclose(scores.errors, onnx_scorer.score(windows).errors, rtol=0, atol=1e-6)


def test_the_daemon_builds_an_onnx_engine(test_split, reference):
    from monitor.model.engine import load_engine

    threads = torch.get_num_threads()
    try:
        engine = load_engine(ModelSettings(path=DEFAULT_MODEL, device="cpu", backend="onnx", threads=1))
    finally:
        torch.set_num_threads(threads)
    assert engine.backend == "onnx" and isinstance(engine.scorer, OnnxScorer)
    scores = engine.score(test_split.windows[:64])
    np.testing.assert_allclose(scores.errors, reference.errors[:64], rtol=SCORE_RTOL, atol=SCORE_ATOL)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device on this machine (torch.cuda.is_available() is False)"
)
def test_torch_scorer_on_cuda_matches_cpu_and_stays_batched(test_split, reference):
    cpu_artifact = load_artifact(DEFAULT_MODEL)
    gpu_artifact = load_artifact(DEFAULT_MODEL, "cuda")
    scorer = Scorer.from_artifact(gpu_artifact, "cuda")
    assert next(scorer.model.parameters()).is_cuda
    one_batch = scorer.score(test_split.windows[:256])  # one forward pass for the whole batch
    assert one_batch.errors.shape == (256,) and one_batch.profiles.shape == (256, cpu_artifact.window)
    scores = scorer.score_all(test_split.windows)
    np.testing.assert_allclose(scores.errors, reference.errors, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(one_batch.errors, scores.errors[:256], rtol=1e-5, atol=1e-6)
    assert np.array_equal(scores.errors > cpu_artifact.threshold, reference.errors > cpu_artifact.threshold)
