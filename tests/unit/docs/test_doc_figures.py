"""Every measured figure quoted in README.md and docs/ against the results file it comes from.

Each entry of `FIGURES` renders a passage from its file (bench/results.json, bench/*.json, bench/LIFECYCLE.md,
models/*/model.json) the way the doc quotes it; the test fails when the doc does not contain that passage, so a
re-run that changes a figure fails here until the doc says the new one. `python -m tests.unit.docs.test_doc_figures`
prints every passage as it should read now, to paste after a re-run."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]
WORKER_CORES = 2  # the extrapolation: a 2-core machine running only instances


@cache
def load(name: str) -> Any:
    return json.loads((REPO / name).read_text())


def results() -> Any:
    return load("bench/results.json")


def day(stamp: str) -> str:
    return stamp[:10]


def percent(share: float, digits: int = 2) -> str:
    return f"{100 * share:.{digits}f} %"


def ms(seconds: float) -> str:
    return f"{1000 * seconds:.0f} ms"


def row(*cells: object) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def table(header: list[str], rows: list[str]) -> str:
    return "\n".join([row(*header), row(*["---"] * len(header)), *rows])


# --- the fixed-mode model and the demo ---


def ecg5000_evaluation() -> str:
    meta = load("models/ecg5000/model.json")
    e = meta["evaluation"]
    return (
        f"On the {e['n_windows']} beats of `{e['data']}` ({e['n_anomalies']} anomalous; "
        f"`models/ecg5000/model.json`, `evaluation`, model {meta['version']} made {day(meta['created_at'])}): "
        f"ROC AUC {e['auc']:.3f}, PR AUC {e['pr_auc']:.3f}, precision {e['precision']:.4f}, recall {e['recall']:.4f}, "
        f"F1 {e['f1']:.4f}, false-positive rate {e['fpr']:.4f} "
        f"(tp {e['tp']}, fp {e['fp']}, fn {e['fn']}, tn {e['tn']})."
    )


def demo_summary() -> str:
    e = load("models/ecg5000/model.json")["evaluation"]
    return "\n".join(
        [
            f"  windows replayed   {e['n_windows']}  ({e['n_anomalies']} anomalous by label)",
            f"  alerts received    {e['tp'] + e['fp']}  (duplicates 0, outside the labelled windows 0)",
            f"  precision {e['precision']:.4f}  recall {e['recall']:.4f}  F1 {e['f1']:.4f}  "
            f"false-positive rate {e['fpr']:.4f}",
            f"  confusion: tp {e['tp']}  fp {e['fp']}  fn {e['fn']}  tn {e['tn']}",
            f"  daemon: windows scored {e['n_windows']}, alerts published {e['tp'] + e['fp']}, windows dropped 0",
        ]
    )


def training_time() -> str:
    run = results()["training"]["full_run"]
    same = "byte-identical to" if run["same_weights_as_shipped"] else "different from"
    return (
        f"`make train` retrains the bundled model from the same data into `runs/ecg5000/` (about "
        f"{run['seconds'] / 60:.0f} minutes; on {run['threads']} thread its `model.safetensors` is {same} the "
        "shipped one"
    )


# --- beat mode ---


def mitdb_evaluation() -> str:
    meta = load("models/mitdb-beats/model.json")
    e = meta["evaluation"]
    scored, flagged = e["scored_by_class"], e["flagged_by_class"]
    classes = ", ".join(f"{c} {flagged[c]} of {scored[c]}" for c in ("V", "S", "F"))
    return (
        f"`models/mitdb-beats/model.json` (`evaluation`, model {meta['version']} made {day(meta['created_at'])}): "
        f"detector sensitivity {percent(e['detector_sensitivity'])}, "
        f"positive predictivity {percent(e['detector_ppv'])}; "
        f"beat-level ROC AUC {e['auc']:.3f}, F1 {e['f1']:.2f} (precision {e['precision']:.2f}, recall "
        f"{e['recall']:.2f}), {percent(e['fpr'], 1)} of scored normal beats flagged; "
        f"anomalous beats flagged: {classes}."
    )


BEAT_RECORDS = {
    "105": "105 (noisy)",
    "108": "108 (small QRS, noisy)",
    "114": "114 (lead V5)",
    "116": "116",
    "121": "121",
    "123": "123",
    "208_excerpt": "208 excerpt",
    "pooled": "pooled",
}


def beat_quality_table() -> str:
    quality = load("bench/beat_quality.json")
    header = [
        "record",
        "detector Se / PPV (whole record)",
        "AUC",
        "F1",
        "normal flagged",
        "unscorable N / SVF",
        "PCA on the beat: AUC, flagged",
        "PCA on the model's channels: AUC, flagged",
        "false alarms: noisy stretch / early / other",
    ]
    rows = []
    for key, name in BEAT_RECORDS.items():
        detector = quality["detector_whole_records"][key]
        model, pca, channels = (
            quality["scorers"][s]["records"][key] for s in ("model", "pca_beat", "pca_model_channels")
        )
        causes = model["false_alarm_causes"]
        rows.append(
            row(
                name,
                f"{percent(detector['sensitivity'])} / {percent(detector['ppv'])}",
                f"{model['auc']:.3f}",
                f"{model['f1']:.2f}",
                percent(model["normal_flagged"]),
                f"{percent(model['unscorable_normal'], 1)} / {percent(model['unscorable_anomalous'], 1)}",
                f"{pca['auc']:.3f}, {percent(pca['normal_flagged'])}",
                f"{channels['auc']:.3f}, {percent(channels['normal_flagged'])}",
                f"{causes['noisy_stretch']} / {causes['early']} / {causes['other']}",
            )
        )
    return f"`bench/beat_quality.json`, model {quality['model_version']}:\n\n" + table(header, rows)


def beat_aims() -> str:
    quality = load("bench/beat_quality.json")
    detector = quality["detector_whole_records"]["pooled"]
    records = quality["scorers"]["model"]["records"]
    over = [key for key in BEAT_RECORDS if key != "pooled" and records[key]["normal_flagged"] > 0.01]
    met = "met" if detector["sensitivity"] >= 0.995 and detector["ppv"] >= 0.995 else "not met"
    auc_met = "met" if records["pooled"]["auc"] >= 0.97 else "not met"
    flagged = (
        "met"
        if not over
        else "not met: " + ", ".join(f"{key} {percent(records[key]['normal_flagged'])}" for key in over)
    )
    return (
        f"Aims: detector >= 99.5 % pooled on whole records: {met} ({percent(detector['sensitivity'])} / "
        f"{percent(detector['ppv'])}); pooled AUC >= 0.97: {auc_met} ({records['pooled']['auc']:.3f}); "
        f"<= 1 % of normal beats flagged on every record: {flagged}."
    )


# --- per-sensor baselines on SMD ---

SMD_LSTM = ("LSTM pooled, baseline sensor, global threshold", "LSTM pooled, baseline model, global threshold")
SMD_PCA = ("PCA pooled, baseline sensor", "PCA pooled, baseline model")
SMD_PER_SENSOR_THRESHOLD = "LSTM pooled, baseline sensor, per-sensor threshold"


def smd(name: str) -> str:
    run = load(name)
    pooled = {case: values["pooled"] for case, values in run["cases"].items()}
    lstm, pca = ([pooled[case] for case in cases] for cases in (SMD_LSTM, SMD_PCA))
    return (
        f"warm-up {run['baseline_windows']} windows (`{name}`, {day(run['measured_at'])}): LSTM ROC AUC "
        f"{lstm[0]['auc']:.2f} per sensor against {lstm[1]['auc']:.2f} pooled, F1 {lstm[0]['f1']:.2f} against "
        f"{lstm[1]['f1']:.2f}; PCA ROC AUC {pca[0]['auc']:.2f} against {pca[1]['auc']:.2f}; a per-sensor threshold "
        f"flags {percent(pooled[SMD_PER_SENSOR_THRESHOLD]['fpr'], 0)} of the normal windows"
    )


# --- episodes, drift and the shadow model (bench/LIFECYCLE.md) ---


def lifecycle_blocks() -> list[str]:
    """The tables and the shadow line of bench/LIFECYCLE.md, quoted whole."""
    text = (REPO / "bench" / "LIFECYCLE.md").read_text()
    tables = re.findall(r"(?m)^(?:\|.*\|\n)+", text)
    shadow = re.search(r"(?m)^Shadow .*$", text)
    assert len(tables) == 2 and shadow, "bench/LIFECYCLE.md no longer has two tables and a shadow line"
    return [block.rstrip("\n") for block in tables] + [shadow.group(0)]


# --- speed (bench/results.json) ---

DAEMON_BACKENDS = ("torch", "onnx")  # what `model.backend` offers; the bench's other variants are not the daemon's


def best_engine(embedding_dim: int, threads: int) -> dict:
    rows = [
        r
        for r in results()["engine"]["rows"]
        if r["embedding_dim"] == embedding_dim and r["threads"] == threads and r["backend"] in DAEMON_BACKENDS
    ]
    return max(rows, key=lambda r: r["rate"]["median"])


def engine_table() -> str:
    tutorial = results()["tutorial"]["by_embedding"]
    rows = []
    for embedding_dim in (32, 64, 128):
        cells = []
        for threads in (1, 2):
            best = best_engine(embedding_dim, threads)
            cells.append(f"{best['rate']['median']:,.0f} ({best['backend']}, batch {best['batch']})")
        loop = tutorial[str(embedding_dim)]["1"]["median"]
        ratio = max(best_engine(embedding_dim, t)["rate"]["median"] for t in (1, 2)) / loop
        rows.append(row(embedding_dim, f"{loop:,.0f}", *cells, f"{ratio:.1f}x"))
    header = ["E", "tutorial loop, 1 thread", "engine, 1 thread", "engine, 2 threads", "engine / loop"]
    return table(header, rows)


def config_name(config: dict) -> str:
    return (
        f"{config['mode']}, {config['backend']}, {config['threads']} thread(s), max_batch {config['max_batch']}, "
        f"QoS {config['qos']}, {config['chunk']} samples a message, MQTT {config['protocol']}"
    )


def carried_step(run: dict) -> dict | None:
    return next((s for s in run["steps"] if s["sensors"] == run["sensors_carried"]), None)


def e2e_table() -> str:
    rows = []
    for run in results()["e2e"]["runs"]:
        step = carried_step(run)
        rows.append(
            row(
                config_name(run["config"]),
                run["sensors_carried"],
                ms(step["latency_p99_seconds"]) if step else "-",
                run["sensors_carried_throughput_only"],
                f"{run['max_scored_windows_per_second']:,.0f}",
            )
        )
    header = ["configuration", "sensors carried", "p99 there", "on throughput alone", "windows/s at most"]
    return table(header, rows)


def beat_e2e() -> str:
    part = results()["beat_e2e"]
    beat, fixed = (next(r for r in part["runs"] if r["config"]["mode"] == mode) for mode in ("beats", "fixed"))
    return (
        "Beat mode next to fixed mode "
        f"(`bench/results.json`, `beat_e2e`, measured {day(part['stamp']['measured_at'])}): "
        f"beat mode carried {beat['sensors_carried']} sensors (p99 from a beat's last sample to its decision within "
        f"{beat['latency_limit_seconds']:.0f} s), fixed mode {fixed['sensors_carried']} in the same run."
    )


def speed_summary() -> str:
    data = results()
    default = data["e2e"]["runs"][0]
    engine = best_engine(32, 1)["rate"]["median"]
    paho, daemon = (
        next(r for r in data["transport"]["rows"] if r["client"] == client and r["chunk_samples"] == 35)
        for client in ("paho", "daemon")
    )
    return (
        f"the daemon's defaults scored at most {default['max_scored_windows_per_second']:,.0f} windows/s through "
        f"the broker (`e2e`, {day(data['e2e']['stamp']['measured_at'])}) against the engine's {engine:,.0f} on one "
        f"thread; receiving a 35-sample message costs the daemon's MQTT thread {daemon['cpu_us_per_message']:.0f} µs "
        f"of CPU, paho alone {paho['cpu_us_per_message']:.0f} µs (`transport`, "
        f"{day(data['transport']['stamp']['measured_at'])})"
    )


def onnx_decisions() -> str:
    onnx = results()["accuracy"]["onnx"]
    return (
        f"ONNX Runtime gives the same decisions ({onnx['decisions_differ']} of {onnx['windows']} differ, scores within "
        f"{onnx['error_max_abs_diff']:.0e}; `accuracy` in the same file)"
    )


def bfloat16_figures() -> str:
    rates = {
        r["backend"]: r["rate"]["median"]
        for r in results()["engine"]["rows"]
        if r["embedding_dim"] == 32 and r["threads"] == 1 and r["batch"] == 64
    }
    half = results()["accuracy"]["torch_bfloat16"]
    return (
        f"With `model.dtype: bfloat16` the engine scored {rates['torch-bf16']:,.0f} windows/s on one thread at "
        f"batch 64, against {rates['torch']:,.0f} in float32 in the same run; {half['decisions_differ']} of "
        f"{half['windows']} test windows are decided otherwise, the median score of a normal window "
        f"{half['error_median_rel_diff_normal']:.1%} apart"
    )


def gil() -> str:
    part = results()["gil"]
    return (
        f"Next to a busy Python thread (as paho's is in the daemon) the traced `Scorer` keeps "
        f"{part['traced_busy_thread']:,.0f} windows/s against {part['eager_busy_thread']:,.0f} op by op "
        f"(batch {part['batch']}, 1 thread; `gil`, measured {day(part['stamp']['measured_at'])})."
    )


def speed_dates() -> str:
    data = results()
    parts = ", ".join(f"`{part}` {day(data[part]['stamp']['measured_at'])}" for part in ("engine", "tutorial", "e2e"))
    machine = data["machine"]
    return (
        f"Source: `bench/results.json` ({parts}); {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}."
    )


# --- several instances (bench/results.json, scaleout) ---


def scaleout_table() -> str:
    runs = results()["scaleout"]["runs"]
    sensors = sorted({s["sensors"] for run in runs for s in run["steps"]})
    header = ["sensors"] + [f"{run['instances']} instance(s): windows/s, p99, keeps up" for run in runs]
    rows = []
    for count in sensors:
        cells = []
        for run in runs:
            step = next((s for s in run["steps"] if s["sensors"] == count), None)
            cells.append(
                "-"
                if step is None
                else f"{step['scored_windows_per_second']:,.0f} of {step['offered_windows_per_second']:,.0f}, "
                f"{ms(step['latency_p99_seconds'])}, {'yes' if step['keeps_up'] else 'no'}"
            )
        rows.append(row(f"{count:,}", *cells))
    return table(header, rows)


def scaleout_summary() -> str:
    data = results()
    part = data["scaleout"]
    one, two = part["runs"]
    windows_per_sensor = data["e2e"]["sample_rate_hz"] / data["e2e"]["window"]
    messages_per_sensor = data["e2e"]["sample_rate_hz"] / data["e2e"]["runs"][0]["config"]["chunk"]
    per_machine = WORKER_CORES / (one["daemon_cpu_ms_per_window"] / 1000 * windows_per_sensor)
    broker = part["broker_cores_per_1000_messages_per_second"]
    return (
        f"`bench/results.json`, `scaleout`, measured {day(part['stamp']['measured_at'])}: one instance carried "
        f"{one['sensors_carried']} sensors, two carried {two['sensors_carried']} "
        f"({part['ratio_two_over_one']:.2f}x); CPU per window scored, MQTT included, "
        f"{one['daemon_cpu_ms_per_window']:.2f} ms (one instance) and {two['daemon_cpu_ms_per_window']:.2f} ms (two); "
        f"nats-server {broker:.3f} cores per 1,000 messages/s. A machine with {WORKER_CORES} cores running only "
        f"instances would carry about {WORKER_CORES} / ({one['daemon_cpu_ms_per_window']:.2f} ms x "
        f"{windows_per_sensor:.2f} windows/s) = {round(per_machine, -2):,.0f} sensors at full CPU, and the broker "
        f"would need about {broker * messages_per_sensor:.2f} cores per 1,000 sensors"
    )


# --- the test suite's fast part (bench/test-suite.json) ---


def fast_suite() -> str:
    run = load("bench/test-suite.json")
    failures = f"; failed at that load: {', '.join(f'`{name}`' for name in run['failures'])}" if run["failures"] else ""
    return (
        f"`{run['command']}` took {run['seconds'] / 60:.1f} minutes ({run['cpu_seconds'] / 60:.1f} minutes of CPU) on "
        f"the project's {run['cores']}-core machine "
        f"at a load average of {run['load_average_1m']:.1f} to {run['load_average_1m_end']:.1f} "
        f"({run['summary']}{failures}; `bench/test-suite.json`, {day(run['measured_at'])})"
    )


def beat_loro_table() -> str:
    """The leave-one-record-out table as `bench.beat_loro` renders it, from `bench/beat_loro.json`."""
    from monitor.training.beat_trainer import aami_table

    run = load("bench/beat_loro.json")
    lines = aami_table(run["records"], run["gross"]).splitlines()
    return "\n".join([row(lines[0]), "|" + "---|" * len(lines[0].split(" | ")), *(row(line) for line in lines[1:])])


def smd_multichannel() -> list[str]:
    """The machines-with-many-channels tables as `bench.smd_multichannel` renders them, and the chosen width's seeds
    without and with the score scale."""
    from bench.smd_multichannel import false_alarm_table, scaled
    from bench.smd_multichannel import table as smd_table

    run = load("bench/smd_multichannel.json")
    sentences = []
    for flag, how in ((False, ""), (True, " with the score scale")):
        chosen = [item for item in run["runs"] if item["level_dim"] == run["chosen_level_dim"] and scaled(item) == flag]
        pooled = sorted(item["lstm"]["auc"] for item in chosen)
        sentences.append(
            f"over its {len(chosen)} seeds{how} the LSTM's pooled ROC AUC is {pooled[0]:.3f} to {pooled[-1]:.3f}, "
            f"PCA's{how} {chosen[0]['pca']['auc']:.3f}"
        )
    return [
        "\n".join(smd_table(run["runs"])),
        "\n".join(false_alarm_table(run["runs"], run["chosen_level_dim"])),
        f"the lowest validation loss chose K {run['chosen_level_dim']}; {sentences[0]}; {sentences[1]}",
    ]


QUALITY = "docs/quality-and-speed.md"
FIGURES: dict[str, tuple[str, Callable[[], str | list[str]]]] = {
    "demo summary": ("README.md", demo_summary),
    "training time": ("README.md", training_time),
    "ecg5000 evaluation": (QUALITY, ecg5000_evaluation),
    "mitdb-beats evaluation": (QUALITY, mitdb_evaluation),
    "beat quality table": (QUALITY, beat_quality_table),
    "beat aims": (QUALITY, beat_aims),
    "smd 150": (QUALITY, lambda: smd("bench/baseline_smd.json")),
    "smd 432": (QUALITY, lambda: smd("bench/baseline_smd_n432.json")),
    "lifecycle": (QUALITY, lifecycle_blocks),
    "speed dates": (QUALITY, speed_dates),
    "engine table": (QUALITY, engine_table),
    "e2e table": (QUALITY, e2e_table),
    "speed summary": (QUALITY, speed_summary),
    "gil": (QUALITY, gil),
    "onnx decisions": (QUALITY, onnx_decisions),
    "bfloat16": (QUALITY, bfloat16_figures),
    "beat e2e": (QUALITY, beat_e2e),
    "scaleout table": (QUALITY, scaleout_table),
    "scaleout summary": (QUALITY, scaleout_summary),
    "fast suite": (QUALITY, fast_suite),
    "beat leave-one-record-out": ("docs/user-guide.md", beat_loro_table),
    "smd many channels": (QUALITY, smd_multichannel),
}


def flat(text: str) -> str:
    """Whitespace folded, so a passage may be wrapped anywhere in the doc."""
    return " ".join(text.split())


def passages(render: Callable[[], str | list[str]]) -> list[str]:
    rendered = render()
    return [rendered] if isinstance(rendered, str) else rendered


@pytest.mark.parametrize("name", FIGURES)
def test_the_doc_quotes_its_source(name):
    doc, render = FIGURES[name]
    text = flat((REPO / doc).read_text())
    for passage in passages(render):
        assert flat(passage) in text, f"{doc} does not say, as its source now does:\n{passage}"


def test_a_changed_figure_fails_the_check():
    """The check can fail: one figure of the scaleout summary changed is no longer found."""
    text = flat((REPO / QUALITY).read_text())
    passage = flat(scaleout_summary())
    assert passage in text
    changed = re.sub(r"carried (\d+) sensors", lambda m: f"carried {int(m.group(1)) + 100} sensors", passage, count=1)
    assert changed != passage and changed not in text


if __name__ == "__main__":
    for name, (doc, render) in FIGURES.items():
        for passage in passages(render):
            print(f"== {name} ({doc})\n{passage}\n")
