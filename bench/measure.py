"""In-process measurements: the matmul limit, model FLOPs, the tutorial loop, the scoring engine, the GIL,
training time per epoch, ONNX-vs-torch agreement and the model-size table; each returns its record as a dict."""

from __future__ import annotations

import logging
import math
import statistics
import tempfile
import threading
import time
from argparse import Namespace
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.harness import REPO, repo_relative
from monitor.config.loading import read_yaml, validate
from monitor.model.artifact import ModelArtifact, Normalisation, load_artifact
from monitor.model.autoencoder import LSTMAutoencoder
from monitor.model.engine import native_bfloat16
from monitor.model.onnx_backend import OnnxScorer, export_onnx, session_options
from monitor.model.scoring import Scorer, ScoringGraph, SlicedScorer
from monitor.training.evaluation import evaluate_scores

DEFAULT_MODEL = REPO / "models" / "ecg5000"
TRAIN_CONFIG = REPO / "configs" / "train-ecg5000.yaml"
Record = dict[str, Any]
SLOW_CALL_SECONDS = 5.0  # a configuration whose batch takes longer is not tried at larger batches
FLOPS_FORMULA = (
    "FLOPs/window = W * (sum over the 4 LSTM layers of 8*H*(I+H) + 2*(2E)*C), layers (I->H) = (C->2E), (2E->E), "
    "(E->E), (E->2E): each step of an LSTM layer multiplies [I] by the 4H x I input weights and [H] by the 4H x H "
    "recurrent weights (2 FLOPs per multiply-add), the output Linear is 2E -> C; biases, gate nonlinearities and the "
    "cell update are not counted"
)


def lstm_layers(embedding_dim: int, channels: int) -> list[tuple[int, int]]:
    """(input size, hidden size) of the autoencoder's four LSTM layers, in order."""
    hidden = 2 * embedding_dim
    return [(channels, hidden), (hidden, embedding_dim), (embedding_dim, embedding_dim), (embedding_dim, hidden)]


def flops_per_window(embedding_dim: int, window: int, channels: int) -> int:
    """Matmul FLOPs of one forward pass over one window (see FLOPS_FORMULA)."""
    per_step = sum(8 * hidden * (inputs + hidden) for inputs, hidden in lstm_layers(embedding_dim, channels))
    per_step += 2 * (2 * embedding_dim) * channels
    return window * per_step


@dataclass(frozen=True)
class Rate:
    """Items per second of a timed call: median and best of the runs, and the warm-up call's duration."""

    median: float
    best: float
    runs: list[float]
    call_seconds: float


def measure_rate(
    call: Callable[[], object], items_per_call: int, seconds: float, repeats: int, warmup: int = 1
) -> Rate:
    """Items per second of `call`: `repeats` runs of at least `seconds` each (and one call at least).

    A call slower than 3 x `seconds` (a configuration that collapsed under load) is timed once only."""
    started = time.perf_counter()
    for _ in range(warmup):
        call()
    call_seconds = (time.perf_counter() - started) / max(warmup, 1)
    if warmup and call_seconds > 3 * seconds:
        repeats = 1
    runs = []
    for _ in range(repeats):
        calls, started = 0, time.perf_counter()
        while True:
            call()
            calls += 1
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                break
        runs.append(calls * items_per_call / elapsed)
    return Rate(statistics.median(runs), max(runs), [round(run, 2) for run in runs], call_seconds)


@contextmanager
def threads_set(threads: int) -> Iterator[None]:
    """torch intra-op threads for the block, restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def batch_of(windows: np.ndarray, size: int) -> np.ndarray:
    """`size` windows (repeated when there are fewer), contiguous as the daemon's batches are."""
    return np.ascontiguousarray(np.resize(windows, (size, *windows.shape[1:])))


def matmul_rate(threads: int, seconds: float, repeats: int, sizes: tuple[int, ...], earlier: Record | None) -> Record:
    """Dense fp32 `torch.mm` GFLOP/s with `threads` threads: the best run of the best size (and of `earlier`).

    The limit is what the machine can do, and other processes only ever lower a run's rate, so the
    best of `max(repeats, 5)` runs is taken (the engine's figures are medians: the fractions err low)."""
    per_size = {size: 0.0 for size in sizes} | (earlier["by_size"] if earlier else {})
    with threads_set(threads), torch.inference_mode():
        for size in sizes:
            a, b, out = torch.randn(size, size), torch.randn(size, size), torch.empty(size, size)
            call = lambda a=a, b=b, out=out: torch.mm(a, b, out=out)  # noqa: E731
            rate = measure_rate(call, 2 * size**3, seconds, max(repeats, 5), warmup=2).best / 1e9
            per_size[size] = max(per_size[size], rate)
    best = max(per_size, key=lambda size: per_size[size])
    return {"threads": threads, "gflops": per_size[best], "size": best, "by_size": per_size}


def model_matmul_rate(
    embedding_dim: int, window: int, channels: int, batch: int, threads: int, seconds: float, repeats: int
) -> Record:
    """windows/s of the model's matmuls alone, at the shapes a batch of `batch` windows gives them.

    Per LSTM layer: the input projection of all W steps as one [B*W, I] x [I, 4H] matmul (as oneDNN
    does it), then W recurrent [B, H] x [H, 4H] matmuls, one per step (each needs the previous step's
    output, so they cannot be merged); then the output Linear. No gate nonlinearities, no cell update:
    a ceiling for any fp32 implementation that follows the recurrence with this matmul library."""
    layers = lstm_layers(embedding_dim, channels)
    with threads_set(threads), torch.inference_mode():
        inputs = [
            (torch.randn(batch * window, i), torch.randn(i, 4 * h), torch.randn(batch, h), torch.randn(h, 4 * h))
            for i, h in layers
        ]
        projected = [torch.empty(batch * window, 4 * h) for _, h in layers]
        gates = [torch.empty(batch, 4 * h) for _, h in layers]
        hidden, output_weights = (
            torch.randn(batch * window, 2 * embedding_dim),
            torch.randn(2 * embedding_dim, channels),
        )

        def run() -> None:
            for (x, w_in, h, w_rec), out_in, out_rec in zip(inputs, projected, gates, strict=True):
                torch.mm(x, w_in, out=out_in)
                for _ in range(window):
                    torch.mm(h, w_rec, out=out_rec)
            torch.mm(hidden, output_weights)

        rate = measure_rate(run, batch, seconds, max(repeats, 5), warmup=2)
    gflops = rate.best * flops_per_window(embedding_dim, window, channels) / 1e9
    return {"embedding_dim": embedding_dim, "batch": batch, "threads": threads} | {
        "windows_per_second": rate.best,
        "gflops": gflops,
    }


def random_artifact(reference: ModelArtifact, embedding_dim: int, seed: int = 0) -> ModelArtifact:
    """An untrained model of another size with the reference's window, channels and normalisation.

    Speed does not depend on the weights' values, so the engine's windows/s at E=64 and E=128 can be
    measured without training them (the model-size table trains them for the quality columns)."""
    if embedding_dim == reference.model.embedding_dim:
        return reference
    torch.manual_seed(seed)
    model = LSTMAutoencoder(reference.channels, embedding_dim).eval().requires_grad_(False)
    name = f"random-e{embedding_dim}"
    reference_shape = (reference.normalisation, reference.threshold, reference.window, reference.channels)
    return ModelArtifact(model, *reference_shape, name, "0", {})


def tutorial_loop(artifact: ModelArtifact, windows: np.ndarray) -> Callable[[], list[float]]:
    """The tutorial's predict loop: one window at a time, a fresh tensor each, batch of 1, L1 error."""
    model = artifact.model
    mean, std = artifact.normalisation.mean, artifact.normalisation.std

    def run() -> list[float]:
        losses = []
        with torch.no_grad():
            for window in windows:
                seq_true = torch.tensor((window - mean) / std, dtype=torch.float32).unsqueeze(0)
                seq_pred = model(seq_true)
                losses.append(torch.nn.functional.l1_loss(seq_pred, seq_true).item())
        return losses

    return run


def tutorial_rates(
    artifact: ModelArtifact, windows: np.ndarray, threads_list: tuple[int, ...], seconds: float, repeats: int
) -> dict[int, Rate]:
    """windows/s of the tutorial loop over 32 windows, by thread count."""
    rates = {}
    for threads in threads_list:
        with threads_set(threads):
            rates[threads] = measure_rate(tutorial_loop(artifact, windows[:32]), 32, seconds, repeats)
    return rates


def make_scorer(artifact: ModelArtifact, backend: str, threads: int) -> Callable[[np.ndarray], object]:
    """The engine's `score` for a backend: torch, torch-bf16 (the daemon's `model.dtype: bfloat16`), onnx (fp32),
    onnx-int8 (dynamic quantisation), or torch-shards (the daemon's `model.workers`: `threads` single-thread torch
    workers, each scoring a slice of the batch)."""
    if backend == "torch":
        return Scorer.from_artifact(artifact).score
    if backend == "torch-bf16":
        return Scorer.from_artifact(artifact, dtype=torch.bfloat16).score
    if backend == "torch-shards":
        return SlicedScorer(Scorer.from_artifact(artifact), threads).score
    if backend == "onnx-int8":
        return int8_scorer(artifact, threads).score
    return OnnxScorer(artifact, threads=threads).score


def int8_scorer(artifact: ModelArtifact, threads: int = 0) -> OnnxScorer:
    """The artifact's scoring graph quantised to dynamic int8 (int8 weights, activations quantised per batch).

    Never used by the daemon and not a drop-in: a window's score depends on the rest of its batch (the
    activation scales are per run), which the accuracy part measures."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="monitor-onnx-") as directory:
        source, target = Path(directory) / "fp32.onnx", Path(directory) / "int8.onnx"
        source.write_bytes(export_onnx(artifact))
        logging.disable(logging.WARNING)  # quantize_dynamic advises "pre-processing" on the root logger: not for LSTMs
        try:
            quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
        finally:
            logging.disable(logging.NOTSET)
        model = onnx.load_model(str(target)).SerializeToString()
    session = ort.InferenceSession(model, session_options(threads), providers=["CPUExecutionProvider"])
    return OnnxScorer(artifact, threads=threads, session=session)


def engine_sweep(reference: ModelArtifact, e: int, windows: np.ndarray, options: Namespace) -> list[Record]:
    """windows/s of the scoring engine at E=`e` for every backend x threads x batch size of the run's `options`."""
    rows: list[Record] = []
    artifact, seconds, repeats = random_artifact(reference, e), options.seconds, options.repeats
    for backend in options.backends:
        if backend == "torch-bf16" and not native_bfloat16():
            print("    torch-bf16 skipped: this CPU has no native bfloat16", flush=True)
            continue
        for threads in options.threads:
            if backend == "torch-shards" and threads < 2:
                continue  # one shard is plain torch on one thread
            with threads_set(1 if backend == "torch-shards" else threads):
                score = make_scorer(artifact, backend, threads)
                for size in options.batches:
                    batch = batch_of(windows, size)
                    rate = measure_rate(lambda batch=batch, score=score: score(batch), size, seconds, repeats)
                    rows.append({"embedding_dim": e, "backend": backend, "threads": threads, "batch": size})
                    rows[-1]["rate"] = rate
                    print(f"    E={e} {backend} {threads}T batch {size}: {rate.median:.1f} windows/s", flush=True)
                    if rate.call_seconds > SLOW_CALL_SECONDS:
                        break  # too slow now: larger batches are not tried
            del score
    return rows


def busy_python_thread(stop: threading.Event) -> None:
    """Pure Python work that never waits, as paho's thread does while it decodes a burst of messages."""
    while not stop.is_set():
        total = 0
        for value in range(200):
            total += value


def gil_contention(
    artifact: ModelArtifact, batch_size: int, windows: np.ndarray, seconds: float, repeats: int
) -> Record:
    """windows/s of the scoring pass op by op from Python (eager) and as the Scorer's TorchScript trace, on one
    thread, alone and next to a busy Python thread; the eager pass takes the GIL back after every operation.

    The four cases are timed in turn, `repeats` rounds, medians reported: a drift of the machine's speed
    during the measurement hits all four alike."""
    graph = ScoringGraph(artifact.model, artifact.normalisation.mean, artifact.normalisation.std).eval()
    traced = Scorer.from_artifact(artifact).score
    batch = batch_of(windows, batch_size)

    def eager(batch: np.ndarray = batch) -> None:
        with torch.inference_mode():
            graph(torch.from_numpy(batch))

    def timed(call: Callable[[], object], busy: bool) -> float:
        stop = threading.Event()
        worker = threading.Thread(target=busy_python_thread, args=(stop,), daemon=True)
        if busy:
            worker.start()
        try:
            return measure_rate(call, batch_size, seconds, 1).median
        finally:
            stop.set()
            if busy:
                worker.join()

    cases: dict[str, list[float]] = {f"{name}_{when}": [] for name in ("eager", "traced") for when in ("alone", "busy")}
    with threads_set(1):
        for _ in range(max(repeats, 3)):
            for case, rates in cases.items():
                rates.append(timed(eager if case.startswith("eager") else lambda: traced(batch), case.endswith("busy")))
    median = {f"{case}_thread" if case.endswith("busy") else case: statistics.median(r) for case, r in cases.items()}
    return {"batch": batch_size, **median}


def train_settings(**overrides: Any) -> Any:
    """The default model's training recipe (configs/train-ecg5000.yaml), paths from the repository root."""
    from monitor.training.trainer import TrainSettings

    data = read_yaml(TRAIN_CONFIG)
    for key in ("train_data", "calibration_data", "evaluate_data", "output"):
        if data.get(key) is not None and not Path(data[key]).is_absolute():
            data[key] = str(REPO / data[key])
    data.update(overrides)
    return validate(TrainSettings, data, str(TRAIN_CONFIG))


def epoch_seconds(settings: Any, epochs: int) -> Record:
    """Seconds per epoch of `fit_model` (training pass + validation pass) with the recipe's threads."""
    from monitor.training.trainer import fit_model, split_normal

    fit, validation, _, _, _ = split_normal(settings)
    normalisation = Normalisation.fit(fit.windows)
    train_x, val_x = normalisation.apply(fit.windows), normalisation.apply(validation)
    threads = settings.threads or torch.get_num_threads()
    short = settings.model_copy(update={"epochs": epochs, "patience": 10**6})
    with threads_set(threads):
        started = time.perf_counter()
        fit_model(short, train_x, val_x)
        elapsed = time.perf_counter() - started
    return {
        "embedding_dim": settings.embedding_dim,
        "threads": threads,
        "epochs": epochs,
        "seconds_per_epoch": elapsed / epochs,
        "windows": len(train_x),
        "batch_size": settings.batch_size,
    }


def recipe_training(model: Path) -> Record:
    """Train the default model from scratch with its recipe, as `monitor train` does, and time it.

    Training is deterministic given the seed and thread count, so the weights should be byte-identical
    to the shipped model's: that is checked and reported."""
    from monitor.training.trainer import train

    with tempfile.TemporaryDirectory(prefix="bench-train-") as directory:
        settings = train_settings(output=directory, report=False)
        started = time.perf_counter()
        result = train(settings)
        wall = time.perf_counter() - started
        same = (Path(directory) / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    return {
        "threads": settings.threads,
        "epochs_run": len(result.train_losses),
        "best_epoch": result.best_epoch,
        "fit_seconds": result.seconds,
        "seconds": wall,
        "auc": result.evaluation.auc if result.evaluation else None,
        "same_weights_as_shipped": same,
    }


def compare_scores(reference: Any, other: Any, threshold: float, anomalous: np.ndarray) -> Record:
    """How far `other` scores are from `reference` and whether the same windows are flagged."""
    diff = np.abs(other.errors.astype(np.float64) - reference.errors)
    profile_diff = np.abs(other.profiles.astype(np.float64) - reference.profiles)
    flagged_ref, flagged = reference.errors > threshold, other.errors > threshold
    evaluation = evaluate_scores(other.errors, anomalous, threshold)
    relative = diff / np.abs(reference.errors)
    return dict(
        windows=int(len(diff)),
        error_max_abs_diff=float(diff.max()),
        error_max_rel_diff=float(relative.max()),
        error_mean_abs_diff=float(diff.mean()),
        error_median_rel_diff_normal=float(np.median(relative[~anomalous])),
        profile_max_abs_diff=float(profile_diff.max()),
        profile_p9999_abs_diff=float(np.quantile(profile_diff, 0.9999)),
        flagged_reference=int(flagged_ref.sum()),
        flagged=int(flagged.sum()),
        decisions_differ=int((flagged_ref != flagged).sum()),
        **quality(evaluation),
    )


def quality(evaluation: Any, keys: tuple[str, ...] = ("auc", "recall", "fpr")) -> Record:
    return {key: getattr(evaluation, key) for key in keys}


def accuracy(artifact: ModelArtifact, data: Path, windows: np.ndarray, anomalous: np.ndarray, int8: bool) -> Record:
    """ONNX Runtime (fp32, and dynamic int8) and torch in bfloat16 (where the CPU has it natively) against the
    torch Scorer in float32 on every test window."""
    threshold = artifact.threshold
    reference = Scorer.from_artifact(artifact).score_all(windows)
    ref_eval = evaluate_scores(reference.errors, anomalous, threshold)
    flagged = int((reference.errors > threshold).sum())
    return dict(
        data=repo_relative(data),
        threshold=threshold,
        closest_score_to_threshold=float(np.abs(reference.errors - threshold).min()),
        torch={"flagged": flagged, **quality(ref_eval)},
        onnx=compare_scores(reference, OnnxScorer(artifact, threads=1).score_all(windows), threshold, anomalous),
        onnx_int8=compare_scores(reference, int8_scorer(artifact, 1).score_all(windows), threshold, anomalous)
        if int8
        else None,
        torch_bfloat16=compare_scores(
            reference, Scorer.from_artifact(artifact, dtype=torch.bfloat16).score_all(windows), threshold, anomalous
        )
        if native_bfloat16()
        else None,
    )


def model_table(windows: np.ndarray, options: Namespace) -> Record:
    """Train each of `options.table_sizes` with the default recipe, epochs capped to fit `options.table_budget`
    seconds; its quality (the recipe's evaluation) and speed (the tutorial loop, the engine at batch 64)."""
    from monitor.training.trainer import train

    rows, budget = [], options.table_budget
    speed_options = Namespace(**{**vars(options), "backends": ("torch", "onnx"), "threads": (1, 2), "batches": (64,)})
    for e in options.table_sizes:
        with tempfile.TemporaryDirectory(prefix=f"bench-e{e}-") as directory:
            probe = epoch_seconds(train_settings(embedding_dim=e), 1)["seconds_per_epoch"]
            epochs = max(1, min(train_settings().epochs, math.floor(budget / probe)))
            print(f"  model table: E={e}: {probe:.1f} s/epoch -> {epochs} epochs in {budget:.0f} s", flush=True)
            result = train(
                train_settings(embedding_dim=e, epochs=epochs, output=directory, report=False, name=f"bench-e{e}")
            )
            artifact = load_artifact(directory)
            speed = {"tutorial_t1": tutorial_rates(artifact, windows, (1,), options.seconds, options.repeats)[1].median}
            for row in engine_sweep(artifact, e, windows, speed_options):
                speed[f"{row['backend']}_b64_t{row['threads']}"] = row["rate"].median
            rows.append(
                dict(
                    embedding_dim=e,
                    flops_per_window=flops_per_window(e, artifact.window, artifact.channels),
                    parameters=sum(p.numel() for p in artifact.model.parameters()),
                    seconds_per_epoch_probe=probe,
                    epochs_cap=epochs,
                    epochs_run=len(result.train_losses),
                    best_epoch=result.best_epoch,
                    train_seconds=result.seconds,
                    threshold=artifact.threshold,
                    **quality(result.evaluation, ("auc", "pr_auc", "recall", "fpr", "precision")),
                    windows_per_second=speed,
                )
            )
    return {"budget_seconds": budget, "recipe": repo_relative(TRAIN_CONFIG), "rows": rows}


def default_model_summary(path: Path) -> Record:
    """What the shipped default model's own metadata says about its training and quality."""
    artifact = load_artifact(path)
    training, evaluation = artifact.metadata.get("training", {}), artifact.metadata.get("evaluation") or {}
    shape = {"embedding_dim": artifact.model.embedding_dim, "window": artifact.window, "channels": artifact.channels}
    return {"path": repo_relative(path), **shape, "threshold": artifact.threshold} | {
        "epochs_run": training.get("epochs_run"),
        "best_epoch": training.get("best_epoch"),
        "train_seconds_recorded": training.get("seconds"),
        **{key: evaluation.get(key) for key in ("auc", "recall", "fpr", "precision")},
    }
