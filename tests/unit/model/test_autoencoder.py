"""The LSTM autoencoder: shapes, the tutorial's layer sizes, the error measure, batch independence."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

from monitor.model.artifact import Normalisation, load_artifact
from monitor.model.autoencoder import LSTMAutoencoder, reconstruction_errors
from monitor.model.engine import native_bfloat16, resolve_device
from monitor.model.scoring import Scorer, Scores, ScoringGraph, SlicedScorer
from monitor.training.datasets import read_ucr
from tests.support import DEFAULT_MODEL, SPLITS


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_scorer(
    window: int = 140,
    channels: int = 1,
    embedding_dim: int = 16,
    seed: int = 0,
    mean: float = 0.0,
    std: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> Scorer:
    torch.manual_seed(seed)
    model = LSTMAutoencoder(channels, embedding_dim).eval()
    normalisation = Normalisation(np.full(channels, mean, np.float32), np.full(channels, std, np.float32))
    return Scorer(model, normalisation, "cpu", dtype)


@pytest.mark.parametrize(
    ("batch", "window", "channels", "embedding_dim"),
    [
        (1, 140, 1, 8),
        (5, 140, 1, 32),
        (4, 50, 3, 4),
        (7, 7, 2, 16),
        (2, 300, 12, 2),
    ],
)
def test_output_shapes(batch, window, channels, embedding_dim):
    torch.manual_seed(1)
    model = LSTMAutoencoder(channels, embedding_dim).eval()
    windows = torch.randn(batch, window, channels)
    with torch.inference_mode():
        embedding = model.encode(windows)
        reconstruction = model(windows)
    assert embedding.shape == (batch, embedding_dim)
    assert reconstruction.shape == (batch, window, channels)
    assert torch.isfinite(reconstruction).all()
    profiles = reconstruction_errors(windows, reconstruction)
    assert profiles.shape == (batch, window)

    scorer = make_scorer(window, channels, embedding_dim)
    scores = scorer.score(windows.numpy())
    assert scores.errors.shape == (batch,)
    assert scores.profiles.shape == (batch, window)
    assert scores.errors.dtype == np.float32
    np.testing.assert_allclose(scores.errors, scores.profiles.mean(axis=1), rtol=1e-6)


def test_decode_length_follows_the_input_window():
    torch.manual_seed(2)
    model = LSTMAutoencoder(2, 4).eval()
    with torch.inference_mode():
        embedding = model.encode(torch.randn(3, 20, 2))
        assert model.decode(embedding, 11).shape == (3, 11, 2)
        assert model.decode(embedding, 140).shape == (3, 140, 2)


@pytest.mark.parametrize(("channels", "embedding_dim"), [(1, 64), (1, 32), (3, 8)])
def test_layer_sizes_match_the_tutorial(channels, embedding_dim):
    model = LSTMAutoencoder(channels, embedding_dim)
    wide, narrow = 2 * embedding_dim, embedding_dim
    lstms = [module for module in model.modules() if isinstance(module, nn.LSTM)]
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    assert [(lstm.input_size, lstm.hidden_size) for lstm in lstms] == [
        (channels, wide),
        (wide, narrow),
        (narrow, narrow),
        (narrow, wide),
    ]
    assert all(lstm.num_layers == 1 and lstm.batch_first and not lstm.bidirectional for lstm in lstms)
    assert len(linears) == 1
    assert (linears[0].in_features, linears[0].out_features) == (wide, channels)
    # The parameter tensors themselves, as they are written to the artifact.
    state = model.state_dict()
    assert state["encoder_wide.weight_ih_l0"].shape == (4 * wide, channels)
    assert state["encoder_narrow.weight_hh_l0"].shape == (4 * narrow, narrow)
    assert state["decoder_narrow.weight_ih_l0"].shape == (4 * narrow, narrow)
    assert state["decoder_wide.weight_ih_l0"].shape == (4 * wide, narrow)
    assert state["output.weight"].shape == (channels, wide)
    expected = sum(
        4 * h * (i + h) + 8 * h for i, h in [(channels, wide), (wide, narrow), (narrow, narrow), (narrow, wide)]
    )
    expected += wide * channels + channels
    assert sum(p.numel() for p in model.parameters()) == expected


def test_reconstruction_errors_on_hand_made_tensors():
    windows = torch.tensor([[[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]], [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    reconstructions = torch.tensor([[[0.0, 4.0], [0.0, 0.0], [1.0, 1.0]], [[1.0, -1.0], [0.5, 0.5], [0.0, 0.0]]])
    profiles = reconstruction_errors(windows, reconstructions)
    assert profiles.shape == (2, 3)
    # |1-0|=1, |2-4|=2 -> 1.5; 0; |3-1|=2, |-1-1|=2 -> 2 ...
    expected = torch.tensor([[1.5, 0.0, 2.0], [1.0, 0.5, 0.0]])
    torch.testing.assert_close(profiles, expected)
    # Symmetric, zero for a perfect reconstruction, single channel unchanged.
    torch.testing.assert_close(reconstruction_errors(reconstructions, windows), expected)
    assert torch.count_nonzero(reconstruction_errors(windows, windows)) == 0
    single = reconstruction_errors(torch.tensor([[[1.0], [-2.0]]]), torch.tensor([[[0.0], [0.0]]]))
    torch.testing.assert_close(single, torch.tensor([[1.0, 2.0]]))


def test_scorer_normalises_then_takes_the_mean_absolute_error():
    scorer = make_scorer(window=30, channels=2, embedding_dim=4, mean=0.5, std=2.0)
    rng = np.random.default_rng(3)
    windows = rng.normal(0.5, 2.0, size=(6, 30, 2)).astype(np.float32)
    with torch.inference_mode():
        normalised = torch.from_numpy((windows - 0.5) / 2.0)
        manual = (scorer.model(normalised) - normalised).abs().mean(dim=(1, 2)).numpy()
    np.testing.assert_allclose(scorer.score(windows).errors, manual, rtol=1e-5, atol=1e-6)
    # A different normalisation gives different scores (it is really applied).
    other = make_scorer(window=30, channels=2, embedding_dim=4, mean=0.0, std=1.0)
    assert not np.allclose(other.score(windows).errors, manual, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_window_scores_the_same_alone_and_in_any_batch(dtype):
    """Exactly the same: the daemon's batches are whatever arrived together, `monitor evaluate`'s are not."""
    if dtype == torch.bfloat16 and not native_bfloat16():
        pytest.skip("this CPU has no native bfloat16")
    scorer = make_scorer(window=140, channels=1, embedding_dim=16, seed=4, dtype=dtype)
    rng = np.random.default_rng(5)
    target = rng.normal(size=(1, 140, 1)).astype(np.float32)
    others = (rng.normal(size=(64, 140, 1)) * rng.uniform(0.1, 5.0, size=(64, 1, 1))).astype(np.float32)
    alone = scorer.score(target)
    assert alone.errors.shape == (1,)
    for position in (0, 17, 63, 64):
        batch = np.concatenate([others[:position], target, others[position:]])
        assert len(batch) == 65
        scored = scorer.score(batch)
        assert scored.errors[position] == alone.errors[0], position
        np.testing.assert_array_equal(scored.profiles[position], alone.profiles[0])
    # The other windows are scored independently too: batched equals one at a time.
    batched = scorer.score(others).errors
    singles = np.array([scorer.score(others[i : i + 1]).errors[0] for i in range(0, 64, 9)])
    np.testing.assert_array_equal(batched[::9], singles)
    # And the score is not constant: different windows get different scores.
    assert np.ptp(batched) > 1e-3


def test_the_traced_scorer_gives_the_eager_scores_bit_for_bit():
    """Scorer runs a TorchScript trace of ScoringGraph (one GIL release per batch); its scores must be the
    eager module's exactly, at every batch size (the trace was made with a batch of 2), on real data. A lone window
    is scored as a pair, so its eager reference is the pair's first row."""
    artifact = load_artifact(DEFAULT_MODEL)
    scorer = Scorer.from_artifact(artifact)
    eager = ScoringGraph(artifact.model, artifact.normalisation.mean, artifact.normalisation.std).eval()
    windows = read_ucr(SPLITS / "test.txt.xz").windows
    flagged = 0
    for size in (1, 2, 13, 64, 256, len(windows)):
        batch = windows[:size]
        with torch.inference_mode():
            errors, profiles, channels = (part[:size] for part in eager(torch.from_numpy(windows[: max(size, 2)])))
        traced = scorer.score(batch)
        np.testing.assert_array_equal(traced.errors, errors.numpy())
        np.testing.assert_array_equal(traced.profiles, profiles.numpy())
        np.testing.assert_array_equal(traced.channels, channels.numpy())
        flagged = int((traced.errors > artifact.threshold).sum())
    assert flagged == 2021  # the shipped model's decisions on the whole test split (model.json: tp 2007 + fp 14)


def test_a_sliced_scorer_scores_slices_at_once_as_the_whole_batch_would():
    """`model.workers`: a batch of at least 16 windows a worker is cut into slices, scored in the calling thread and
    the pool's at once; each window gets the score of the unsliced pass (as in any batch), the model's decisions on
    the whole test split are its own, and a smaller batch is one pass."""
    artifact = load_artifact(DEFAULT_MODEL)
    plain = Scorer.from_artifact(artifact)
    calls: list[tuple[str, int]] = []

    class Recorded:
        def score(self, windows: np.ndarray) -> Scores:
            calls.append((threading.current_thread().name, len(windows)))
            return plain.score(windows)

    windows = read_ucr(SPLITS / "test.txt.xz").windows
    for workers in (2, 3):
        sliced = SlicedScorer(Recorded(), workers)
        calls.clear()
        scores = sliced.score(windows[:100])
        assert sorted(size for _, size in calls) == ([50, 50] if workers == 2 else [33, 33, 34])
        assert {name.startswith("scoring-slice") for name, _ in calls} == {True, False}
        whole = plain.score(windows[:100])
        np.testing.assert_allclose(scores.errors, whole.errors, rtol=1e-6)
        np.testing.assert_allclose(scores.profiles, whole.profiles, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(scores.channels, whole.channels, rtol=1e-6)
        calls.clear()
        sliced.score(windows[: 16 * 2 - 1])
        assert [size for _, size in calls] == [31]
        flagged = int((sliced.score_all(windows).errors > artifact.threshold).sum())
        assert flagged == 2021


def test_score_all_matches_score_across_batch_boundaries():
    scorer = make_scorer(window=40, channels=1, embedding_dim=8, seed=6)
    windows = np.random.default_rng(7).normal(size=(45, 40, 1)).astype(np.float32)
    whole = scorer.score(windows)
    chunked = scorer.score_all(windows, batch_size=16)
    np.testing.assert_allclose(chunked.errors, whole.errors, atol=1e-5)
    np.testing.assert_allclose(chunked.profiles, whole.profiles, atol=1e-5)
    empty = scorer.score_all(windows[:0])
    assert empty.errors.shape == (0,) and empty.profiles.shape == (0, 40)


def test_resolve_device():
    from monitor.errors import ConfigError

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ConfigError, match="tpu"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")


def test_model_dtype_is_checked_where_it_cannot_run():
    """bfloat16 is refused with the key named for the onnx backend, and where the hardware would only emulate it."""
    from monitor.config.schema import ModelSettings
    from monitor.errors import ConfigError
    from monitor.model.engine import load_engine, resolve_dtype

    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32
    with pytest.raises(ConfigError, match="model.dtype"):
        load_engine(ModelSettings(path=DEFAULT_MODEL, device="cpu", backend="onnx", dtype="bfloat16", threads=1))
    if native_bfloat16():
        engine = load_engine(ModelSettings(path=DEFAULT_MODEL, device="cpu", dtype="bfloat16", threads=1))
        assert engine.dtype == "bfloat16" and engine.describe()["dtype"] == "bfloat16"
    else:
        with pytest.raises(ConfigError, match="natively"):
            resolve_dtype("bfloat16", torch.device("cpu"))


def test_scorers_of_one_shape_share_a_trace_but_score_with_their_own_weights():
    """Reloads copy one traced template per model shape (a new trace per reload leaked ~0.9 MiB); each copy must
    still hold its own model's weights and normalisation."""
    windows = np.random.default_rng(0).normal(size=(8, 140, 1)).astype(np.float32)
    scorers, eager = [], []
    for seed, mean in ((1, 0.0), (2, 0.5)):
        torch.manual_seed(seed)
        model = LSTMAutoencoder(1, 8).eval().requires_grad_(False)
        scorers.append(Scorer(model, Normalisation(np.array([mean], np.float32), np.array([1.0], np.float32))))
        with torch.inference_mode():
            batch = torch.as_tensor(windows) - mean
            eager.append(reconstruction_errors(batch, model(batch)).mean(dim=1).numpy())
    scores = [scorer.score(windows).errors for scorer in scorers]
    names = [scorer._traced[140]._c._type().qualified_name() for scorer in scorers]
    assert names[0] == names[1]  # one TorchScript class, not one per scorer
    np.testing.assert_allclose(scores[0], eager[0], rtol=1e-6)
    np.testing.assert_allclose(scores[1], eager[1], rtol=1e-6)
    assert not np.allclose(scores[0], scores[1])


def test_the_level_path_reconstructs_each_windows_level_linearly_through_its_bottleneck():
    """With a level path the LSTMs see the window minus its per-channel mean, so a window shifted by a constant per
    channel is reconstructed shifted by exactly the bottleneck's linear map of that shift: a drifted level
    extrapolates instead of saturating the LSTMs, and a shift outside the bottleneck's K directions stays in the
    error."""
    torch.manual_seed(8)
    model = LSTMAutoencoder(channels=6, embedding_dim=4, level_dim=2).eval()
    assert (model.level_down.in_features, model.level_down.out_features) == (6, 2)
    assert (model.level_up.in_features, model.level_up.out_features) == (2, 6)
    windows = torch.randn(3, 20, 6)
    shift = torch.tensor([5.0, -3.0, 0.0, 40.0, 1.0, -7.0])
    with torch.inference_mode():
        moved = model(windows + shift) - model(windows)
        linear = model.level_up.weight @ model.level_down.weight @ shift
    torch.testing.assert_close(moved, linear.expand_as(moved), rtol=1e-4, atol=1e-4)
    # The map has rank K < C: it cannot give back every shift, so a shift leaves some of itself in the error.
    assert float((linear - shift).abs().max()) > 1.0


def test_no_level_path_keeps_the_model_as_it_was_and_a_path_must_be_narrower_than_the_channels():
    assert not any(name.startswith("level_") for name in LSTMAutoencoder(6, 4).state_dict())
    assert LSTMAutoencoder(6, 4).level_dim == 0
    for level_dim in (6, 7, -1):
        with pytest.raises(ValueError, match="level_dim"):
            LSTMAutoencoder(6, 4, level_dim)
    with pytest.raises(ValueError, match="level_dim"):
        LSTMAutoencoder(1, 4, 1)  # one channel: no level path


def test_a_level_path_model_scores_the_same_traced_and_eager():
    torch.manual_seed(9)
    model = LSTMAutoencoder(channels=5, embedding_dim=4, level_dim=3)
    normalisation = Normalisation(np.zeros(5, np.float32), np.ones(5, np.float32))
    scorer = Scorer(model, normalisation)
    eager = ScoringGraph(model, normalisation.mean, normalisation.std).eval()
    windows = np.random.default_rng(10).normal(2.0, 3.0, size=(17, 25, 5)).astype(np.float32)
    with torch.inference_mode():
        errors, profiles, channels = eager(torch.from_numpy(windows))
    traced = scorer.score(windows)
    np.testing.assert_array_equal(traced.errors, errors.numpy())
    np.testing.assert_array_equal(traced.channels, channels.numpy())


def test_a_bfloat16_scorer_keeps_the_models_scores_and_decisions_close_and_leaves_the_model_alone():
    """`model.dtype: bfloat16` computes the autoencoder on a bfloat16 copy: on the shipped model's test split each
    score stays close to float32's and the decisions nearly all agree; the caller's model stays float32."""
    if not native_bfloat16():
        pytest.skip("this CPU has no native bfloat16")
    artifact = load_artifact(DEFAULT_MODEL)
    windows = read_ucr(SPLITS / "test.txt.xz").windows
    single = Scorer.from_artifact(artifact).score_all(windows).errors
    half = Scorer.from_artifact(artifact, dtype=torch.bfloat16).score_all(windows).errors
    assert next(artifact.model.parameters()).dtype == torch.float32
    assert not np.array_equal(half, single)  # it really computes in bfloat16
    relative = np.abs(half - single) / single
    assert np.median(relative) < 0.01
    differ = int(((half > artifact.threshold) != (single > artifact.threshold)).sum())
    assert differ <= 10, differ  # of 3,103 windows, all within rounding of the threshold
