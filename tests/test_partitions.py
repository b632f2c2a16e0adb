"""Several instances behind a partitioning broker: a real nats-server run from deploy/nats/nats-server.conf,
sensors publishing `sensors/<id>/ecg`, each daemon subscribed over MQTT 3.1.1 to its own partitions only."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import orjson
import yaml
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from monitor.config import load_config
from monitor.datasets import read_ucr
from monitor.errors import ConfigError
from monitor.replay import ReplayPlan, messages, plan_ucr
from tests.conftest import DEFAULT_MODEL, REPO, SPLITS, daemon_config, metric, run_cli, wait_until
from tests.nats import DEPLOYED_CONFIG, NatsServer, nats_partition
from tests.test_daemon_e2e import expected_alerts

PARTITIONS = 4
INSTANCES = ("a", "b")  # deploy/nats/monitor-0.yaml and -1.yaml: one partition each (nats-server.conf says why)
DEPLOY = REPO / "deploy" / "nats"
UNIT = REPO / "systemd" / "monitor.service"
TEMPLATE_UNIT = REPO / "systemd" / "monitor@.service"
SENSORS = 50
CHUNK = 35
WINDOW = 140
KILL_AT_ROUND = 102  # 3,570 samples a sensor: window 25 ([3500, 3640)) straddles the kill
RESTART_AT_ROUND = 170


@pytest.fixture
def nats_factory(tmp_path):
    made: list[NatsServer] = []

    def make(partitions: int) -> NatsServer:
        made.append(NatsServer(tmp_path / f"nats{len(made)}", partitions=partitions).start())
        return made[-1]

    yield make
    for server in made:
        server.stop()


class Sensors:
    """A QoS 1 MQTT 3.1.1 publisher standing in for the sensors; `publish` returns once the broker acknowledged all."""

    def __init__(self, port: int) -> None:
        self.connected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sensors-{time.time_ns()}", protocol=mqtt.MQTTv311)
        self.client.max_inflight_messages_set(500)
        self.client.on_connect = lambda client, userdata, flags, code, properties: self.connected.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.connected.wait(10), "the sensors could not connect"

    def publish(self, batch: list[tuple[int, str, int, object]]) -> int:
        infos = []
        for _, sensor_id, seq, samples in batch:
            body = orjson.dumps({"seq": seq, "samples": samples[:, 0].tolist()})
            infos.append(self.client.publish(f"sensors/{sensor_id}/ecg", body, qos=1))
        for info in infos:
            info.wait_for_publish(60)
        return len(infos)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_the_mapping_splits_sensors_into_disjoint_partitions(nats_factory, capture_factory):
    """Four plain MQTT subscribers, one per partition: every sensor reaches exactly the one its hash names."""
    nats = nats_factory(PARTITIONS)
    captures = [capture_factory(nats.port, [f"shard/{partition}/sensors/+/ecg"]) for partition in range(PARTITIONS)]
    sensors = Sensors(nats.port)
    sensor_ids = [f"sensor-{index:04d}" for index in range(40)]
    for sensor_id in sensor_ids:
        sensors.client.publish(f"sensors/{sensor_id}/ecg", b'{"seq": 0, "samples": [0.0]}', qos=1).wait_for_publish(10)
    sensors.close()
    wait_until(lambda: sum(len(capture.messages) for capture in captures) >= len(sensor_ids), 10, what="every message")
    seen = [{topic.split("/")[3] for topic, _, _ in capture.messages} for capture in captures]
    assert sum(len(capture.messages) for capture in captures) == len(sensor_ids)  # one delivery a message
    for partition, got in enumerate(seen):
        assert got == {sensor_id for sensor_id in sensor_ids if nats_partition(sensor_id, PARTITIONS) == partition}
        assert 5 <= len(got) <= 15, [len(s) for s in seen]  # roughly even: a hash, not a round robin


def deployed_config(index: int) -> dict:
    return yaml.safe_load((DEPLOY / f"monitor-{index}.yaml").read_text())


def instance_config(path: Path, port: int, index: int) -> Path:
    """deploy/nats/monitor-<index>.yaml with this test's broker port, metrics port and model."""
    deployed = deployed_config(index)
    mqtt_settings = {**deployed["mqtt"], "port": port, "client_id": f"{deployed['mqtt']['client_id']}-{time.time_ns() % 10**9}"}
    return daemon_config(path, port, mqtt=mqtt_settings, batching={"max_batch": 64, "max_wait_seconds": 0.05})


def windows_of(plan: ReplayPlan, upto_samples: int | None = None) -> int:
    """Windows complete in the plan's streams (up to a sample count)."""
    return sum(min(len(stream), upto_samples or len(stream)) // WINDOW for stream in plan.streams)


def test_two_instances_score_every_window_once_and_a_killed_one_loses_only_its_straddling_windows(
    nats_factory, capture_factory, daemon_factory, tmp_path
):
    """50 sensors over 4 partitions, 2 daemons with 2 partitions each. Instance b is SIGKILLed mid-stream (between
    messages, its sensors' window 25 half received), input goes on while it is down, then it restarts with the same
    client id. Across both: every window scored once except b's straddling windows, alerts equal to what one instance
    flags on the same replay minus those, no sensor seen by both."""
    nats = nats_factory(len(INSTANCES))
    owners = {name: [partition] for partition, name in enumerate(INSTANCES)}
    configs = {name: instance_config(tmp_path / f"{name}.yaml", nats.port, index) for index, name in enumerate(INSTANCES)}
    daemons = {name: daemon_factory(config) for name, config in configs.items()}
    alerts = capture_factory(nats.port, ["alerts/#"])
    plan = plan_ucr(read_ucr(SPLITS / "test.txt"), SENSORS)
    sensors_of = {name: {s for s in plan.sensor_ids if nats_partition(s, len(INSTANCES)) in parts} for name, parts in owners.items()}
    assert sensors_of["a"] and sensors_of["b"]
    stream = list(messages(plan, CHUNK))
    phases = [
        [m for m in stream if m[0] < KILL_AT_ROUND],
        [m for m in stream if KILL_AT_ROUND <= m[0] < RESTART_AT_ROUND],
        [m for m in stream if m[0] >= RESTART_AT_ROUND],
    ]
    sensors = Sensors(nats.port)

    def accepted() -> float:
        return sum(metric(daemon.scrape(), "monitor_messages_received_total", outcome="accepted") for daemon in daemons.values())

    published = sensors.publish(phases[0])
    wait_until(lambda: accepted() == published, 60, interval=0.25, what="every message of the first phase taken")
    before_kill = windows_of(plan, KILL_AT_ROUND * CHUNK)
    scored = {name: lambda d=daemon: metric(d.scrape(), "monitor_windows_scored_total") for name, daemon in daemons.items()}
    wait_until(lambda: scored["a"]() + scored["b"]() == before_kill, 60, interval=0.25, what="the first phase scored")
    scored_by_killed = scored["b"]()
    alert_log = {name: daemon.events("alert_published") for name, daemon in daemons.items()}
    daemons["b"].kill()

    sensors.publish(phases[1])  # b's partitions wait in its persistent session
    restarted = daemon_factory(configs["b"])
    sensors.publish(phases[2])
    sensors.close()

    lost = {(sensor_id, (KILL_AT_ROUND * CHUNK // WINDOW) * WINDOW) for sensor_id in sensors_of["b"]}
    total = windows_of(plan) - len(lost)
    total_scored = lambda: scored["a"]() + scored_by_killed + metric(restarted.scrape(), "monitor_windows_scored_total")  # noqa: E731
    wait_until(lambda: total_scored() >= total, 90, interval=0.25, what="every window scored")
    expected, _, _ = expected_alerts(SPLITS / "test.txt", SENSORS)
    alerts.wait_for(lambda c: len(c.payloads("alerts/")) >= len(expected - lost), 60, what="every alert")

    assert total_scored() == total  # once each, none twice
    payloads = alerts.payloads("alerts/")
    got = [(alert["sensor_id"], alert["window_start_seq"]) for alert in payloads]
    assert len(got) == len(set(got)), "an alert was published twice"
    assert set(got) == expected - lost
    assert lost & expected, "the kill should have cost some flagged windows, or the test proves nothing about them"

    alert_log["a"] = daemons["a"].events("alert_published")
    alert_log["b"] += restarted.events("alert_published")
    seen = {name: {event["sensor_id"] for event in events} for name, events in alert_log.items()}
    assert seen["a"] <= sensors_of["a"] and seen["b"] <= sensors_of["b"]  # disjoint: no sensor seen by both
    assert metric(daemons["a"].scrape(), "monitor_active_sensors") == len(sensors_of["a"])
    assert metric(restarted.scrape(), "monitor_active_sensors") == len(sensors_of["b"])
    after_restart = [event for event in restarted.events("alert_published")]
    assert after_restart and min(event["window_start_seq"] for event in after_restart) >= 26 * WINDOW
    assert daemons["a"].stop() == 0 and restarted.stop() == 0


# --- configuration ---


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
    assert load_config(None).consumed_partitions == []


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"partitions": {"count": 2, "consume": [2]}}, "partitions: Value error, consume: [2] not in 0..1"),
        ({"partitions": {"count": 2, "consume": [0, 0]}}, "names a partition twice"),
        ({"partitions": {"count": 2, "consume": []}}, "partitions.consume"),
        ({"partitions": {"count": 2, "consume": [0], "topic": "shard/{partition}/ecg"}}, "partitions.topic"),
        ({"partitions": {"count": 2, "consume": [0]}, "mqtt": {"subscribe": ["sensors/+/ecg"]}},
         "mqtt.subscribe: leave it out with partitions"),
        ({"partitions": {"count": 2, "consume": [0]}, "mqtt": {"sensor_id_level": 1}}, "mqtt.sensor_id_level: leave it out"),
    ],
)
def test_bad_partitions_are_config_errors(tmp_path, section, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(section))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert expected in str(error.value)
    assert all(line.startswith(f"{path}: ") for line in str(error.value).splitlines())


# --- the recipe's files: instance configs, the template unit ---


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
        assert config["mqtt"]["subscribe"] == [f"shard/{index}/sensors/+/ecg"]
        seen["client_id"].add(config["mqtt"]["client_id"])
        seen["port"].add(config["metrics"]["port"])
        seen["partition"].add(index)
    assert all(len(values) == count for values in seen.values()), seen


def unit_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def test_template_unit_is_monitor_service_per_instance():
    """monitor@.service differs from monitor.service only where the instance name must go, so the sandbox,
    watchdog and drain settings stay in step."""
    plain, template = unit_lines(UNIT), unit_lines(TEMPLATE_UNIT)
    assert len(plain) == len(template)
    differing = [(a, b) for a, b in zip(plain, template, strict=True) if a != b]
    assert differing and all("%i" in b or "nats-server" in b for _, b in differing), differing
    assert "ExecStart=/opt/monitor/.venv/bin/monitor run --config /etc/monitor/monitor-%i.yaml" in template
    assert "StateDirectory=monitor-%i" in template


def test_template_unit_exposure(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    instance = tmp_path / "monitor@0.service"
    instance.write_text(TEMPLATE_UNIT.read_text())
    result = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(instance)], capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout
