"""`python -m bench.run`: the monitor's benchmark, side by side in one process on one machine.

`--list` names the parts; bench/README.md says what each measures, how long a run takes and how to read
bench/RESULTS.md. Results are merged into bench/results.json (parts not run keep their previous section,
each with its own date) and the tables of bench/RESULTS.md are regenerated from it. `--quick` is a smoke
run (short timings, few steps); its figures are marked as such.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # no training progress bars in the bench output

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from bench import data, measure, records  # noqa: E402
from bench.parts import PARTS, Context  # noqa: E402
from bench.records import Flops, LastRun, Machine, RunConfig, Stamp  # noqa: E402
from bench.report import render  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_PARTS = tuple(name for name, part in PARTS.items() if part.default)
FULL_STEPS = (100, 200, 400, 600, 800, 1000, 1200, 1600, 2000, 2400, 3200)
# The daemon's defaults; smaller batches (latency); ONNX Runtime; two threads; then what lightens paho's
# per-message work: MQTT 3.1.1 instead of 5, sensors at QoS 0, and 140-sample messages (a quarter of the messages).
FULL_E2E = (
    "torch:1",
    "torch:1:b32",
    "onnx:1:b32",
    "torch:2",
    "torch:1:b32:p311",
    "torch:1:b32:qos0",
    "torch:1:b32:c140",
)
QUICK_STEPS = (100, 400)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--list", action="store_true", help="list the parts and exit")
    add("--quick", action="store_true", help="smoke mode: short timings, E=32 only, two e2e steps (about 2 minutes)")
    add(
        "--parts",
        default=",".join(DEFAULT_PARTS),
        help=f"comma-separated parts, or 'none' (default: {','.join(DEFAULT_PARTS)})",
    )
    add(
        "--data-dir",
        type=Path,
        default=data.DATA_DIR,
        help="the ECG5000 data, splits/*.txt[.xz|.gz] (default data/ecg5000)",
    )
    add(
        "--table-budget", type=float, default=300.0, help="model-table training budget per model, seconds (default 300)"
    )
    add("--table-sizes", default="32,64,128", help="embedding sizes of the model table")
    add("--model", type=Path, default=measure.DEFAULT_MODEL, help="the default model artifact (default models/ecg5000)")
    add(
        "--sizes",
        default=None,
        help="embedding sizes for the tutorial/engine parts (default 32,64,128; quick: the model's)",
    )
    add(
        "--backends",
        default="torch,torch-shards,onnx,onnx-int8",
        help="engine backends: torch, torch-shards, onnx, onnx-int8",
    )
    add("--batches", default=None, help="engine batch sizes (default 1,8,32,64,128,256,512; quick: 1,64,256)")
    add("--threads", default="1,2", help="thread counts for the tutorial and engine parts")
    add("--seconds", type=float, default=None, help="seconds per timing run (default 0.6; quick 0.15)")
    add("--repeats", type=int, default=None, help="timing runs per figure, the median is reported (default 3; quick 1)")
    add(
        "--e2e-configs",
        default=None,
        help="daemon runs as backend:threads[:qosN][:bMAX_BATCH][:wMAX_WAIT_MS][:cSAMPLES_PER_MESSAGE][:p311][:frame] "
        f"(default {','.join(FULL_E2E)}; quick torch:1)",
    )
    add(
        "--e2e-steps",
        default=None,
        help=f"sensor counts to step through (default {','.join(map(str, FULL_STEPS))}; quick 100,400)",
    )
    add(
        "--e2e-warmup", type=float, default=None, help="seconds of load before measuring each step (default 4; quick 3)"
    )
    add("--e2e-measure", type=float, default=None, help="seconds measured per step (default 10; quick 5)")
    add("--e2e-qos", type=int, default=1, choices=(0, 1), help="load generator's QoS unless a config says (default 1)")
    add("--training-epochs", type=int, default=None, help="epochs timed for the training part (default 3; quick 1)")
    add("--output-dir", type=Path, default=BENCH_DIR, help="where results.json and RESULTS.md go (default bench/)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.part_list = (
        [] if args.parts.strip() == "none" else [part.strip() for part in args.parts.split(",") if part.strip()]
    )
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


def machine() -> Machine:
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
    return Machine(
        cpu=cpu_model,
        cores=psutil.cpu_count(logical=True),
        physical_cores=psutil.cpu_count(logical=False),
        avx2=" avx2 " in flags,
        avx512f=" avx512f " in flags,
        torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
        memory_gib=round(psutil.virtual_memory().total / 2**30, 1),
        os=platform.platform(),
        python=platform.python_version(),
        torch=torch.__version__,
        onnxruntime=onnxruntime.__version__,
        numpy=np.__version__,
        paho_mqtt=paho.mqtt.__version__,
        torch_default_threads=torch.get_num_threads(),
    )


def list_parts() -> str:
    width = max(len(name) for name in PARTS)
    return "\n".join(
        f"{name:{width}s}  {part.summary}{'' if part.default else ' (only when named)'}" for name, part in PARTS.items()
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print(list_parts())
        return 0
    results_path, report_path = args.output_dir / "results.json", args.output_dir / "RESULTS.md"
    results = records.load(results_path)
    command = "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:])
    results.machine, results.last_run = machine(), LastRun(command.strip(), Stamp.now(args.quick))
    started = time.perf_counter()
    artifact = measure.load_artifact(args.model)
    default_e = artifact.model.embedding_dim
    sizes = args.size_list or ((default_e,) if args.quick else tuple(sorted({default_e, 32, 64, 128})))
    test_data = data.split_path(args.data_dir, data.TEST)
    windows, anomalous = measure.load_test(test_data)
    results.default_model = measure.default_model_summary(args.model)
    flops = {
        e: measure.flops_per_window(e, artifact.window, artifact.channels)
        for e in sorted({*sizes, *args.table_size_list, default_e})
    }
    results.flops = Flops(measure.FLOPS_FORMULA, flops, artifact.window, artifact.channels)
    normal_data = data.split_path(args.data_dir, data.TRAIN_NORMAL)
    context = Context(args, artifact, sizes, windows, anomalous, test_data, normal_data)
    print(
        f"bench: model {args.model} (E={default_e}), parts {args.part_list or 'none'}{' (quick)' if args.quick else ''}"
    )
    for name in args.part_list:
        part = PARTS[name]
        print(f"  {name}: {part.summary}", flush=True)
        setattr(results, part.field, part.measure(context))
    results.last_run = dataclasses.replace(
        results.last_run, seconds=round(time.perf_counter() - started, 1), load_average_1m_end=os.getloadavg()[0]
    )
    args.output_dir.mkdir(parents=True, exist_ok=True)
    records.save(results, results_path)
    report_path.write_text(render(results), encoding="utf-8")
    print(f"bench: wrote {results_path} and {report_path} in {results.last_run.seconds:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
