"""The benchmark's parts: a registry of name -> what it measures (a function of the run's `Context` returning its
record, a dict) and how its record is shown (a function returning the rows of its table in bench/RESULTS.md).

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

from bench import measure
from bench.e2e import RunConfig
from bench.harness import BEAT_WARMUP_SECONDS, SAMPLE_RATE_HZ, repo_relative
from bench.results import cell
from monitor.model.artifact import ModelArtifact

CEILING_BATCHES = (64, 128, 256)  # batch sizes at which the model's own matmuls are timed (the best counts)
Record = dict[str, Any]
Rows = list[dict[str, Any]]


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
    title: str
    summary: str
    measure: Callable[[Context], Record]
    table: Callable[[Record], Rows]
    default: bool

    @property
    def field(self) -> str:
        """The results file's key for this part's record."""
        return self.name.replace("-", "_")


PARTS: dict[str, Part] = {}


def part(
    name: str, title: str, summary: str, table: Callable[[Record], Rows], default: bool = True
) -> Callable[[Callable[[Context], Record]], Callable[[Context], Record]]:
    """Registers a part; `default=False` parts run only when `--parts` names them."""

    def register(function: Callable[[Context], Record]) -> Callable[[Context], Record]:
        PARTS[name] = Part(name, title, summary, function, table, default)
        return function

    return register


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def limit_rows(record: Record) -> Rows:
    dense = [
        {"matmuls": "dense torch.mm, best square size", "threads": m["threads"], "GFLOP/s": m["gflops"], **m["by_size"]}
        for m in record["matmul"].values()
    ]
    return dense + [
        {"matmuls": f"the model's at E={m['embedding_dim']}, batch {m['batch']}", "threads": m["threads"]}
        | {"GFLOP/s": m["gflops"], "windows/s": m["windows_per_second"]}
        for m in record["model_matmuls"]
    ]


@part("limit", "(a) The limit: dense fp32 matmul", "dense fp32 matmul GFLOP/s and the model's own matmuls", limit_rows)
def limit(ctx: Context) -> Record:
    args, artifact = ctx.args, ctx.artifact
    sizes_mm = (1024, 2048) if args.quick else (1024, 2048, 4096)
    thread_counts = sorted({1, torch.get_num_threads(), *args.thread_list})
    rates = {threads: measure.matmul_rate(threads, args.seconds, args.repeats, sizes_mm) for threads in thread_counts}
    ceilings = []
    for e in ctx.sizes:
        for threads in args.thread_list:
            for batch in CEILING_BATCHES:
                ceilings.append(
                    measure.model_matmul_rate(
                        e, artifact.window, artifact.channels, batch, threads, args.seconds, args.repeats
                    )
                )
                print(f"    E={e} {threads} thread(s) batch {batch}: {ceilings[-1]['gflops']:.1f} GFLOP/s", flush=True)
    # The dense rate again: a VM's neighbours can slow one measurement for a while; the limit is what it can do.
    for threads in thread_counts:
        again = measure.matmul_rate(threads, args.seconds, args.repeats, sizes_mm)
        rates[threads] = measure.best_rate(rates[threads], again)
        print(f"    dense, {threads} thread(s): {rates[threads]['gflops']:.1f} GFLOP/s", flush=True)
    best = max(rates, key=lambda threads: rates[threads]["gflops"])
    return {
        "all_threads": torch.get_num_threads(),
        "matmul": rates,
        "limit_threads": best,
        "limit_gflops": rates[best]["gflops"],
        "model_matmuls": ceilings,
    }


@part(
    "tutorial",
    "(b) The tutorial loop",
    "the tutorial-style loop: one window at a time, batch 1, torch, by thread count",
    lambda record: [
        {"E": int(e), "threads": int(t), "windows/s": rate["median"], "best": rate["best"]}
        for e, by_threads in record["by_embedding"].items()
        for t, rate in by_threads.items()
    ],
)
def tutorial(ctx: Context) -> Record:
    by_embedding = {}
    for e in ctx.sizes:
        model = measure.random_artifact(ctx.artifact, e)
        args = ctx.args
        by_embedding[e] = measure.tutorial_rates(model, ctx.windows, args.thread_list, args.seconds, args.repeats)
        print(f"    E={e}: " + ", ".join(f"{t}T {r.median:.1f}" for t, r in by_embedding[e].items()), flush=True)
    return {"by_embedding": by_embedding}


def engine_rows(record: Record) -> Rows:
    rows: dict[tuple, Record] = {}
    for row in record["rows"]:
        key = (row["embedding_dim"], row["backend"], row["threads"])
        rows.setdefault(key, {"E": key[0], "backend": key[1], "threads": key[2], "windows/s by batch": {}})
        rows[key]["windows/s by batch"][row["batch"]] = row["rate"]["median"]
    return list(rows.values())


@part(
    "engine",
    "(c) The scoring engine alone",
    "the scoring engine alone: backends x threads x batch sizes, for each model size (medians)",
    engine_rows,
)
def engine(ctx: Context) -> Record:
    args, rows = ctx.args, []
    for e in ctx.sizes:
        model = measure.random_artifact(ctx.artifact, e)
        rows += measure.engine_sweep(
            model, ctx.windows, args.backend_list, args.thread_list, args.batch_list, args.seconds, args.repeats
        )
    return {"rows": rows}


@part(
    "gil",
    "GIL: the engine next to a busy Python thread",
    "the scoring pass at batch 64 on one thread, eager and traced, alone and next to a busy Python thread",
    lambda r: [
        {
            "scoring pass": name,
            "share of its rate kept next to a busy thread": r[f"{key}_busy_thread"] / r[f"{key}_alone"],
        }
        for name, key in (("op by op from Python (eager)", "eager"), ("TorchScript trace (Scorer)", "traced"))
    ],
)
def gil(ctx: Context) -> Record:
    result = measure.gil_contention(ctx.artifact, 64, ctx.windows, ctx.args.seconds, ctx.args.repeats)
    print(f"    {result}", flush=True)
    return result


@part(
    "accuracy",
    "ONNX Runtime against torch: scores and decisions",
    "ONNX Runtime's scores (fp32 and int8) against torch's on every test window",
    lambda record: [
        {"backend": "torch", **record["torch"]},
        *({"backend": name, **record[name]} for name in ("onnx", "onnx_int8") if record.get(name)),
    ],
)
def accuracy(ctx: Context) -> Record:
    int8 = "onnx-int8" in ctx.args.backend_list
    return measure.accuracy(ctx.artifact, ctx.test_data, ctx.windows, ctx.anomalous, int8)


def training_rows(record: Record) -> Rows:
    timing, full = record["timing"], record["full_run"]
    rows = [
        {
            "run": f"{timing['epochs']} epoch(s) timed",
            "threads": timing["threads"],
            "s/epoch": timing["seconds_per_epoch"],
        }
    ]
    rows += [
        {"run": "timed", "threads": int(threads), "s/epoch": seconds}
        for threads, seconds in record["seconds_per_epoch_other_threads"].items()
    ]
    if full:
        rows.append(
            {"run": "the whole recipe", "threads": full["threads"], "s/epoch": full["seconds"] / full["epochs_run"]}
        )
        rows[-1] |= {
            key: full[key] for key in ("seconds", "epochs_run", "best_epoch", "auc", "same_weights_as_shipped")
        }
    return rows


@part(
    "training",
    "(e) Training time",
    "seconds per epoch of the default recipe; not with --quick: the whole recipe from scratch",
    training_rows,
)
def training(ctx: Context) -> Record:
    args = ctx.args
    recipe = measure.train_settings()
    timing = measure.epoch_seconds(recipe, args.training_epochs)
    other_threads = {}
    for threads in args.thread_list:
        if threads != timing["threads"]:
            other = measure.epoch_seconds(measure.train_settings(threads=threads), args.training_epochs)
            other_threads[threads] = other["seconds_per_epoch"]
    print(f"    {timing['seconds_per_epoch']:.2f} s/epoch ({timing['threads']} thread(s)); {other_threads}", flush=True)
    full = None if args.quick else measure.recipe_training(args.model)
    return {
        "timing": timing,
        "full_run": full,
        "recipe": repo_relative(measure.TRAIN_CONFIG),
        "max_epochs": recipe.epochs,
        "patience": recipe.patience,
        "seconds_per_epoch_other_threads": other_threads,
    }


@part(
    "transport",
    "MQTT ingest alone, on one core",
    "MQTT ingest alone on one core: a QoS 1 backlog drained by bare paho and by the daemon's ingest",
    lambda record: record["rows"],
)
def transport(ctx: Context) -> Record:
    from bench import transport

    chunks = tuple(sorted({config.chunk for config in ctx.args.e2e_config_list}))
    count = 5000 if ctx.args.quick else 20000
    return {"messages": count, "rows": transport.transport_rates(ctx.normal_data, chunks, count, ctx.args.repeats)}


def verdict(step: Record) -> str:
    failed = [name for name in ("throughput", "latency") if not step[f"{name}_ok"]]
    failed += [] if step["generator_on_time"] else ["generator late"]
    tries = "" if not step.get("other_attempt") else " (2nd try)" if step["keeps_up"] else " (twice)"
    return (", ".join(failed) or "ok") + tries


def e2e_rows(record: Record) -> Rows:
    rows = []
    for run in record["runs"]:
        for index, step in enumerate(run["steps"]):
            cpu = step["cpu_cores"]
            rows.append(
                {
                    "config": RunConfig(**run["config"]).text,
                    "carried (throughput only)": ""
                    if index
                    else f"{run['sensors_carried']} ({run['sensors_carried_throughput_only']})",
                    "sensors": step["sensors"],
                    "offered w/s": step["offered_windows_per_second"],
                    "scored w/s": step["scored_windows_per_second"],
                    "msgs/s": step["messages_per_second"],
                    "p50 ms": ms(step["latency_p50_seconds"]),
                    "p99 ms": ms(step["latency_p99_seconds"]),
                    "dropped": step["dropped_windows"],
                    "mean batch": step["mean_batch"],
                    "CPU daemon (busiest threads)": f"{cell(cpu['daemon'])} ({cell(cpu['daemon_busiest_threads'])})",
                    "CPU generator": cpu["generator"],
                    "CPU broker": cpu["broker"],
                    "CPU others": cpu["others"],
                    "verdict": verdict(step),
                }
            )
    return rows


@part(
    "e2e",
    "(d) The daemon end to end through Mosquitto",
    "the daemon end to end through Mosquitto, sensors stepped up until it no longer keeps up",
    e2e_rows,
)
def e2e(ctx: Context) -> Record:
    from bench.e2e import sweep

    args, runs = ctx.args, []
    for config in args.e2e_config_list:
        print(f"   daemon: {config.label}", flush=True)
        runs.append(sweep(args.model, ctx.normal_data, config, args.e2e_step_list, args.e2e_warmup, args.e2e_measure))
    return end_to_end(ctx, args.e2e_warmup, runs)


def end_to_end(ctx: Context, warmup: float, runs: list[Record]) -> Record:
    window, measured = ctx.artifact.window, ctx.args.e2e_measure
    return {
        "sample_rate_hz": SAMPLE_RATE_HZ,
        "window": window,
        "warmup_seconds": warmup,
        "measure_seconds": measured,
        "runs": runs,
    }


def scaleout_rows(record: Record) -> Rows:
    rows = []
    for run in record["runs"]:
        for index, step in enumerate(run["steps"]):
            carried = f"{run['sensors_carried']} ({cell(run['daemon_cpu_ms_per_window'])} ms CPU/window)"
            rows.append(
                {
                    "instances": run["instances"],
                    "carried": "" if index else carried,
                    "sensors": step["sensors"],
                    "offered w/s": step["offered_windows_per_second"],
                    "scored w/s": step["scored_windows_per_second"],
                    "p99 ms": ms(step["latency_p99_seconds"]),
                    "dropped": step["dropped_windows"],
                    "CPU cores": step["cpu_cores"],
                    "keeps up": step["keeps_up"],
                }
            )
    return rows


@part(
    "scaleout",
    "One instance against two behind a partitioning broker",
    "one instance against two behind the same partitioning nats-server, with the same load generator",
    scaleout_rows,
)
def scaleout(ctx: Context) -> Record:
    from bench.e2e import scale_out

    args = ctx.args
    return scale_out(args.model, ctx.normal_data, args.e2e_step_list, args.e2e_warmup, args.e2e_measure)


@part(
    "beat-e2e",
    "Beat mode next to fixed mode, end to end",
    "beat mode (raw ECG, record 116 of data/mitdb-dev at 250 Hz, one window per beat) next to fixed mode",
    e2e_rows,
    default=False,
)
def beat_e2e(ctx: Context) -> Record:
    from bench.e2e import sweep

    args, runs = ctx.args, []
    for text in ("torch:1", "torch:1:beats"):
        config = RunConfig.parse(text, args.e2e_qos)
        print(f"   daemon: {config.label}", flush=True)
        runs.append(
            sweep(args.model, ctx.normal_data, config, args.e2e_step_list, BEAT_WARMUP_SECONDS, args.e2e_measure)
        )
    return end_to_end(ctx, BEAT_WARMUP_SECONDS, runs)


@part(
    "model-table",
    "(f) Model size: quality against speed",
    "trains E in --table-sizes within --table-budget each: quality against speed",
    lambda record: record["rows"],
    default=False,
)
def model_table(ctx: Context) -> Record:
    args = ctx.args
    print(f"    E in {args.table_size_list}, {args.table_budget:.0f} s training budget each", flush=True)
    return measure.model_table(
        args.table_size_list, args.table_budget, ctx.windows, ctx.anomalous, args.seconds, args.repeats
    )
