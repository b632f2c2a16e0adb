"""The benchmark's parts: a registry of name -> function of the run's `Context` returning its typed section.

Each part's section replaces the `Results` field of the same name (`-` read as `_`); bench/README.md says
what each part measures and how to read it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench import measure
from bench.records import (
    Accuracy,
    EndToEnd,
    Engine,
    Gil,
    Limit,
    ModelMatmul,
    ModelTable,
    ScaleOut,
    Stamp,
    Training,
    Transport,
    Tutorial,
)
from monitor.model.artifact import ModelArtifact

CEILING_BATCHES = (64, 128, 256)  # batch sizes at which the model's own matmuls are timed (the best counts)


@dataclass(frozen=True)
class Context:
    """What every part may use: the options, the default model, the sizes to measure and the test split."""

    args: argparse.Namespace
    artifact: ModelArtifact
    sizes: tuple[int, ...]
    windows: np.ndarray
    anomalous: np.ndarray
    test_data: Path
    normal_data: Path

    def stamp(self) -> Stamp:
        return Stamp.now(self.args.quick)


@dataclass(frozen=True)
class Part:
    name: str
    summary: str
    measure: Callable[[Context], object]
    default: bool

    @property
    def field(self) -> str:
        """The `Results` field this part's section goes to."""
        return self.name.replace("-", "_")


PARTS: dict[str, Part] = {}


def part(
    name: str, summary: str, default: bool = True
) -> Callable[[Callable[[Context], object]], Callable[[Context], object]]:
    """Registers a part; `default=False` parts run only when `--parts` names them."""

    def register(function: Callable[[Context], object]) -> Callable[[Context], object]:
        PARTS[name] = Part(name, summary, function, default)
        return function

    return register


@part("limit", "dense fp32 matmul GFLOP/s (the limit) and the model's own matmuls at their shapes")
def limit(ctx: Context) -> Limit:
    args, artifact, stamp = ctx.args, ctx.artifact, ctx.stamp()
    sizes_mm = (1024, 2048) if args.quick else (1024, 2048, 4096)
    thread_counts = sorted({1, torch.get_num_threads(), *args.thread_list})
    rates = {threads: measure.matmul_rate(threads, args.seconds, args.repeats, sizes_mm) for threads in thread_counts}
    print("    the model's own matmuls at its shapes (no gate work)", flush=True)
    ceilings: list[ModelMatmul] = []
    for e in ctx.sizes:
        for threads in args.thread_list:
            for batch in CEILING_BATCHES:
                ceiling = measure.model_matmul_rate(
                    e, artifact.window, artifact.channels, batch, threads, args.seconds, args.repeats
                )
                ceilings.append(ceiling)
                print(f"    E={e} {threads} thread(s) batch {batch}: {ceiling.gflops:.1f} GFLOP/s", flush=True)
    # The dense rate again: a VM's neighbours can slow one measurement for a while; the limit is what it can do.
    for threads in thread_counts:
        rates[threads] = measure.best_rate(
            rates[threads], measure.matmul_rate(threads, args.seconds, args.repeats, sizes_mm)
        )
        print(
            f"    dense, {threads} thread(s): {rates[threads].gflops:.1f} GFLOP/s (n={rates[threads].size})", flush=True
        )
    best = max(rates, key=lambda threads: rates[threads].gflops)
    return Limit(stamp, torch.get_num_threads(), rates, best, rates[best].gflops, ceilings)


@part("tutorial", "the tutorial-style loop: one window at a time, batch 1, torch, by thread count")
def tutorial(ctx: Context) -> Tutorial:
    args, stamp = ctx.args, ctx.stamp()
    by_embedding = {}
    for e in ctx.sizes:
        model = measure.random_artifact(ctx.artifact, e)
        rates = measure.tutorial_rates(model, ctx.windows, args.thread_list, args.seconds, args.repeats)
        by_embedding[e] = rates
        print(
            f"    E={e}: " + ", ".join(f"{t} thread(s) {r.median:.1f} windows/s" for t, r in rates.items()), flush=True
        )
    return Tutorial(stamp, by_embedding)


@part("engine", "the scoring engine alone: backends x threads x batch sizes, for each model size")
def engine(ctx: Context) -> Engine:
    args, stamp = ctx.args, ctx.stamp()
    rows = []
    for e in ctx.sizes:
        model = measure.random_artifact(ctx.artifact, e)
        rows += measure.engine_sweep(
            model, ctx.windows, args.backend_list, args.thread_list, args.batch_list, args.seconds, args.repeats
        )
    return Engine(stamp, rows)


@part("gil", "the scoring pass, eager and traced, alone and next to a busy Python thread")
def gil(ctx: Context) -> Gil:
    result = measure.gil_contention(ctx.stamp(), ctx.artifact, 64, ctx.windows, ctx.args.seconds, ctx.args.repeats)
    print(
        f"    batch 64, 1 thread: eager {result.eager_busy_thread:.0f} windows/s (alone {result.eager_alone:.0f}), "
        f"traced {result.traced_busy_thread:.0f} (alone {result.traced_alone:.0f})",
        flush=True,
    )
    return result


@part("accuracy", "ONNX Runtime's scores (fp32 and int8) against torch's on every test window")
def accuracy(ctx: Context) -> Accuracy:
    int8 = "onnx-int8" in ctx.args.backend_list
    result = measure.accuracy(ctx.stamp(), ctx.artifact, ctx.test_data, ctx.windows, ctx.anomalous, int8)
    for name, agreement in (("onnx", result.onnx), ("onnx-int8", result.onnx_int8)):
        if agreement:
            print(
                f"    {name}: max |d score| {agreement.error_max_abs_diff:.2e}, "
                f"decisions differing {agreement.decisions_differ}",
                flush=True,
            )
    return result


@part("training", "seconds per epoch of the default recipe; not with --quick: the whole recipe from scratch")
def training(ctx: Context) -> Training:
    args, stamp = ctx.args, ctx.stamp()
    recipe = measure.train_settings()
    timing = measure.epoch_seconds(recipe, args.training_epochs)
    print(f"    {timing.seconds_per_epoch:.2f} s/epoch ({timing.threads} thread(s), the recipe's)", flush=True)
    other_threads = {}
    for threads in args.thread_list:
        if threads != timing.threads:
            other = measure.epoch_seconds(measure.train_settings(threads=threads), args.training_epochs)
            other_threads[threads] = other.seconds_per_epoch
            print(f"    {other.seconds_per_epoch:.2f} s/epoch ({threads} thread(s))", flush=True)
    full = None
    if not args.quick:
        print("    training the default model from scratch with its recipe", flush=True)
        full = measure.recipe_training(args.model)
        print(
            f"    {full.seconds:.0f} s, {full.epochs_run} epochs, "
            f"weights identical to the shipped model: {full.same_weights_as_shipped}",
            flush=True,
        )
    recipe_path = measure.repo_relative(measure.TRAIN_CONFIG)
    return Training(stamp, timing, full, recipe_path, recipe.epochs, recipe.patience, other_threads)


@part("transport", "MQTT ingest alone on one core: a QoS 1 backlog drained by bare paho and by the daemon's ingest")
def transport(ctx: Context) -> Transport:
    from bench import transport

    stamp = ctx.stamp()
    chunks = tuple(sorted({config.chunk for config in ctx.args.e2e_config_list}))
    count = 5000 if ctx.args.quick else 20000
    return Transport(stamp, count, transport.transport_rates(ctx.normal_data, chunks, count, ctx.args.repeats))


@part("e2e", "the daemon end to end through Mosquitto, sensors stepped up until it no longer keeps up")
def e2e(ctx: Context) -> EndToEnd:
    from bench import e2e, targets

    args, stamp = ctx.args, ctx.stamp()
    runs = []
    for config in args.e2e_config_list:
        print(f"   daemon: {config.label}", flush=True)
        runs.append(
            e2e.sweep(args.model, ctx.normal_data, config, args.e2e_step_list, args.e2e_warmup, args.e2e_measure)
        )
    window = ctx.artifact.window
    return EndToEnd(stamp, targets.SAMPLE_RATE_HZ, window, args.e2e_warmup, args.e2e_measure, runs)


@part("scaleout", "one instance against two behind the same partitioning nats-server, with the same load generator")
def scaleout(ctx: Context) -> ScaleOut:
    from bench import scaleout

    args = ctx.args
    steps = args.e2e_step_list
    return scaleout.compare(ctx.stamp(), args.model, ctx.normal_data, steps, args.e2e_warmup, args.e2e_measure)


@part("beat-e2e", "beat mode (raw ECG, one window per beat) next to fixed mode, end to end", default=False)
def beat_e2e(ctx: Context) -> EndToEnd:
    """Fixed mode (ECG5000 beats, the default model) and beat mode (record 116 of data/mitdb-dev resampled to
    250 Hz, models/mitdb-beats), stepped as the e2e part steps, after a warm-up long enough for beat mode."""
    from bench import e2e, targets
    from bench.records import RunConfig

    args, stamp = ctx.args, ctx.stamp()
    warmup = targets.BEAT_WARMUP_SECONDS
    runs = []
    for text in ("torch:1", "torch:1:beats"):
        config = RunConfig.parse(text, args.e2e_qos)
        print(f"   daemon: {config.label}", flush=True)
        runs.append(e2e.sweep(args.model, ctx.normal_data, config, args.e2e_step_list, warmup, args.e2e_measure))
    return EndToEnd(stamp, targets.SAMPLE_RATE_HZ, ctx.artifact.window, warmup, args.e2e_measure, runs)


FORMATS_E2E = ("torch:1:c140", "torch:1:c140:frame", "torch:1:c140:beats:frame")


@part("formats-e2e", "140-sample messages as JSON and as binary frames, fixed and beat mode, end to end", default=False)
def formats_e2e(ctx: Context) -> EndToEnd:
    """The configurations of `FORMATS_E2E`, stepped as the e2e part steps, each after beat mode's warm-up."""
    from bench import e2e, targets
    from bench.records import RunConfig

    args, stamp = ctx.args, ctx.stamp()
    warmup = targets.BEAT_WARMUP_SECONDS
    runs = []
    for text in FORMATS_E2E:
        config = RunConfig.parse(text, args.e2e_qos)
        print(f"   daemon: {config.label}", flush=True)
        runs.append(e2e.sweep(args.model, ctx.normal_data, config, args.e2e_step_list, warmup, args.e2e_measure))
    return EndToEnd(stamp, targets.SAMPLE_RATE_HZ, ctx.artifact.window, warmup, args.e2e_measure, runs)


@part("model-table", "trains E in --table-sizes within --table-budget each: quality against speed", default=False)
def model_table(ctx: Context) -> ModelTable:
    args = ctx.args
    print(f"    E in {args.table_size_list}, {args.table_budget:.0f} s training budget each", flush=True)
    return measure.model_table(
        ctx.stamp(), args.table_size_list, args.table_budget, ctx.windows, ctx.anomalous, args.seconds, args.repeats
    )
