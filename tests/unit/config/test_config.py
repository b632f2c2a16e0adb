"""Config errors: every problem one line naming its key and where the value came from (the file or the
`MONITOR_` variable), in words, all of them in one run, `model.path` included; a `MONITOR_` variable that names no
key is one of them; `check-config` says what it checked, and contacts the broker only with --connect."""

from __future__ import annotations

import os
import shutil

import pytest

from monitor.cli import main
from monitor.config.schema import load_config
from monitor.errors import ConfigError
from monitor.model.artifact import artifact_problem
from tests.support import DEFAULT_MODEL, REPO, free_port, run_cli

BEAT_MODEL = REPO / "models" / "mitdb-beats"


def problems(path, environ=None) -> list[str]:
    with pytest.raises(ConfigError) as error:
        load_config(path, environ=environ or {}, check_model=artifact_problem)
    return str(error.value).splitlines()


@pytest.fixture
def config_file(tmp_path):
    def write(text: str):
        path = tmp_path / "monitor.yaml"
        path.write_text(text)
        return path

    return write


def test_an_override_error_is_blamed_on_its_variable_not_the_file(config_file):
    path = config_file(f"model:\n  path: {DEFAULT_MODEL}\nmqtt:\n  port: 1883\n")
    assert problems(path, {"MONITOR_MQTT__PORT": "99999"}) == [
        "environment variable MONITOR_MQTT__PORT: mqtt.port: must be less than or equal to 65535 (got 99999)"
    ]


def test_a_file_error_is_blamed_on_the_file_next_to_a_valid_override(config_file):
    path = config_file(f"model:\n  path: {DEFAULT_MODEL}\nbatching:\n  max_batch: 0\n")
    assert problems(path, {"MONITOR_MQTT__PORT": "1884"}) == [
        f"{path}: batching.max_batch: must be greater than or equal to 1 (got 0)"
    ]


def test_field_errors_and_a_missing_model_are_reported_in_one_run(config_file, tmp_path):
    missing = tmp_path / "no-model"
    path = config_file(f"model:\n  path: {missing}\nmqtt:\n  prot: 1883\n")
    assert problems(path, {"MONITOR_LOGGING__LEVEL": "loud"}) == [
        f"{path}: mqtt.prot: unknown key (misspelt?)",
        "environment variable MONITOR_LOGGING__LEVEL: logging.level: "
        "must be 'debug', 'info', 'warning' or 'error' (got 'loud')",
        f"{path}: model.path: '{missing}': no such model directory",
    ]


def test_a_missing_model_names_model_path_and_its_source(config_file, tmp_path):
    path = config_file("logging:\n  level: info\n")
    elsewhere = tmp_path / "elsewhere"
    assert problems(path, {"MONITOR_MODEL__PATH": str(elsewhere)}) == [
        f"environment variable MONITOR_MODEL__PATH: model.path: '{elsewhere}': no such model directory"
    ]
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    shutil.copy(DEFAULT_MODEL / "model.json", incomplete)
    path = config_file(f"model:\n  path: {incomplete}\n")
    assert problems(path) == [f"{path}: model.path: '{incomplete}': not a model artifact (model.safetensors missing)"]


def test_a_broken_model_is_blamed_on_model_path_by_check_config(config_file, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(DEFAULT_MODEL, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    path = config_file(f"model:\n  path: {broken}\n")
    result = run_cli("check-config", str(path), timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"monitor: error: {path}: model.path: {weights}: checksum mismatch: the weights are truncated or were altered"
    ]


def test_replay_and_watch_do_not_need_the_model(config_file, tmp_path):
    # They only talk to the broker: a machine without the model can still replay data or watch alerts.
    path = config_file(f"model:\n  path: {tmp_path / 'absent'}\n")
    assert load_config(path, environ={}).model.path == tmp_path / "absent"


def test_a_check_across_keys_names_the_key_in_words_and_every_source(config_file):
    path = config_file(f"model:\n  path: {BEAT_MODEL}\nwindowing:\n  mode: beats\n")
    assert problems(path) == [f"{path}: windowing.sample_rate_hz: required with mode: beats"]
    path = config_file(f"model:\n  path: {BEAT_MODEL}\n")
    assert problems(path, {"MONITOR_WINDOWING__MODE": "beats"}) == [
        f"{path} with environment variable MONITOR_WINDOWING__MODE: windowing.sample_rate_hz: required with mode: beats"
    ]


def test_a_monitor_variable_that_names_no_key_is_one_line(config_file):
    path = config_file(f"model:\n  path: {DEFAULT_MODEL}\n")
    assert problems(path, {"MONITOR_MQTT_PORT": "1", "MONITORING": "x", "MONITOR_MQTT__PORT": "1884"}) == [
        "environment variable MONITOR_MQTT_PORT: names no config key: a key is MONITOR_<SECTION>__<KEY>, "
        "with two underscores (did you mean MONITOR_MQTT__PORT?)"
    ]
    assert problems(path, {"MONITOR_VERBOSE": "1"}) == [
        "environment variable MONITOR_VERBOSE: names no config key: a key is MONITOR_<SECTION>__<KEY>, "
        "with two underscores"
    ]


def test_check_config_names_the_sources_of_a_mode_mismatch_and_says_what_it_checked(monkeypatch, capsys):
    config = REPO / "configs" / "monitor.yaml"
    for name in [name for name in os.environ if name.startswith("MONITOR_")]:
        monkeypatch.delenv(name)
    assert main(["check-config", str(config)]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"{config}: ok: keys, values and MONITOR_ variables valid; model ")
    assert out.endswith("broker 127.0.0.1:1883 not contacted (--connect tries it)")
    closed = free_port()
    monkeypatch.setenv("MONITOR_MQTT__PORT", str(closed))
    assert main(["check-config", str(config), "--connect"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"monitor: error: cannot reach the broker at 127.0.0.1:{closed} ([Errno 111] Connection refused)"
    ]
    monkeypatch.setenv("MONITOR_MODEL__PATH", str(BEAT_MODEL))
    assert main(["check-config", str(config)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"monitor: error: windowing.mode fixed (from {config}) does not fit model.path {BEAT_MODEL} (from environment "
        "variable MONITOR_MODEL__PATH), a beat-mode model: set windowing.mode: beats and windowing.sample_rate_hz "
        "(configs/monitor-beats.yaml), or use a fixed-window model"
    ]
    monkeypatch.delenv("MONITOR_MODEL__PATH")
    assert main(["check-config", str(REPO / "configs" / "monitor-beats.yaml")]) == 0  # the beat recipe is valid
    assert "(beats, matches windowing.mode)" in capsys.readouterr().out


SPARKPLUG_DEVICE = "{group: plant, node: edge1, device: pump1, channels: [X], sample_rate_hz: 250}"


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("input:\n  format: sparkplug_b\n", "sparkplug_b input needs sparkplug.devices"),
        ("input:\n  formats: [{filter: 'a/+/#/b', format: frame}]\n", "'#' must be the last level"),
        ("input:\n  format: protobuf\n", "must be 'json', 'frame' or 'sparkplug_b'"),
        (
            f"input:\n  format: sparkplug_b\n  sparkplug:\n    devices: [{SPARKPLUG_DEVICE}, {SPARKPLUG_DEVICE}]\n",
            "each mapped device needs its own sensor id",
        ),
        (
            f"input:\n  format: sparkplug_b\n  sparkplug:\n    devices: [{SPARKPLUG_DEVICE}]\njournal:\n  path: j\n",
            "sparkplug_b with journal.path is not supported",
        ),
        (
            "input:\n  format: sparkplug_b\n  sparkplug:\n    devices: [{group: plant, node: 'edge/1', channels: [X], "
            "sample_rate_hz: 250}]\n",
            "a Sparkplug id cannot contain",
        ),
        (
            "input:\n  format: sparkplug_b\n  sparkplug:\n    devices: [{group: plant, node: edge1, "
            "sensor_id: 'pump 1', channels: [X], sample_rate_hz: 250}]\n",
            "does not match mqtt.sensor_id_pattern",
        ),
    ],
)
def test_input_formats_are_checked(config_file, section, expected):
    found = problems(config_file(f"model:\n  path: {DEFAULT_MODEL}\n{section}"))
    assert len(found) == 1 and expected in found[0], found


def test_a_sparkplug_mapping_loads(config_file):
    path = config_file(
        f"model:\n  path: {DEFAULT_MODEL}\ninput:\n  formats: [{{filter: 'spBv1.0/#', format: sparkplug_b}}]\n"
        f"  sparkplug:\n    devices: [{SPARKPLUG_DEVICE}]\n"
    )
    config = load_config(path, environ={}, check_model=artifact_problem)
    assert config.input.uses("sparkplug_b") and not config.input.json_only
    assert config.input.sparkplug.devices[0].sensor == "pump1"
    assert config.input.sparkplug.alert_sources() == {
        "pump1": {"sparkplug": {"group": "plant", "node": "edge1", "device": "pump1", "metrics": ["X"]}}
    }
