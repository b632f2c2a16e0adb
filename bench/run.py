"""`python -m bench.run`: the monitor's benchmark, side by side in one process on one machine.

Parts (`--parts`, comma separated; default all of them):
  limit     dense fp32 matmul GFLOP/s with torch on 1 thread and on all threads (the limit is the
            best of them), and the model's analytic FLOPs per window: limit windows/s = rate / FLOPs;
            also the model's own matmuls alone at their small shapes (a ceiling below the limit)
  tutorial  the tutorial-style loop: one window at a time, batch 1, torch, on 1 and 2 threads
  engine    the scoring engine alone (Scorer torch, OnnxScorer fp32 and dynamic int8, and the
            bench-only torch-shards variant) at batch sizes 1..512 with 1 and 2 threads, for the
            default model and untrained models of the other sizes (speed does not depend on weights)
  gil       the scoring pass, eager and as the Scorer's TorchScript trace, alone and next to a busy
            Python thread (as paho's thread is in the daemon)
  accuracy  ONNX Runtime's scores against torch's on every window of splits/test.txt
  training  seconds per epoch of the default recipe (configs/train-ecg5000.yaml), 1 and 2 threads,
            and (not with --quick) the whole recipe run from scratch, checked against the shipped weights
  transport MQTT ingest alone, on one core: a backlog of QoS 1 messages drained from Mosquitto by
            bare paho and by the daemon's own MqttConnection + Ingest (no scoring): CPU per message
  e2e       the daemon end to end: Mosquitto, `monitor run`, a load generator process stepping the
            number of 250 Hz sensors up until the daemon no longer keeps up, for several daemon
            configurations (--e2e-configs)
`--model-table` also trains E in {32, 64, 128} with the default recipe within a wall-clock budget
per model (--table-budget, default 300 s) and measures quality and speed (about 16 minutes).

Run from the repository root with the project's venv (the test extra and the onnx extra installed;
the e2e part needs Mosquitto): the full run takes about 25 minutes on a quiet 2-core machine.

Results are merged into bench/results.json (parts not run keep their previous figures, each with
its own date) and bench/RESULTS.md is regenerated from it. `--quick` is a smoke run (short timings,
few steps); its figures are marked as such.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # no training progress bars in the bench output

import numpy as np  # noqa: E402
import orjson  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from bench import measure  # noqa: E402
from bench.report import render  # noqa: E402

PARTS = ("limit", "tutorial", "engine", "gil", "accuracy", "training", "transport", "e2e")
BENCH_DIR = Path(__file__).resolve().parent
FULL_STEPS = (100, 200, 400, 600, 800, 1000, 1200, 1600, 2000, 2400, 3200)
# The daemon's defaults; smaller batches (latency); ONNX Runtime; two threads; then what lightens paho's per-message work:
# MQTT 3.1.1 instead of 5, sensors at QoS 0, and 140-sample messages (a quarter of the messages).
FULL_E2E = ("torch:1", "torch:1:b32", "onnx:1:b32", "torch:2", "torch:1:b32:p311", "torch:1:b32:qos0", "torch:1:b32:c140")
QUICK_STEPS = (100, 400)
CEILING_BATCHES = (64, 128, 256)  # batch sizes at which the model's own matmuls are timed (the best counts)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke mode: short timings, E=32 only, two e2e steps (about 2 minutes)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts to run, or 'none' (default: {','.join(PARTS)})")
    parser.add_argument("--model-table", action="store_true", help="also train E=32/64/128 and tabulate quality x speed (~15 min)")
    parser.add_argument("--table-budget", type=float, default=300.0, help="wall-clock training budget per model of the table, seconds (default 300)")
    parser.add_argument("--table-sizes", default="32,64,128", help="embedding sizes of the model table")
    parser.add_argument("--model", type=Path, default=measure.DEFAULT_MODEL, help="the default model artifact (default models/ecg5000)")
    parser.add_argument("--sizes", default=None, help="embedding sizes for the tutorial/engine parts (default 32,64,128; quick: the model's)")
    parser.add_argument("--backends", default="torch,torch-shards,onnx,onnx-int8", help="engine backends: torch, torch-shards, onnx, onnx-int8")
    parser.add_argument("--batches", default=None, help="engine batch sizes (default 1,8,32,64,128,256,512; quick: 1,64,256)")
    parser.add_argument("--threads", default="1,2", help="thread counts for the tutorial and engine parts")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per timing run (default 0.6; quick 0.15)")
    parser.add_argument("--repeats", type=int, default=None, help="timing runs per figure, the median is reported (default 3; quick 1)")
    parser.add_argument(
        "--e2e-configs",
        default=None,
        help=f"daemon runs as backend:threads[:qosN][:bMAX_BATCH][:wMAX_WAIT_MS][:cSAMPLES_PER_MESSAGE][:p311] (default {','.join(FULL_E2E)}; quick torch:1)",
    )
    parser.add_argument("--e2e-steps", default=None, help=f"sensor counts to step through (default {','.join(map(str, FULL_STEPS))}; quick 100,400)")
    parser.add_argument("--e2e-warmup", type=float, default=None, help="seconds of load before measuring each step (default 4; quick 3)")
    parser.add_argument("--e2e-measure", type=float, default=None, help="seconds measured per step (default 10; quick 5)")
    parser.add_argument(
        "--e2e-qos", type=int, default=1, choices=(0, 1), help="QoS the load generator publishes with, unless a config says (default 1, as monitor replay)"
    )
    parser.add_argument("--training-epochs", type=int, default=None, help="epochs timed for the training part (default 3; quick 1)")
    parser.add_argument("--output-dir", type=Path, default=BENCH_DIR, help="where results.json and RESULTS.md go (default bench/)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.part_list = [] if args.parts.strip() == "none" else [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = set(args.part_list) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))} (known: {', '.join(PARTS)})")
    args.size_list = ints(args.sizes) if args.sizes else None
    args.backend_list = tuple(item.strip() for item in args.backends.split(",") if item.strip())
    args.batch_list = ints(args.batches) if args.batches else ((1, 64, 256) if quick else measure.BATCHES)
    args.thread_list = ints(args.threads)
    args.seconds = args.seconds or (0.15 if quick else 0.6)
    args.repeats = args.repeats or (1 if quick else 3)
    configs = args.e2e_configs or ("torch:1" if quick else ",".join(FULL_E2E))
    from bench.e2e import RunConfig

    try:
        args.e2e_config_list = [RunConfig.parse(item, args.e2e_qos) for item in configs.split(",") if item.strip()]
    except ValueError as error:
        parser.error(f"--e2e-configs: {error}")
    args.e2e_step_list = list(ints(args.e2e_steps)) if args.e2e_steps else list(QUICK_STEPS if quick else FULL_STEPS)
    args.e2e_warmup = args.e2e_warmup or (3.0 if quick else 4.0)
    args.e2e_measure = args.e2e_measure or (5.0 if quick else 10.0)
    args.training_epochs = args.training_epochs or (1 if quick else 3)
    args.table_size_list = ints(args.table_sizes)
    return args


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(item) for item in text.split(",") if item.strip())


def machine() -> dict[str, Any]:
    import onnxruntime
    import paho.mqtt

    cpu_model, flags = platform.processor(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = line + " "
    except OSError:
        pass
    return {
        "cpu": cpu_model,
        "cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "avx2": " avx2 " in flags,
        "avx512f": " avx512f " in flags,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "paho_mqtt": paho.mqtt.__version__,
        "torch_default_threads": torch.get_num_threads(),
    }


def stamp(args: argparse.Namespace) -> dict[str, Any]:
    return {"measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "quick": args.quick, "load_average_1m": os.getloadavg()[0]}


def load_results(path: Path) -> dict[str, Any]:
    if path.is_file():
        try:
            return orjson.loads(path.read_bytes())
        except orjson.JSONDecodeError:
            return {}
    return {}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results_path, report_path = args.output_dir / "results.json", args.output_dir / "RESULTS.md"
    results = load_results(results_path)
    results["machine"] = machine()
    results["last_run"] = {"command": "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:]), **stamp(args)}
    started = time.perf_counter()
    artifact = measure.load_artifact(args.model)
    default_e = artifact.model.embedding_dim
    sizes = args.size_list or ((default_e,) if args.quick else tuple(sorted({default_e, 32, 64, 128})))
    windows, anomalous = measure.load_test()
    results["default_model"] = measure.default_model_summary(args.model)
    results["flops"] = {
        "formula": measure.FLOPS_FORMULA,
        "per_window": {str(e): measure.flops_per_window(e, artifact.window, artifact.channels) for e in sorted({*sizes, *args.table_size_list, default_e})},
        "window": artifact.window,
        "channels": artifact.channels,
    }
    print(
        f"bench: model {args.model} (E={default_e}), parts {args.part_list or 'none'}{' + model table' if args.model_table else ''}"
        f"{' (quick)' if args.quick else ''}",
        flush=True,
    )

    if "limit" in args.part_list:
        print("  (a) dense fp32 matmul rate", flush=True)
        sizes_mm = (1024, 2048) if args.quick else (1024, 2048, 4096)
        thread_counts = sorted({1, torch.get_num_threads(), *args.thread_list})
        rates = {str(threads): measure.matmul_rate(threads, args.seconds, args.repeats, sizes_mm) for threads in thread_counts}
        print("    the model's own matmuls at its shapes (no gate work)", flush=True)
        ceilings = []
        for e in sizes:
            for threads in args.thread_list:
                for batch in CEILING_BATCHES:
                    ceilings.append(measure.model_matmul_rate(e, artifact.window, artifact.channels, batch, threads, args.seconds, args.repeats))
                    print(f"    E={e} {threads} thread(s) batch {batch}: {ceilings[-1]['gflops']:.1f} GFLOP/s", flush=True)
        # The dense rate again: a VM's neighbours can slow one measurement for a while, and the limit is what the machine can do.
        for threads in thread_counts:
            rates[str(threads)] = measure.best_rate(rates[str(threads)], measure.matmul_rate(threads, args.seconds, args.repeats, sizes_mm))
            print(f"    dense, {threads} thread(s): {rates[str(threads)]['gflops']:.1f} GFLOP/s (n={rates[str(threads)]['size']})", flush=True)
        best = max(rates, key=lambda t: rates[t]["gflops"])
        results["limit"] = {
            **stamp(args),
            "all_threads": torch.get_num_threads(),
            "matmul": rates,
            "limit_threads": int(best),
            "limit_gflops": rates[best]["gflops"],
            "model_matmuls": ceilings,
        }

    if "tutorial" in args.part_list:
        print("  (b) tutorial loop: batch 1, one window at a time", flush=True)
        tutorial = {}
        for e in sizes:
            tutorial[str(e)] = measure.tutorial_rates(measure.random_artifact(artifact, e), windows, args.thread_list, args.seconds, args.repeats)
            summary = ", ".join(f"{t} thread(s) {r['median']:.1f} windows/s" for t, r in tutorial[str(e)].items())
            print(f"    E={e}: {summary}", flush=True)
        results["tutorial"] = {**stamp(args), "by_embedding": tutorial}

    if "engine" in args.part_list:
        print("  (c) scoring engine alone", flush=True)
        rows = []
        for e in sizes:
            rows += measure.engine_sweep(
                measure.random_artifact(artifact, e), windows, args.backend_list, args.thread_list, args.batch_list, args.seconds, args.repeats
            )
        results["engine"] = {**stamp(args), "rows": rows}

    if "gil" in args.part_list:
        print("  (c) the engine next to a busy Python thread", flush=True)
        contention = measure.gil_contention(artifact, 64, windows, args.seconds, args.repeats)
        print(
            f"    batch 64, 1 thread: eager {contention['eager_busy_thread']:.0f} windows/s (alone {contention['eager_alone']:.0f}), "
            f"traced {contention['traced_busy_thread']:.0f} (alone {contention['traced_alone']:.0f})",
            flush=True,
        )
        results["gil"] = {**stamp(args), **contention}

    if "accuracy" in args.part_list:
        print("  ONNX Runtime vs torch scores on splits/test.txt", flush=True)
        results["accuracy"] = {**stamp(args), **measure.accuracy(artifact, windows, anomalous, int8="onnx-int8" in args.backend_list)}
        acc = results["accuracy"]
        for name in ("onnx", "onnx-int8"):
            if name in acc:
                print(f"    {name}: max |d score| {acc[name]['error_max_abs_diff']:.2e}, decisions differing {acc[name]['decisions_differ']}", flush=True)

    if "training" in args.part_list:
        print("  (e) training time per epoch (default recipe)", flush=True)
        recipe = measure.train_settings()
        timing = measure.epoch_seconds(recipe, args.training_epochs)
        print(f"    {timing['seconds_per_epoch']:.2f} s/epoch ({timing['threads']} thread(s), the recipe's)", flush=True)
        other_threads = {}
        for threads in args.thread_list:
            if threads != timing["threads"]:
                other = measure.epoch_seconds(measure.train_settings(threads=threads), args.training_epochs)
                other_threads[str(threads)] = other["seconds_per_epoch"]
                print(f"    {other['seconds_per_epoch']:.2f} s/epoch ({threads} thread(s))", flush=True)
        full = None
        if not args.quick:
            print("    training the default model from scratch with its recipe", flush=True)
            full = measure.recipe_training(args.model)
            same = full["same_weights_as_shipped"]
            print(f"    {full['seconds']:.0f} s, {full['epochs_run']} epochs, weights identical to the shipped model: {same}", flush=True)
        results["training"] = {
            **stamp(args),
            **timing,
            "full_run": full,
            "recipe": str(measure.TRAIN_CONFIG.relative_to(measure.REPO)),
            "max_epochs": recipe.epochs,
            "patience": recipe.patience,
            "seconds_per_epoch_other_threads": other_threads,
        }

    if "transport" in args.part_list:
        print("  (d) MQTT ingest alone: a backlog drained on one core", flush=True)
        from bench import transport

        chunks = tuple(sorted({config.chunk for config in args.e2e_config_list}))
        count = 5000 if args.quick else 20000
        results["transport"] = {**stamp(args), "messages": count, "rows": transport.transport_rates(chunks, count, args.repeats)}

    if "e2e" in args.part_list:
        print("  (d) end to end through Mosquitto", flush=True)
        from bench import e2e

        runs = []
        for config in args.e2e_config_list:
            print(f"   daemon: {config.label}", flush=True)
            runs.append(e2e.sweep(args.model, config, args.e2e_step_list, args.e2e_warmup, args.e2e_measure))
        results["e2e"] = {
            **stamp(args),
            "sample_rate_hz": 250,
            "window": artifact.window,
            "warmup_seconds": args.e2e_warmup,
            "measure_seconds": args.e2e_measure,
            "runs": runs,
        }

    if args.model_table:
        print(f"  (f) model-size table: E in {args.table_size_list}, {args.table_budget:.0f} s training budget each", flush=True)
        results["model_table"] = {**stamp(args), **measure.model_table(args.table_size_list, args.table_budget, windows, anomalous, args.seconds, args.repeats)}

    results["last_run"]["seconds"] = round(time.perf_counter() - started, 1)
    results["last_run"]["load_average_1m_end"] = os.getloadavg()[0]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    results_path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY) + b"\n")
    report_path.write_text(render(results), encoding="utf-8")
    print(f"bench: wrote {results_path} and {report_path} in {results['last_run']['seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
