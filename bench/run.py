"""`python -m bench.run`: the monitor's benchmark, side by side in one process on one machine.

`--list` names the parts; bench/README.md says what each measures, how long a run takes and how to read
bench/RESULTS.md. Results are merged into bench/results.json (parts not run keep their previous record,
each with its own date) and bench/RESULTS.md is regenerated from it. `--quick` is a smoke run (short
timings, few steps); its figures are marked as such.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # no training progress bars in the bench output

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from bench import measure, results  # noqa: E402
from bench.e2e import RunConfig  # noqa: E402
from bench.harness import DATA_DIR, TEST, TRAIN_NORMAL, split_path  # noqa: E402
from bench.parts import PARTS, Context  # noqa: E402
from monitor.training.datasets import read_ucr  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_PARTS = ",".join(name for name, part in PARTS.items() if part.default)
# The daemon's defaults; smaller batches (latency); ONNX Runtime; two threads; then what lightens paho's
# per-message work: MQTT 3.1.1 instead of 5, sensors at QoS 0, and 140-sample messages (a quarter of the messages).
FULL_E2E = "torch:1,torch:1:b32,onnx:1:b32,torch:2,torch:1:b32:p311,torch:1:b32:qos0,torch:1:b32:c140"


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(item) for item in text.split(",") if item.strip())


BY_MODE = {  # option -> (type, default, default with --quick, help)
    "--sizes": (ints, "32,64,128", "", "embedding sizes of the limit, tutorial and engine parts (and the model's)"),
    "--batches": (ints, "1,8,32,64,128,256,512", "1,64,256", "engine batch sizes"),
    "--seconds": (float, "0.6", "0.15", "seconds per timing run"),
    "--repeats": (int, "3", "1", "timing runs per figure, the median is reported"),
    "--e2e-configs": (
        str,
        FULL_E2E,
        "torch:1",
        "daemon runs as backend:threads[:qosN][:bN][:wMS][:cN][:sN][:p311][:beats][:frame][:bf16]",
    ),
    "--e2e-steps": (ints, "100,200,400,600,800,1000,1200,1600,2000,2400,3200", "100,400", "sensor counts to step"),
    "--e2e-warmup": (float, "4", "3", "seconds of load before measuring each step"),
    "--e2e-measure": (float, "10", "5", "seconds measured per step"),
    "--training-epochs": (int, "3", "1", "epochs timed for the training part"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--list", action="store_true", help="list the parts and exit")
    add("--quick", action="store_true", help="smoke mode: short timings, the model's E only, two e2e steps")
    add("--parts", default=DEFAULT_PARTS, help="comma-separated parts, or 'none' (default: %(default)s)")
    add(
        "--data-dir", type=Path, default=DATA_DIR, help="the ECG5000 data, splits/*.txt[.xz|.gz] (default data/ecg5000)"
    )
    add("--model", type=Path, default=measure.DEFAULT_MODEL, help="the default model (default models/ecg5000)")
    add(
        "--backends",
        default="torch,torch-bf16,torch-shards,onnx,onnx-int8",
        help="engine backends (default %(default)s)",
    )
    add("--threads", type=ints, default=(1, 2), help="thread counts of the limit, tutorial and engine (default 1,2)")
    add("--e2e-qos", type=int, default=1, choices=(0, 1), help="the sensors' QoS unless a config says (default 1)")
    add("--table-budget", type=float, default=300.0, help="model-table training seconds per model (default 300)")
    add(
        "--table-sizes", type=ints, default=(32, 64, 128), help="embedding sizes of the model table (default 32,64,128)"
    )
    add("--output-dir", type=Path, default=BENCH_DIR, help="where results.json and RESULTS.md go (default bench/)")
    for flag, (_, full, quick, text) in BY_MODE.items():
        add(flag, default=None, help=f"{text} (default {full}; with --quick {quick or 'none'})")
    args = parser.parse_args(argv)
    for flag, (kind, full, quick, _) in BY_MODE.items():
        dest = flag[2:].replace("-", "_")
        setattr(args, dest, kind(getattr(args, dest) or (quick if args.quick else full)))
    args.part_list = [] if args.parts.strip() == "none" else [name.strip() for name in args.parts.split(",")]
    unknown = set(args.part_list) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))} (known: {', '.join(PARTS)})")
    args.backends = tuple(item.strip() for item in args.backends.split(",") if item.strip())
    try:
        args.e2e_configs = [RunConfig.parse(item, args.e2e_qos) for item in args.e2e_configs.split(",") if item]
    except ValueError as error:
        parser.error(f"--e2e-configs: {error}")
    args.e2e_steps = list(args.e2e_steps)
    return args


def machine() -> dict[str, object]:
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
    return dict(
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
    recorded = results.load(results_path)
    command = ("python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    started_at, started = results.stamp(args.quick, command), time.perf_counter()
    artifact = measure.load_artifact(args.model)
    default_e = artifact.model.embedding_dim
    sizes = tuple(sorted({*args.sizes, default_e}))
    test_data, normal_data = split_path(args.data_dir, TEST), split_path(args.data_dir, TRAIN_NORMAL)
    test = read_ucr(test_data)
    per_window = {
        e: measure.flops_per_window(e, artifact.window, artifact.channels) for e in sorted({*sizes, *args.table_sizes})
    }
    recorded |= {
        "machine": machine(),
        "default_model": measure.default_model_summary(args.model),
        "flops": {
            "formula": measure.FLOPS_FORMULA,
            "per_window": per_window,
            "window": artifact.window,
            "channels": artifact.channels,
        },
    }
    context = Context(args, artifact, sizes, test.windows, test.is_anomaly(1), test_data, normal_data)
    print(
        f"bench: model {args.model} (E={default_e}), parts {args.part_list or 'none'}{' (quick)' if args.quick else ''}"
    )
    for name in args.part_list:
        part = PARTS[name]
        print(f"  {name}: {part.summary}", flush=True)
        recorded[part.field] = {"stamp": results.stamp(args.quick, command), **part.measure(context)}
    seconds = round(time.perf_counter() - started, 1)
    recorded["last_run"] = {
        "command": command,
        "stamp": started_at,
        "seconds": seconds,
        "load_average_1m_end": os.getloadavg()[0],
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    results.save(recorded, results_path)
    report_path.write_text(results.render(results.load(results_path), PARTS.values()), encoding="utf-8")
    print(f"bench: wrote {results_path} and {report_path} in {seconds:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
