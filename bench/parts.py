"""The benchmark's parts: a registry of name -> a function of the run's `Context` returning the part's record (a
dict), and a function returning the rows of its table in bench/RESULTS.md. A part's docstring gives its heading
(first line) and what it measures (the rest).

A part's record goes to bench/results.json under the part's name (`-` read as `_`); bench/README.md says what each
part measures and how to read it. A new part is one `@part` function here.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import measure, transport
from bench.e2e import RunConfig, daemon_cores, scale_out, sweep
from bench.harness import BEAT_WARMUP_SECONDS, SAMPLE_RATE_HZ, repo_relative
from bench.results import cell
from monitor.model.artifact import ModelArtifact

CEILING_BATCHES = (64, 128, 256)  # batch sizes at which the model's own matmuls are timed (the best counts)
Record = dict[str, Any]
Rows = list[dict[str, Any]]
Measure = Callable[["Context"], Record]


@dataclass(frozen=True)
class Context:
    """What every part may use: the options, the default model, the sizes to measure and the data."""

    args: argparse.Namespace
    artifact: ModelArtifact
    sizes: tuple[int, ...]
    windows: np.ndarray
    anomalous: np.ndarray
    test_data: Path
    normal_data: Path


@dataclass(frozen=True)
class Part:
    name: str
    measure: Measure
    table: Callable[[Record], Rows]
    default: bool

    @property
    def field(self) -> str:
        """The results file's key for this part's record."""
        return self.name.replace("-", "_")

    @property
    def title(self) -> str:
        return (self.measure.__doc__ or self.name).split("\n")[0].strip()

    @property
    def summary(self) -> str:
        return " ".join((self.measure.__doc__ or "").split("\n\n", 1)[-1].split())


PARTS: dict[str, Part] = {}


def part(name: str, table: Callable[[Record], Rows], default: bool = True) -> Callable[[Measure], Measure]:
    """Registers a part; `default=False` parts run only when `--parts` names them."""

    def register(function: Measure) -> Measure:
        PARTS[name] = Part(name, function, table, default)
        return function

    return register


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def limit_rows(record: Record) -> Rows:
    rows = []
    for m in (*record["matmul"].values(), *record["model_matmuls"]):
        if "batch" in m:  # the model's own
            matmuls = f"the model's, E={m['embedding_dim']} batch {m['batch']}"
            rows.append({"matmuls": matmuls, "threads": m["threads"], "GFLOP/s": m["gflops"]})
            rows[-1]["windows/s"] = m["windows_per_second"]
        else:
            rows.append({"matmuls": "dense", "threads": m["threads"], "GFLOP/s": m["gflops"], **m["by_size"]})
    return rows


@part("limit", limit_rows)
def limit(ctx: Context) -> Record:
    """(a) The limit: dense fp32 matmul, and the model's own matmuls

    Dense fp32 `torch.mm` GFLOP/s by thread count (the best run of the best square size, measured before and after
    the rest), and the model's own matmuls alone at the shapes a batch gives them."""
    args, artifact = ctx.args, ctx.artifact
    sizes_mm = (1024, 2048) if args.quick else (1024, 2048, 4096)
    thread_counts = sorted({1, torch.get_num_threads(), *args.threads})
    rates = {t: measure.matmul_rate(t, args.seconds, args.repeats, sizes_mm, None) for t in thread_counts}
    ceilings = []
    for e in ctx.sizes:
        for threads in args.threads:
            for batch in CEILING_BATCHES:
                shape = (e, artifact.window, artifact.channels, batch, threads)
                ceilings.append(measure.model_matmul_rate(*shape, args.seconds, args.repeats))
                print(f"    E={e} {threads}T batch {batch}: {ceilings[-1]['gflops']:.1f} GFLOP/s", flush=True)
    # The dense rate again: a VM's neighbours can slow one measurement for a while; the limit is what it can do.
    for threads in thread_counts:
        rates[threads] = measure.matmul_rate(threads, args.seconds, args.repeats, sizes_mm, rates[threads])
        print(f"    dense, {threads} thread(s): {rates[threads]['gflops']:.1f} GFLOP/s", flush=True)
    best = max(rates, key=lambda threads: rates[threads]["gflops"])
    limit = {"limit_threads": best, "limit_gflops": rates[best]["gflops"]}
    return {"all_threads": torch.get_num_threads(), "matmul": rates, **limit, "model_matmuls": ceilings}


@part(
    "tutorial",
    lambda record: [
        {"E": int(e), "threads": int(threads), "windows/s": rate["median"], "best": rate["best"]}
        for e, by_threads in record["by_embedding"].items()
        for threads, rate in by_threads.items()
    ],
)
def tutorial(ctx: Context) -> Record:
    """(b) The tutorial loop

    The tutorial-style loop: one window at a time, batch 1, torch, by thread count."""
    by_embedding, args = {}, ctx.args
    for e in ctx.sizes:
        model = measure.random_artifact(ctx.artifact, e)
        by_embedding[e] = measure.tutorial_rates(model, ctx.windows, args.threads, args.seconds, args.repeats)
        print(f"    E={e}: " + ", ".join(f"{t}T {r.median:.1f}" for t, r in by_embedding[e].items()), flush=True)
    return {"by_embedding": by_embedding}


def engine_rows(record: Record) -> Rows:
    rows: dict[tuple, Record] = {}
    for row in record["rows"]:
        key = (row["embedding_dim"], row["backend"], row["threads"])
        rows.setdefault(key, {"E": key[0], "backend": key[1], "threads": key[2], "windows/s by batch": {}})
        rows[key]["windows/s by batch"][row["batch"]] = row["rate"]["median"]
    return list(rows.values())


@part("engine", engine_rows)
def engine(ctx: Context) -> Record:
    """(c) The scoring engine alone

    The scoring engine alone (normalisation and error profile included): backends x threads x batch sizes, for each
    model size; medians. Sizes other than the default model's are untrained: speed does not depend on the weights."""
    return {"rows": [row for e in ctx.sizes for row in measure.engine_sweep(ctx.artifact, e, ctx.windows, ctx.args)]}


@part(
    "gil",
    lambda r: [
        {
            "scoring pass": name,
            "share of its rate kept next to a busy thread": r[f"{key}_busy_thread"] / r[f"{key}_alone"],
        }
        for name, key in (("op by op from Python (eager)", "eager"), ("TorchScript trace (Scorer)", "traced"))
    ],
)
def gil(ctx: Context) -> Record:
    """GIL: the engine next to a busy Python thread

    The default model's scoring pass at batch 64 on one thread, eager and traced, alone and next to a busy Python
    thread (windows/s)."""
    result = measure.gil_contention(ctx.artifact, 64, ctx.windows, ctx.args.seconds, ctx.args.repeats)
    print(f"    {result}", flush=True)
    return result


@part(
    "accuracy",
    lambda record: [
        {"backend": "torch", **record["torch"]},
        *({"backend": name, **record[name]} for name in ("onnx", "onnx_int8", "torch_bfloat16") if record.get(name)),
    ],
)
def accuracy(ctx: Context) -> Record:
    """ONNX Runtime and bfloat16 against torch in float32: scores and decisions

    ONNX Runtime's scores (fp32, and dynamic int8 when that backend is asked for) and torch's in bfloat16
    (`model.dtype`, where the CPU has it natively) against torch's in float32 on every test window, and the windows
    flagged at the default model's threshold."""
    int8 = "onnx-int8" in ctx.args.backends
    return measure.accuracy(ctx.artifact, ctx.test_data, ctx.windows, ctx.anomalous, int8)


def training_rows(record: Record) -> Rows:
    timing, full, other = record["timing"], record["full_run"], record["seconds_per_epoch_other_threads"]
    rows = [
        {
            "run": f"{timing['epochs']} epoch(s) timed",
            "threads": timing["threads"],
            "s/epoch": timing["seconds_per_epoch"],
        }
    ]
    rows += [{"run": "timed", "threads": int(threads), "s/epoch": seconds} for threads, seconds in other.items()]
    if full:
        rows.append(
            {"run": "the whole recipe", "threads": full["threads"], "s/epoch": full["seconds"] / full["epochs_run"]}
        )
        rows[-1] |= {
            key: full[key] for key in ("seconds", "epochs_run", "best_epoch", "auc", "same_weights_as_shipped")
        }
    return rows


@part("training", training_rows)
def training(ctx: Context) -> Record:
    """(e) Training time

    Seconds per epoch of the default recipe (training and validation pass) by thread count; not with --quick: the
    whole recipe from scratch, its weights compared byte for byte with the shipped model's."""
    args = ctx.args
    recipe = measure.train_settings()
    timing = measure.epoch_seconds(recipe, args.training_epochs)
    other_threads = {}
    for threads in set(args.threads) - {timing["threads"]}:
        other = measure.epoch_seconds(measure.train_settings(threads=threads), args.training_epochs)
        other_threads[threads] = other["seconds_per_epoch"]
    print(f"    {timing['seconds_per_epoch']:.2f} s/epoch ({timing['threads']} thread(s)); {other_threads}", flush=True)
    full = None if args.quick else measure.recipe_training(args.model)
    recipe_figures = {"recipe": repo_relative(measure.TRAIN_CONFIG), "max_epochs": recipe.epochs}
    return {"timing": timing, "full_run": full, **recipe_figures, "patience": recipe.patience} | {
        "seconds_per_epoch_other_threads": other_threads
    }


@part("transport", lambda record: record["rows"])
def transport_part(ctx: Context) -> Record:
    """MQTT ingest alone, on one core

    A backlog of QoS 1 messages (500 sensors) drained as fast as one process can, by bare paho doing nothing but
    acknowledge and by the daemon's own connection and ingest (no scoring) for each payload format (JSON, binary
    frames, Sparkplug B); the lowest CPU per message of the runs. Then a flood (chunk 4,096): one message from each
    of the 500 sensors and 4,096-sample messages from one more, by bare paho and by the daemon's ingest with its
    default queue bounds (`daemon-flooded`: the flooding sensor's messages dropped before decoding)."""
    chunks = tuple(sorted({config.chunk for config in ctx.args.e2e_configs}))
    count = 5000 if ctx.args.quick else 20000
    rows = transport.transport_rates(ctx.normal_data, chunks, count, ctx.args.repeats, count // 4)
    return {"messages": count, "flood_messages": count // 4, "rows": rows}


def verdict(step: Record) -> str:
    failed = [name for name in ("throughput", "latency") if not step[f"{name}_ok"]]
    failed += [] if step["generator_on_time"] else ["generator late"]
    tries = "" if not step.get("other_attempt") else " (2nd try)" if step["keeps_up"] else " (twice)"
    return (", ".join(failed) or "ok") + tries


def step_rows(record: Record, run_cells: Callable[[Record], Record], step_cells: Callable[[Record], Record]) -> Rows:
    """One row per step of every run: the run's first cell on each of its rows, its other cells on the first."""
    rows = []
    for run in record["runs"]:
        cells = run_cells(run)
        for index, step in enumerate(run["steps"]):
            lead = (
                cells
                if index == 0
                else {key: value if key == next(iter(cells)) else "" for key, value in cells.items()}
            )
            rows.append(lead | {"sensors": step["sensors"], "offered w/s": step["offered_windows_per_second"]})
            rows[-1] |= {"scored w/s": step["scored_windows_per_second"]} | step_cells(step)
    return rows


def e2e_step_cells(step: Record) -> Record:
    cpu = step["cpu_cores"]
    return {
        "msgs/s": step["messages_per_second"],
        "p50 ms": ms(step["latency_p50_seconds"]),
        "p99 ms": ms(step["latency_p99_seconds"]),
        "dropped": step["dropped_windows"],
        "mean batch": step["mean_batch"],
        "CPU daemon (busiest threads)": f"{cell(cpu['daemon'])} ({cell(cpu['daemon_busiest_threads'])})",
        "CPU generator, broker, others": [cpu["generator"], cpu["broker"], cpu["others"]],
        "verdict": verdict(step),
    }


def e2e_rows(record: Record) -> Rows:
    return step_rows(
        record,
        lambda run: {
            "config": RunConfig(**run["config"]).text,
            "carried (throughput only)": f"{run['sensors_carried']} ({run['sensors_carried_throughput_only']})",
        },
        e2e_step_cells,
    )


def end_to_end(ctx: Context, configs: list[RunConfig], warmup: float) -> Record:
    args, runs = ctx.args, []
    for config in configs:
        print(f"   daemon: {config.label}", flush=True)
        runs.append(sweep(args.model, ctx.normal_data, config, args.e2e_steps, warmup, args.e2e_measure))
    measured = {"warmup_seconds": warmup, "measure_seconds": args.e2e_measure, "runs": runs}
    return {"sample_rate_hz": SAMPLE_RATE_HZ, "window": ctx.artifact.window, **measured}


@part("e2e", e2e_rows)
def e2e(ctx: Context) -> Record:
    """(d) The daemon end to end through Mosquitto

    `monitor run` behind a real Mosquitto and a load generator in its own process, 250 Hz sensors stepped up until
    the daemon no longer keeps up, for each configuration of --e2e-configs; a failed step is tried twice."""
    return end_to_end(ctx, ctx.args.e2e_configs, ctx.args.e2e_warmup)


def scaleout_rows(record: Record) -> Rows:
    return step_rows(
        record,
        lambda run: {
            "instances": run["instances"],
            "carried": f"{run['sensors_carried']} ({cell(run['daemon_cpu_ms_per_window'])} ms CPU/window)",
        },
        lambda step: {
            "p99 ms": ms(step["latency_p99_seconds"]),
            "dropped": step["dropped_windows"],
            "CPU daemons": daemon_cores(step["cpu_cores"]),
            "CPU broker": step["cpu_cores"]["broker"],
            "keeps up": step["keeps_up"],
        },
    )


@part("scaleout", scaleout_rows)
def scaleout(ctx: Context) -> Record:
    """One instance against two behind a partitioning broker

    The e2e measurement behind nats-server (deploy/nats, 2 partitions, MQTT 3.1.1): one instance subscribed to both
    partitions, then two with one partition each, with the same load generator and steps."""
    args = ctx.args
    return scale_out(args.model, ctx.normal_data, args.e2e_steps, args.e2e_warmup, args.e2e_measure)


@part("beat-e2e", e2e_rows, default=False)
def beat_e2e(ctx: Context) -> Record:
    """Beat mode next to fixed mode, end to end

    The e2e measurement in fixed mode and in beat mode (models/mitdb-beats; sensors stream record 116 of
    data/mitdb-dev resampled to 250 Hz, the daemon finds the beats and offers one window per scorable beat)."""
    return end_to_end(
        ctx, [RunConfig.parse(text, ctx.args.e2e_qos) for text in ("torch:1", "torch:1:beats")], BEAT_WARMUP_SECONDS
    )


FORMATS_E2E = (
    "torch:1:c140",
    "torch:1:c140:frame",
    "torch:1:c140:frame:s2",
    "torch:1:c140:frame:bf16",
    "torch:1:c140:frame:s2:bf16",
    "torch:1:c140:beats:frame",
)


@part("formats-e2e", e2e_rows, default=False)
def formats_e2e(ctx: Context) -> Record:
    """Payload formats end to end (140 samples a message)

    The e2e measurement for 140-sample messages as JSON, as binary frames (float32, docs/payload-formats.md), as
    binary frames with `model.workers: 2`, with `model.dtype: bfloat16`, with both, and as binary frames in beat
    mode, each after beat mode's warm-up; each format's CPU per message is in the transport part."""
    configs = [RunConfig.parse(text, ctx.args.e2e_qos) for text in FORMATS_E2E]
    return end_to_end(ctx, configs, BEAT_WARMUP_SECONDS)


@part("model-table", lambda record: record["rows"], default=False)
def model_table(ctx: Context) -> Record:
    """(f) Model size: quality against speed

    Each E in --table-sizes trained with the default recipe, its epochs capped to fit --table-budget seconds;
    quality on the test split and the engine's and tutorial loop's windows/s."""
    print(f"    E in {ctx.args.table_sizes}, {ctx.args.table_budget:.0f} s training budget each", flush=True)
    return measure.model_table(ctx.windows, ctx.args)
