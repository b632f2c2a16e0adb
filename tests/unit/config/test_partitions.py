"""Partitions in the config: the subscriptions and sensor-id level they give, their errors, the removed `shard:`
section, and the shipped instance configs of deploy/nats covering the partitions once each."""

from __future__ import annotations

import re

import pytest
import yaml

from monitor.config.schema import load_config, partition_of
from monitor.errors import ConfigError
from tests.nats import DEPLOYED_CONFIG
from tests.support import DEFAULT_MODEL, REPO, run_cli

DEPLOY = REPO / "deploy" / "nats"


def deployed_config(index: int) -> dict:
    return yaml.safe_load((DEPLOY / f"monitor-{index}.yaml").read_text())


def test_a_config_with_the_removed_shard_section_says_what_to_use_instead(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("shard: {index: 1, count: 2}\nmqtt: {prot: 5}\n")
    result = run_cli("check-config", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, lines  # one line per problem, the other problems still reported
    assert lines[0].startswith(f"monitor: error: {path}: shard: removed")
    assert "partitions:" in lines[0] and "hash_topic" in lines[0]
    assert "mqtt.prot" in lines[1]


def test_partitions_give_the_subscriptions_and_the_sensor_id_level(tmp_path):
    path = tmp_path / "instance.yaml"
    path.write_text(yaml.safe_dump({"mqtt": {"client_id": "monitor-1"}, "partitions": {"count": 4, "consume": [3, 1]}}))
    config = load_config(path)
    assert config.mqtt.subscribe == ["shard/3/sensors/+/ecg", "shard/1/sensors/+/ecg"]
    assert config.mqtt.sensor_id_level == 3
    assert (config.instance_name, config.consumed_partitions) == ("monitor-1", [1, 3])
    sensors = [f"sensor-{index:04d}" for index in range(40)]
    assert [s for s in sensors if config.partitions.owns(s)] == [s for s in sensors if partition_of(s, 4) in (1, 3)]
    assert load_config(None).consumed_partitions == []


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"partitions": {"count": 2, "consume": [2]}}, "partitions.consume: [2] not in 0..1"),
        ({"partitions": {"count": 2, "consume": [0, 0]}}, "names a partition twice"),
        ({"partitions": {"count": 2, "consume": []}}, "partitions.consume"),
        ({"partitions": {"count": 2, "consume": [0], "topic": "shard/{partition}/ecg"}}, "partitions.topic"),
        (
            {"partitions": {"count": 2, "consume": [0]}, "mqtt": {"subscribe": ["sensors/+/ecg"]}},
            "mqtt.subscribe: leave it out with partitions",
        ),
        (
            {"partitions": {"count": 2, "consume": [0]}, "mqtt": {"sensor_id_level": 1}},
            "mqtt.sensor_id_level: leave it out",
        ),
    ],
)
def test_bad_partitions_are_config_errors(tmp_path, section, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(section))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert expected in str(error.value)
    assert all(line.startswith(f"{path}: ") for line in str(error.value).splitlines())


def test_deployed_instance_configs_cover_the_partitions_once_each():
    """One config per partition of the shipped mapping, each valid for `monitor run` (model path aside)."""
    count = int(re.search(r"partition\((\d+),1\)", DEPLOYED_CONFIG.read_text()).group(1))
    configs = sorted(DEPLOY.glob("monitor-*.yaml"))
    assert len(configs) == count
    seen = {"client_id": set(), "port": set(), "partition": set()}
    for index, path in enumerate(configs):
        result = run_cli("check-config", str(path), env={"MONITOR_MODEL__PATH": str(DEFAULT_MODEL)})
        assert result.returncode == 0, result.stderr
        config = deployed_config(index)
        assert config["mqtt"]["protocol"] == "3.1.1" and config["mqtt"]["persistent_session"] is True
        assert config["partitions"] == {"count": count, "consume": [index]}
        seen["client_id"].add(config["mqtt"]["client_id"])
        seen["port"].add(config["metrics"]["port"])
        seen["partition"].add(index)
    assert all(len(values) == count for values in seen.values()), seen
