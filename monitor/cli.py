"""The `monitor` command line (docs/user-guide.md). A `MonitorError` is one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monitor import __version__
from monitor.errors import MonitorError

if TYPE_CHECKING:
    from monitor.training.settings import TrainSettings
    from monitor.training.trainer import TrainingResult

EXIT_USER_ERROR = 2


def _speed(text: str) -> float:
    if text == "max":
        return 0.0
    if text == "realtime":
        return 1.0
    try:
        value = float(text.lstrip("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use realtime, a factor such as 10 or x10, or max") from None
    if value < 0:
        raise argparse.ArgumentTypeError("speed cannot be negative")
    return value


def _baseline_flags(parser: argparse.ArgumentParser, defaults: tuple[str, str]) -> None:
    """`--baseline` and `--baseline-windows` (per-sensor baselines), their help ending with the given defaults."""
    parser.add_argument(
        "--baseline",
        choices=["model", "sensor"],
        help=f"model: one pooled normalisation; sensor: each recording's own first N windows (default: {defaults[0]})",
    )
    parser.add_argument(
        "--baseline-windows", type=int, help=f"N, warm-up windows that fit a sensor's baseline (default: {defaults[1]})"
    )


def _add_train_parser(commands: argparse._SubParsersAction) -> None:
    """`monitor train`: every flag's help ends with its default, taken from the settings themselves."""
    from monitor.model.calibration import DEFAULT_PARAMS
    from monitor.training.settings import BEAT_DEFAULTS, TrainSettings

    fields = TrainSettings.model_fields
    defaults = {name: field.get_default(call_default_factory=True) for name, field in fields.items()}

    def default(key: str, note: str = "") -> str:
        beats = f"; with --segmentation beats: {BEAT_DEFAULTS[key]}" if key in BEAT_DEFAULTS else ""
        return f" (default: {defaults[key]}{beats}{note})"

    train = commands.add_parser(
        "train",
        help="train a model, calibrate its threshold, write an artifact",
        description="Train on normal windows; flags override the YAML config key by key. The defaults are the "
        "bundled models' recipes: configs/train-ecg5000.yaml in fixed mode, configs/train-mitdb-beats.yaml with "
        "--segmentation beats (its epochs, batch size and patience), one torch thread in both.",
    )
    add = train.add_argument
    add("--config", type=Path, help="YAML training config, e.g. configs/train-ecg5000.yaml (default: none)")
    add(
        "--train-data",
        type=Path,
        nargs="+",
        help="normal training data (UCR text, .npy windows), or recordings "
        "([T] or [T, C] .npy/.csv with --window), one per sensor; .gz/.xz read as they are "
        "(required: here or in --config)",
    )
    add(
        "--train-labels",
        type=Path,
        nargs="+",
        help="0/1 per sample of each recording, in --train-data order; "
        "windows with an anomalous sample are left out (default: none)",
    )
    add(
        "--segmentation",
        choices=["fixed", "beats"],
        help="fixed windows, or one window per detected beat of a raw ECG lead (default: fixed)",
    )
    add("--sample-rate", type=float, help="beat mode: the recordings' sampling rate in Hz (required in beat mode)")
    add(
        "--annotations",
        type=Path,
        nargs="+",
        help="beat mode: a sample,symbol CSV per recording, same order (default: none; every beat found is trained on)",
    )
    add("--normal-symbols", help="beat mode: WFDB codes of the beats trained on (default: N,L,R,e,j)")
    add(
        "--calibration-data",
        type=Path,
        help="held-out normal data for early stopping and the threshold "
        "(default: none; validation and calibration windows are split off the training data with --seed)",
    )
    add("--evaluate-data", type=Path, help="labelled data to evaluate after training, never trained on (default: none)")
    add("--output", type=Path, help="artifact directory to write" + default("output"))
    add("--force", action="store_true", help="replace a model already in --output (default: refuse)")
    add("--name", help="model name recorded in the artifact (default: the --output directory's name)")
    add("--version", dest="model_version", help="model version recorded in the artifact (default: today's date)")
    add("--normal-label", type=int, help="class label of normal windows in UCR files" + default("normal_label"))
    add(
        "--window",
        type=int,
        help="cut a continuous recording ([T] or [T, C] .npy/.csv) into windows of this many "
        "samples (default: none; needed for recordings)",
    )
    add("--stride", type=int, help="samples between window starts in a recording (default: the window)")
    add("--embedding-dim", type=int, help="embedding size E (LSTMs of E and 2E units)" + default("embedding_dim"))
    add(
        "--level-dim",
        type=int,
        help="width K of the linear path each window's per-channel mean takes, fewer than the channels; for "
        "machines with many channels, 0: none (default: with --baseline sensor and 16 channels or more, a sixth "
        "fewer than the channels, else none)",
    )
    add(
        "--score-scale",
        choices=("none", "sensor"),
        help="sensor: divide each sensor's scores by the median score of its warm-up windows, and calibrate the "
        "threshold on scores divided so; needs --baseline sensor (default: sensor with --baseline sensor and 16 "
        "channels or more, else none)",
    )
    add(
        "--channel-names",
        help="comma-separated names of the channels, in order, recorded in the artifact: alerts name their top "
        "channels with them (default: none; channels are named by index only)",
    )
    add("--epochs", type=int, help="maximum number of epochs" + default("epochs"))
    add("--batch-size", type=int, help="mini-batch size" + default("batch_size"))
    add("--learning-rate", type=float, help="Adam learning rate" + default("learning_rate"))
    add("--patience", type=int, help="epochs without validation improvement before stopping" + default("patience"))
    add("--noise-std", type=float, help="std of the Gaussian training noise, normalised units" + default("noise_std"))
    add("--seed", type=int, help="random seed (training is deterministic given the seed)" + default("seed"))
    add("--threads", type=int, help="torch threads, 0 = one per core" + default("threads"))
    add(
        "--threshold-method",
        choices=["quantile", "mean_std", "pot"],
        help="threshold calibration method (default: "
        f"quantile, q {DEFAULT_PARAMS['quantile']['q']}: that quantile of the calibration windows' errors)",
    )
    add(
        "--no-report",
        dest="report",
        action="store_const",
        const=False,
        help="skip the PNG training report (default: written to OUTPUT/report)",
    )
    _baseline_flags(train, ("model", "none; required with --baseline sensor"))
    flags = {action.dest for action in train._actions} | {"version", "threshold"}
    yaml_only = ", ".join(
        f"{key} {value}" + (f" (beats: {BEAT_DEFAULTS[key]})" if key in BEAT_DEFAULTS else "")
        for key, value in defaults.items()
        if key not in flags
    )
    train.epilog = f"Keys of the YAML config without a flag, and their defaults: {yaml_only}."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="monitor", description="Streaming anomaly monitor for ECG and other sensor signals."
    )
    parser.add_argument("--version", action="version", version=f"monitor {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run the daemon in the foreground",
        description="Run the daemon until SIGTERM/SIGINT; SIGHUP reloads config and model. A bad config or model is "
        "one line and exit 2; an unreachable broker is not: the daemon logs it and retries with backoff until the "
        "broker answers (it queues alerts meanwhile), as a service should.",
    )
    run.add_argument("--config", required=True, type=Path, help="YAML config file (see configs/monitor.yaml)")

    _add_train_parser(commands)

    evaluate = commands.add_parser(
        "evaluate",
        help="score labelled data offline and print quality figures",
        description="Score labelled data (UCR text, or recordings with per-sample labels) at the calibrated threshold.",
    )
    evaluate.add_argument("--model", required=True, type=Path, help="model artifact directory")
    evaluate.add_argument(
        "--data", required=True, type=Path, nargs="+", help="labelled UCR text, or recordings (.npy/.csv) with --labels"
    )
    evaluate.add_argument(
        "--labels", type=Path, nargs="+", help="per-sample 0/1 labels of each recording, in --data order"
    )
    evaluate.add_argument("--window", type=int, help="window length of the recordings (default: the model's)")
    evaluate.add_argument("--stride", type=int, help="stride for the recordings (default: the window)")
    _baseline_flags(evaluate, ("as the model was trained", "as the model was trained"))
    evaluate.add_argument("--annotations", type=Path, nargs="+", help="beat mode: sample,symbol CSV per recording")
    evaluate.add_argument("--sample-rate", type=float, help="beat mode: the recordings' rate (default: the model's)")
    evaluate.add_argument("--normal-label", type=int, default=1, help="class label of normal windows (default 1)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    evaluate.add_argument("--device", default="cpu", help="auto, cpu or cuda (default cpu)")
    evaluate.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="what the autoencoder computes in, as the daemon's model.dtype (default float32)",
    )
    evaluate.add_argument("--threads", type=int, default=1, help="torch threads, 0 = one per core (default 1)")

    replay = commands.add_parser(
        "replay",
        help="publish a recorded stream to the broker as sensors would",
        description="Publish a UCR file (beats dealt to N sensors) or a continuous recording. An unreachable broker "
        "is one line and exit 2.",
    )
    replay.add_argument("--config", required=True, type=Path, help="the daemon's YAML config (broker and topics)")
    replay.add_argument("--data", required=True, type=Path, help="UCR text file, or .npy/.csv continuous recording")
    replay.add_argument("--sensors", type=int, default=20, help="number of simulated sensors (default 20)")
    replay.add_argument("--chunk", type=int, default=35, help="samples per message (default 35)")
    replay.add_argument(
        "--sample-rate-hz",
        type=float,
        help="the recording's sample rate, sent with every message; one the config's windowing.sample_rate_hz "
        "differs from is refused (default: windowing.sample_rate_hz, else 250)",
    )
    replay.add_argument("--speed", type=_speed, default=1.0, help="realtime (default), a factor such as 10, or max")
    replay.add_argument("--qos", type=int, choices=[0, 1, 2], default=1, help="publish QoS (default 1)")
    replay.add_argument(
        "--format",
        choices=["json", "frame", "sparkplug_b"],
        help="payload format (default: the config's input.format); frame: on the first input.formats filter for "
        "frames; sparkplug_b: the sensors are input.sparkplug.devices (--sensors is ignored)",
    )
    replay.add_argument(
        "--annotations",
        type=Path,
        help="the recording's beat annotations (sample,symbol CSV, WFDB codes): with --labels-out, `monitor watch "
        "--labels` scores the alerts by beat (default: none)",
    )
    replay.add_argument(
        "--labels-out",
        type=Path,
        help="write the ground truth here (JSON lines): the label of every UCR window, or with --annotations every "
        "annotated beat (default: none)",
    )

    watch = commands.add_parser(
        "watch",
        help="print alerts as they arrive; with --labels, precision and recall at the end",
        description="Subscribe to the alert topic and print each alert. "
        "With --labels (from `monitor replay --labels-out`) "
        "it stops once every labelled window is scored and alerts went quiet, and prints a summary. An unreachable "
        "broker is one line and exit 2.",
    )
    watch.add_argument("--config", required=True, type=Path, help="the daemon's YAML config (broker and alert topic)")
    watch.add_argument("--labels", type=Path, help="labels of the replayed windows (JSON lines)")
    watch.add_argument("--metrics-url", help="the daemon's /metrics URL, for its counts and latency in the summary")
    watch.add_argument(
        "--idle-seconds", type=float, default=3.0, help="quiet time that ends the watch once all is scored (default 3)"
    )
    watch.add_argument("--quiet", action="store_true", help="print only the summary")

    check = commands.add_parser(
        "check-config",
        help="validate a config file; one line per problem",
        description="Validate a daemon config exactly as `monitor run` does, model included. The broker is not "
        "contacted unless --connect asks for it.",
    )
    check.add_argument("file", type=Path, help="YAML config file")
    check.add_argument(
        "--connect",
        action="store_true",
        help="also connect to the broker with the configured protocol, credentials and TLS, once (default: not)",
    )
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from monitor.runtime import signals

    signals.install()  # before importing torch: a SIGHUP in the first seconds must not end the process
    from monitor.runtime.daemon import run

    return run(args.config)


def train_settings(args: argparse.Namespace) -> TrainSettings:
    """The settings `monitor train` runs with: the YAML config's keys, each flag given overriding its key, and the
    defaults of the mode (`BeatTrainSettings` with --segmentation beats) for the rest."""
    from monitor.config.loading import read_yaml, validate
    from monitor.training.beat_trainer import BeatTrainSettings
    from monitor.training.settings import TrainSettings

    data: dict[str, Any] = read_yaml(args.config) if args.config else {}
    beats = (args.segmentation or data.get("segmentation")) == "beats"
    flags = {
        "train_data": args.train_data,
        "train_labels": args.train_labels,
        "baseline": args.baseline,
        "baseline_windows": args.baseline_windows,
        "calibration_data": args.calibration_data,
        "evaluate_data": args.evaluate_data,
        "output": args.output,
        "name": args.name,
        "version": args.model_version,
        "normal_label": args.normal_label,
        "window": args.window,
        "stride": args.stride,
        "embedding_dim": args.embedding_dim,
        "level_dim": args.level_dim,
        "score_scale": args.score_scale,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "patience": args.patience,
        "noise_std": args.noise_std,
        "seed": args.seed,
        "threads": args.threads,
        "report": args.report,
        "segmentation": args.segmentation,
        "sample_rate": args.sample_rate,
        "annotations": args.annotations,
        "normal_symbols": args.normal_symbols.split(",") if args.normal_symbols else None,
        "channel_names": args.channel_names.split(",") if args.channel_names else None,
    }
    data.update({key: value for key, value in flags.items() if value is not None})
    if args.threshold_method and data.get("threshold", {}).get("method") != args.threshold_method:
        data["threshold"] = {"method": args.threshold_method}  # the YAML's params belong to its own method
    source = str(args.config or "train flags")
    settings: TrainSettings
    if beats:
        settings = validate(BeatTrainSettings, data, source)
    else:
        beat_keys = ("sample_rate", "annotations", "normal_symbols")
        if data.pop("segmentation", "fixed") != "fixed" or any(key in data for key in beat_keys):
            raise MonitorError(f"{source}: sample_rate, annotations and normal_symbols belong to --segmentation beats")
        settings = validate(TrainSettings, data, source)
    return settings


def cmd_train(args: argparse.Namespace) -> int:
    from monitor.telemetry.log import configure_logging
    from monitor.training.beat_trainer import BeatTrainSettings, train_beats
    from monitor.training.trainer import refuse_overwrite, train

    configure_logging("info", "auto")
    settings = train_settings(args)
    if not args.force:
        refuse_overwrite(settings.output)
    beat_evaluation = None
    if isinstance(settings, BeatTrainSettings):
        result, beat_evaluation = train_beats(settings)
    else:
        result = train(settings)
    if settings.report:
        from monitor.training.report import write_report

        written = write_report(result, settings.output / "report")
        if written:
            print(f"report: {', '.join(str(path) for path in written)}")
    print(
        f"model written to {settings.output} (threshold {result.calibration.threshold:.6g}, "
        f"{result.calibration.method}, best epoch {result.best_epoch}, {result.seconds:.0f} s)"
    )
    if beat_evaluation is not None:
        from monitor.training.beat_trainer import format_beat_evaluation

        print(format_beat_evaluation(beat_evaluation))
        return 0
    _print_yardstick(result)
    return 0


def _print_yardstick(result: TrainingResult) -> None:
    """The LSTM's figures beside its PCA yardstick's: false alarms on held-out normal windows, evaluation data."""
    from monitor.training.evaluation import format_evaluation, format_false_alarms, format_side_by_side

    metadata = result.artifact.metadata
    pca = metadata.get("yardstick")
    if pca is None:
        if result.evaluation is not None:
            print(format_evaluation(result.evaluation))
        return
    print(
        f"PCA yardstick: {pca['components']} components on the same windows, threshold {pca['threshold']['value']:.6g}"
    )
    print(format_false_alarms(metadata["held_out_false_alarms"]))
    if result.evaluation is not None and result.pca_evaluation is not None:
        print(format_evaluation(result.evaluation))
        print(format_side_by_side({"lstm": result.evaluation, "pca": result.pca_evaluation}))


def cmd_evaluate(args: argparse.Namespace) -> int:
    from monitor.training.evaluate import EvaluateRequest, evaluate

    options = vars(args)
    fields = EvaluateRequest.__dataclass_fields__
    report = evaluate(EvaluateRequest(**{name: options[name] for name in fields if name in options}))
    print(report.render(args.json))
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from monitor.config.schema import load_config
    from monitor.telemetry.log import configure_logging
    from monitor.tools.replay import Replayer, load_plan, model_channel_names, write_labels

    config = load_config(args.config)
    configure_logging(config.logging.level, config.logging.format)
    expected = config.windowing.sample_rate_hz
    rate = args.sample_rate_hz or expected or 250.0
    if args.chunk < 1 or rate <= 0:
        raise MonitorError("--chunk must be >= 1 and --sample-rate-hz > 0")
    if expected is not None and rate != expected:
        raise MonitorError(
            f"--sample-rate-hz {rate:g}: the daemon's windowing.sample_rate_hz is {expected:g} "
            f"(from {config.origin('windowing.sample_rate_hz')}); replay at the rate the daemon expects, or configure "
            "the daemon for this recording's rate"
        )
    input_format = args.format or config.input.format
    devices = config.input.sparkplug.devices if input_format == "sparkplug_b" else []
    if input_format == "sparkplug_b" and not devices:
        raise MonitorError("--format sparkplug_b needs input.sparkplug.devices in the config")
    sensor_ids = [device.sensor for device in devices]
    names = model_channel_names(config.model.path)
    plan = load_plan(args.data, len(sensor_ids) or args.sensors, sensor_ids or None, args.annotations, names)
    if args.labels_out:
        write_labels(plan, args.labels_out, rate)
    filters = [rule.filter for rule in config.input.formats if rule.format == input_format]
    topic_filter = filters[0] if filters and input_format == "frame" else config.mqtt.subscribe[0]
    replayer = Replayer(config.mqtt, topic_filter, config.mqtt.sensor_id_level, args.qos, input_format, devices)
    replayer.connect()
    try:
        count = replayer.publish(plan, args.chunk, rate, args.speed)
    finally:
        replayer.close()
    print(f"published {count} messages from {len(plan.sensor_ids)} sensors at {rate:g} Hz")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    from monitor.config.schema import load_config
    from monitor.tools.watch import watch

    config = load_config(args.config)
    print(
        watch(config.mqtt, config.mqtt.alert_topic, args.labels, args.metrics_url, args.idle_seconds, quiet=args.quiet)
    )
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from monitor.config.schema import load_config
    from monitor.errors import ArtifactError, MonitorError
    from monitor.ingest.beat_windowing import check_mode
    from monitor.model.artifact import artifact_problem
    from monitor.model.engine import load_engine, load_shadow_engine
    from monitor.runtime.daemon import warm_up_windows

    config = load_config(args.file, check_model=artifact_problem)
    try:
        live = load_engine(config.model)
    except ArtifactError as error:
        raise ArtifactError(f"{args.file}: model.path: {error}") from None
    try:
        load_shadow_engine(config.model, live, load_engine)
    except MonitorError as error:  # already named: model.shadow_path
        raise type(error)(f"{args.file}: {error}") from None
    warm_up_windows(live, config.windowing, str(args.file))
    check_mode(config.windowing, live, config.model.path, config.origin)
    config.mqtt.resolve_password()
    broker = f"{config.mqtt.host}:{config.mqtt.port}"
    if args.connect:
        from monitor.mqtt.client import check_broker

        check_broker(config.mqtt)
        reached = f"broker {broker} connected to and accepted the client"
    else:
        reached = f"broker {broker} not contacted (--connect tries it)"
    mode = "beats" if live.segmentation is not None else f"{live.window}-sample windows"
    print(
        f"{args.file}: ok: keys, values and MONITOR_ variables valid; model {config.model.path} loaded ({mode}, "
        f"matches windowing.mode); {reached}"
    )
    return 0


COMMANDS = {
    "run": cmd_run,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "replay": cmd_replay,
    "watch": cmd_watch,
    "check-config": cmd_check_config,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except MonitorError as error:
        for line in str(error).splitlines() or ["error"]:
            print(f"monitor: error: {line}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130
