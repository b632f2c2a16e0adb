"""Several instances behind a partitioning broker: a real nats-server run from deploy/nats/nats-server.conf,
sensors publishing `sensors/<id>/ecg`, each daemon subscribed over MQTT 3.1.1 to its own partitions only."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import threading
import time
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from monitor.config.schema import partition_of
from monitor.tools.replay import ReplayPlan, messages, plan_ucr, sensor_names
from monitor.training.datasets import read_ucr
from tests.e2e.test_daemon_e2e import expected_alerts
from tests.e2e.test_faults import figure, make_model
from tests.nats import DEPLOYED_CONFIG, NatsServer, require_nats_server
from tests.support import (
    REPO,
    SPLITS,
    daemon_config,
    kill_9_mid_stream,
    metric,
    restart_config,
    wait_until,
)
from tests.unit.config.test_partitions import deployed_config

pytestmark = pytest.mark.slow

PARTITIONS = 4
INSTANCES = ("a", "b")  # deploy/nats/monitor-0.yaml and -1.yaml: one partition each (nats-server.conf says why)
TEMPLATE_UNIT = REPO / "systemd" / "monitor@.service"
SENSORS = 50
CHUNK = 35
WINDOW = 140
KILL_AT_ROUND = 102  # 3,570 samples a sensor: window 25 ([3500, 3640)) straddles the kill
RESTART_AT_ROUND = 150
MOVE_AT_ROUND = 191  # 6,685 samples: window 47 straddles the move, and is kept by the copied state file
MOVED_AT_ROUND = 215


@pytest.fixture
def nats_factory(tmp_path):
    made: list[NatsServer] = []

    def make(partitions: int) -> NatsServer:
        require_nats_server()
        made.append(NatsServer(tmp_path / f"nats{len(made)}", partitions=partitions).start())
        return made[-1]

    yield make
    for server in made:
        server.stop()


class Sensors:
    """A QoS 1 MQTT 3.1.1 publisher standing in for the sensors; `publish` returns once the broker acknowledged all."""

    def __init__(self, port: int) -> None:
        self.connected = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"sensors-{time.time_ns()}", protocol=mqtt.MQTTv311
        )
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
    """Four plain MQTT subscribers, one per partition: every sensor reaches exactly the one its hash names, the
    hash being the daemon's own `partition_of` (which decides whose retained episode states an instance takes)."""
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
        assert got == {sensor_id for sensor_id in sensor_ids if partition_of(sensor_id, PARTITIONS) == partition}
        assert 5 <= len(got) <= 15, [len(s) for s in seen]  # roughly even: a hash, not a round robin


def instance_config(directory: Path, port: int, index: int, client_id: str | None = None) -> Path:
    """deploy/nats/monitor-<index>.yaml with this test's broker port, metrics port, model and state file (in
    `directory`, standing for the instance's host)."""
    deployed = deployed_config(index)
    directory.mkdir(exist_ok=True)
    client_id = client_id or f"{deployed['mqtt']['client_id']}-{time.time_ns() % 10**9}"
    return daemon_config(
        directory / "monitor.yaml",
        port,
        mqtt={**deployed["mqtt"], "port": port, "client_id": client_id},
        partitions=deployed["partitions"],
        windowing={"state_file": str(directory / "windows.json")},
        batching={"max_batch": 64, "max_wait_seconds": 0.05},
    )


def windows_of(plan: ReplayPlan, upto_samples: int | None = None) -> int:
    """Windows complete in the plan's streams (up to a sample count)."""
    return sum(min(len(stream), upto_samples or len(stream)) // WINDOW for stream in plan.streams)


def test_two_instances_score_every_window_once_a_killed_one_loses_only_its_straddling_windows_a_moved_one_nothing(
    nats_factory, capture_factory, daemon_factory, tmp_path
):
    """The ECG5000 test split as 50 sensors, nats-server with the shipped mapping (2 partitions), two daemons with the
    shipped instance configs (one partition each). Instance b is SIGKILLed between messages, its sensors' window 25
    half received; input goes on while it is down; it restarts with the same client id. Later b is moved to "another
    host": stopped with SIGTERM (its partial windows saved), input goes on, and started from a copy of its config and
    state file. Across both instances: every window scored once except b's windows straddling the kill, the alerts
    those of one instance on the same replay minus those, no sensor seen by both instances."""
    nats = nats_factory(len(INSTANCES))
    owners = {name: [partition] for partition, name in enumerate(INSTANCES)}
    configs = {name: instance_config(tmp_path / name, nats.port, index) for index, name in enumerate(INSTANCES)}
    daemons = {name: daemon_factory(config) for name, config in configs.items()}
    alerts = capture_factory(nats.port, ["alerts/#"])
    plan = plan_ucr(read_ucr(SPLITS / "test.txt.xz"), sensor_names(SENSORS))
    sensors_of = {
        name: {s for s in plan.sensor_ids if partition_of(s, len(INSTANCES)) in parts} for name, parts in owners.items()
    }
    assert sensors_of["a"] and sensors_of["b"]
    stream = list(messages(plan, CHUNK))
    bounds = [0, KILL_AT_ROUND, RESTART_AT_ROUND, MOVE_AT_ROUND, MOVED_AT_ROUND, stream[-1][0] + 1]  # in rounds
    phases = [[m for m in stream if start <= m[0] < end] for start, end in itertools.pairwise(bounds)]
    sensors = Sensors(nats.port)
    scored_by_gone: list[float] = []  # windows scored by b's processes that have ended
    alert_log = {name: [] for name in INSTANCES}

    def scored() -> float:
        return sum(metric(daemon.scrape(), "monitor_windows_scored_total") for daemon in daemons.values()) + sum(
            scored_by_gone
        )

    def publish_and_settle(phase: list, windows_by_then: int) -> None:
        sensors.publish(phase)
        wait_until(lambda: scored() >= windows_by_then, 90, interval=0.25, what="the phase scored")

    def end_b(how: str) -> None:
        scored_by_gone.append(metric(daemons["b"].scrape(), "monitor_windows_scored_total"))
        if how == "kill":
            alert_log["b"] += daemons["b"].events("alert_published")
            daemons["b"].kill()
        else:
            assert daemons["b"].stop() == 0
            alert_log["b"] += daemons["b"].events("alert_published")

    straddling = (KILL_AT_ROUND * CHUNK // WINDOW) * WINDOW
    lost = {(sensor_id, straddling) for sensor_id in sensors_of["b"]}
    publish_and_settle(phases[0], windows_of(plan, KILL_AT_ROUND * CHUNK))
    end_b("kill")
    sensors.publish(phases[1])  # b's partition waits in its persistent session
    daemons["b"] = daemon_factory(configs["b"])
    publish_and_settle(phases[2], windows_of(plan, MOVE_AT_ROUND * CHUNK) - len(lost))
    end_b("stop")  # the move: stop on the old host (partial windows saved) ...
    sensors.publish(phases[3])
    moved = tmp_path / "b-elsewhere"
    moved.mkdir()
    shutil.copy(tmp_path / "b" / "windows.json", moved / "windows.json")  # ... copy config and state file, start there
    daemons["b"] = daemon_factory(
        instance_config(moved, nats.port, 1, client_id=yaml.safe_load(configs["b"].read_text())["mqtt"]["client_id"])
    )
    publish_and_settle(phases[4], windows_of(plan) - len(lost))
    sensors.close()
    expected, _, _ = expected_alerts(SPLITS / "test.txt.xz", SENSORS)
    alerts.wait_for(lambda c: len(c.payloads("alerts/")) >= len(expected - lost), 60, what="every alert")

    assert scored() == windows_of(plan) - len(lost)  # once each, none twice
    payloads = alerts.payloads("alerts/")
    got = [(alert["sensor_id"], alert["window_start_seq"]) for alert in payloads]
    assert len(got) == len(set(got)), "an alert was published twice"
    assert set(got) == expected - lost
    assert lost & expected, "the kill should have cost some flagged windows, or the test proves nothing about them"
    assert daemons["b"].events("window_state_restored")[0]["sensors"] == len(sensors_of["b"])

    alert_log["a"] = daemons["a"].events("alert_published")
    alert_log["b"] += daemons["b"].events("alert_published")
    seen = {name: {event["sensor_id"] for event in events} for name, events in alert_log.items()}
    assert seen["a"] <= sensors_of["a"] and seen["b"] <= sensors_of["b"]  # disjoint: no sensor seen by both
    assert metric(daemons["a"].scrape(), "monitor_active_sensors") == len(sensors_of["a"])
    assert metric(daemons["b"].scrape(), "monitor_active_sensors") == len(sensors_of["b"])

    # Which instance and which partitions: on every log line, in the metrics, in the retained status.
    names = {name: yaml.safe_load(configs[name].read_text())["mqtt"]["client_id"] for name in INSTANCES}
    assert {(e.get("instance"), tuple(e.get("partitions", ()))) for e in daemons["b"].events()} == {(names["b"], (1,))}
    samples = daemons["b"].scrape()
    assert metric(samples, "monitor_instance_info", instance_name=names["b"], partitions="1") == 1
    assert [metric(samples, "monitor_partition_consumed", partition=p) for p in ("0", "1")] == [0, 1]
    status = capture_factory(nats.port, ["monitor/+/status"])
    status.wait_for(lambda c: len(c.messages) >= 2, 10, what="both retained statuses")
    statuses = {topic: (json.loads(payload), retained) for topic, payload, retained in status.messages}
    for index, name in enumerate(INSTANCES):
        assert statuses[f"monitor/{names[name]}/status"] == (
            {
                "status": "online",
                "instance": names[name],
                "partitions": [index],
                "subscriptions": [f"shard/{index}/sensors/+/ecg"],
            },
            True,
        )
    assert daemons["a"].stop() == 0 and daemons["b"].stop() == 0


@pytest.mark.parametrize("load", ["warm", "busy"])
def test_kill_9_behind_nats_loses_no_acknowledged_window(nats_factory, tmp_path, load):
    """RELIABILITY.md rows 29 and 30 behind the shipped nats-server: instance 0's deployed config (MQTT 3.1.1, a
    persistent session, partition 0 of 2) with the journal on, 20 sensors of that partition streaming; SIGKILL
    mid-stream (warm) or while a burst is queued (busy); the instance restarted with the same config and client id
    must make up every window from its journal and the session's redelivery."""
    nats = nats_factory(len(INSTANCES))
    deployed = deployed_config(0)
    model = make_model(tmp_path / "alert_all", 4, 0.0)
    config = restart_config(
        tmp_path, nats.port, model, mqtt={**deployed["mqtt"], "port": nats.port}, partitions=deployed["partitions"]
    )
    ours = (f"s{index:03d}" for index in itertools.count())
    sensor_ids = list(itertools.islice((s for s in ours if partition_of(s, len(INSTANCES)) == 0), 20))
    # As systemd restarts a crashed instance: RestartSec after the crash, longer than the broker's ack_wait, so what
    # the instance held unacknowledged is redelivered ahead of newer input (deploy/nats/nats-server.conf says why).
    restart_delay = int(re.search(r"(?m)^RestartSec=(\d+)$", TEMPLATE_UNIT.read_text()).group(1))
    ack_wait = int(re.search(r'ack_wait: "(\d+)s"', DEPLOYED_CONFIG.read_text()).group(1))
    assert ack_wait < restart_delay, "the shipped ack_wait must be shorter than the unit's RestartSec"
    outcome = kill_9_mid_stream(nats, config, load, sensor_ids, restart_delay)
    figure(f"kill_9_nats_{load}", *outcome.figure())
    assert outcome.lost == 0
