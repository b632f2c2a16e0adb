"""Config errors: every problem one line naming its key and where the value came from (the file or the
`MONITOR_` variable), all of them in one run, `model.path` included."""

from __future__ import annotations

import shutil

import pytest

from monitor.config.schema import load_config
from monitor.errors import ConfigError
from monitor.model.artifact import artifact_problem
from tests.support import DEFAULT_MODEL, run_cli


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
        "environment variable MONITOR_MQTT__PORT: mqtt.port: Input should be less than or equal to 65535 (got 99999)"
    ]


def test_a_file_error_is_blamed_on_the_file_next_to_a_valid_override(config_file):
    path = config_file(f"model:\n  path: {DEFAULT_MODEL}\nbatching:\n  max_batch: 0\n")
    assert problems(path, {"MONITOR_MQTT__PORT": "1884"}) == [
        f"{path}: batching.max_batch: Input should be greater than or equal to 1 (got 0)"
    ]


def test_field_errors_and_a_missing_model_are_reported_in_one_run(config_file, tmp_path):
    missing = tmp_path / "no-model"
    path = config_file(f"model:\n  path: {missing}\nmqtt:\n  prot: 1883\n")
    assert problems(path, {"MONITOR_LOGGING__LEVEL": "loud"}) == [
        f"{path}: mqtt.prot: unknown key (misspelt?)",
        "environment variable MONITOR_LOGGING__LEVEL: logging.level: "
        "Input should be 'debug', 'info', 'warning' or 'error' (got 'loud')",
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


SPARKPLUG_DEVICE = "{group: plant, node: edge1, device: pump1, channels: [X], sample_rate_hz: 250}"


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("input:\n  format: sparkplug_b\n", "sparkplug_b input needs sparkplug.devices"),
        ("input:\n  formats: [{filter: 'a/+/#/b', format: frame}]\n", "'#' must be the last level"),
        ("input:\n  format: protobuf\n", "Input should be 'json', 'frame' or 'sparkplug_b'"),
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
