"""Operating the monitor: the unit's sandbox, the alert rules, and every PromQL expression against a real Prometheus."""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from monitor.config.schema import Config
from tests.support import (
    SPLITS,
    DaemonProcess,
    daemon_config,
    free_port,
    metric,
    replay_args,
    spawn,
    terminate,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "monitor.service"
ENV_EXAMPLE = ROOT / "systemd" / "monitor.env.example"
INSTALL = ROOT / "systemd" / "install.sh"
DASHBOARD = ROOT / "dashboards" / "monitor.json"
ALERTS = ROOT / "dashboards" / "alerts.yml"
PROMETHEUS_CONFIG = ROOT / "dashboards" / "prometheus.yml"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
MAX_EXPOSURE = 2.0
# What Grafana would put in place of its variables; `.*` is the instance variable's "All".
GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h", "instance": ".*"}


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        package = "systemd" if tool == "systemd-analyze" else "prometheus"
        pytest.skip(f"{tool} is not installed (Debian package {package})")
    return path


# --- the systemd unit and its companions ---


def unit_settings() -> set[str]:
    return {line.strip() for line in UNIT.read_text().splitlines() if line.strip() and not line.startswith(("#", "["))}


def test_unit_exposure():
    analyze = require("systemd-analyze")
    command = [analyze, "security", "--offline=true", "--no-pager", str(UNIT)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_unit_keeps_the_settings_others_rely_on():
    """The settings other parts rely on: sd_notify and watchdog, the config check, the credential, reload by SIGHUP."""
    expected = {
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30",
        "DynamicUser=yes",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
        "ExecStartPre=/opt/monitor/.venv/bin/monitor check-config /etc/monitor/monitor.yaml",
        "ExecStart=/opt/monitor/.venv/bin/monitor run --config /etc/monitor/monitor.yaml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "LoadCredential=mqtt_password:/etc/monitor/credentials/mqtt_password",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "LimitNOFILE=1024",
    }
    assert expected <= unit_settings()
    # See the unit's comments: oneDNN's JIT needs W+X pages, MKL/OpenBLAS need @resources.
    assert "MemoryDenyWriteExecute=yes" not in unit_settings()
    assert "SystemCallFilter=~@resources" not in unit_settings()


def test_env_example_names_real_keys():
    names = re.findall(r"^#?(MONITOR_\w+)=", ENV_EXAMPLE.read_text(), flags=re.MULTILINE)
    assert names
    for name in names:
        model: type = Config
        *sections, key = name.removeprefix("MONITOR_").lower().split("__")
        for section in sections:
            model = model.model_fields[section].annotation
        assert key in model.model_fields, name


def test_install_script_parses():
    subprocess.run(["bash", "-n", str(INSTALL)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(INSTALL)], check=True)


# --- Prometheus rules and configuration ---


def test_promtool_checks_rules_and_config():
    promtool = require("promtool")
    for command in (["check", "rules", str(ALERTS)], ["check", "config", str(PROMETHEUS_CONFIG)]):
        result = subprocess.run([promtool, *command], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


RULE_TEST_SERIES = """
- {series: 'up{job="monitor", instance="a"}', values: '1 1 0x10'}
- {series: 'monitor_broker_connected{job="monitor", instance="a"}', values: '1 0x10'}
- {series: 'monitor_samples_received_total{job="monitor", instance="a"}', values: '0+100x10 1000x30'}
- {series: 'monitor_alerts_pending{job="monitor", instance="a"}', values: '0+20x30'}
- {series: 'monitor_messages_received_total{job="monitor", instance="a", outcome="accepted"}', values: '0+90x30'}
- {series: 'monitor_messages_received_total{job="monitor", instance="a", outcome="invalid_json"}', values: '0+10x30'}
- {series: 'monitor_messages_received_total{job="monitor", instance="b", outcome="accepted"}', values: '0+90x30'}
- {series: 'monitor_messages_received_total{job="monitor", instance="b", outcome="duplicate"}', values: '0+1x30'}
- {series: 'monitor_partition_consumed{job="monitor", instance="a", partition="0"}', values: '1x30'}
- {series: 'monitor_partition_consumed{job="monitor", instance="a", partition="1"}', values: '0x30'}
- {series: 'monitor_partition_consumed{job="monitor", instance="b", partition="0"}', values: '0x30'}
- {series: 'monitor_partition_consumed{job="monitor", instance="b", partition="1"}', values: '1 1 1 1 _x12 1x14'}
- {series: 'monitor_partition_consumed{job="monitor", instance="c", partition="2"}', values: '1x30'}
- {series: 'monitor_partition_consumed{job="monitor", instance="d", partition="2"}', values: '0x10 1x20'}
- {series: 'monitor_alerts_dropped_total{job="monitor", instance="a", reason="queue_full"}', values: '0 0 0 5 5 5'}
- {series: 'monitor_drift_psi{job="monitor", instance="a"}', values: '0.05x10 0.6x30'}
- {series: 'monitor_drift_psi_bound{job="monitor", instance="a"}', values: '0.25x40'}
- {series: 'monitor_drift_psi{job="monitor", instance="b"}', values: 'NAN_SERIES'}
- {series: 'monitor_drift_psi_bound{job="monitor", instance="b"}', values: '0.25x40'}
- {series: 'monitor_sensors_anomaly_rate_high{job="monitor", instance="a"}', values: '3x10 15x30'}
- {series: 'monitor_active_sensors{job="monitor", instance="a"}', values: '20x40'}
""".replace("NAN_SERIES", " ".join(["NaN"] * 40))  # promtool expands no "NaNx40"
A = {"job": "monitor", "instance": "a"}
# (evaluation time, alert, the labels of every alert of that name expected to be firing then)
RULE_TEST_EXPECTATIONS = [
    ("4m", "MonitorDown", [{"severity": "critical", **A}]),
    ("1m", "MonitorBrokerDisconnected", []),
    ("3m", "MonitorBrokerDisconnected", [{"severity": "critical", **A}]),
    ("20m", "MonitorNoData", []),
    ("30m", "MonitorNoData", [{"severity": "warning", "instance": "a"}]),
    ("5m", "MonitorAlertsPending", []),
    ("15m", "MonitorAlertsPending", [{"severity": "warning", **A}]),
    # Instance b rejects 1 of 91 messages: under the 5 % bar.
    ("20m", "MonitorRejectedMessages", [{"severity": "warning", "instance": "a"}]),
    # b, partition 1's consumer, is gone from minute 4 to 15: its last sample goes stale after 5 minutes, while a
    # still says 0 for partition 1, which then has no consumer; 2 minutes later the alert fires, until b is back.
    ("6m", "MonitorPartitionUnconsumed", []),
    ("13m", "MonitorPartitionUnconsumed", [{"severity": "critical", "partition": "1"}]),
    ("20m", "MonitorPartitionUnconsumed", []),
    # Partition 2 has two consumers from minute 10 on.
    ("12m", "MonitorPartitionConsumedTwice", []),
    ("16m", "MonitorPartitionConsumedTwice", [{"severity": "warning", "partition": "2"}]),
    ("4m", "MonitorAlertsDropped", [{"severity": "critical", "instance": "a", "reason": "queue_full"}]),
    ("20m", "MonitorAlertsDropped", []),
    # PSI above its bound from minute 11; instance b has too few scores yet (NaN) and never fires.
    ("20m", "MonitorModelDrift", []),
    ("30m", "MonitorModelDrift", [{"severity": "warning", **A}]),
    ("20m", "MonitorManySensorsAboveExpectedRate", []),
    ("30m", "MonitorManySensorsAboveExpectedRate", [{"severity": "warning", **A}]),
]


def test_alert_rules_fire_when_they_should(tmp_path):
    """promtool unit tests of the rules' logic (annotations stripped: promtool would compare their full text)."""
    promtool = require("promtool")
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    expectations = [
        {"eval_time": at, "alertname": alert, "exp_alerts": [{"exp_labels": labels} for labels in firing]}
        for at, alert, firing in RULE_TEST_EXPECTATIONS
    ]
    test = {"interval": "1m", "input_series": yaml.safe_load(RULE_TEST_SERIES), "alert_rule_test": expectations}
    tests = tmp_path / "tests.yml"
    tests.write_text(yaml.safe_dump({"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": [test]}))
    result = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the dashboard ---


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_is_importable_anywhere():
    """Every query goes through the `${datasource}` variable, so the JSON imports into any Grafana."""
    board = dashboard()
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert board["schemaVersion"] >= 39
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def grafana_expr(expr: str) -> str:
    """An expression as Grafana sends it; a variable without a test value is an error, not silently left in."""

    def value(match: re.Match) -> str:
        if match.group(1) not in GRAFANA_VARIABLES:
            raise ValueError(f"{expr}: add a value for ${match.group(1)} to GRAFANA_VARIABLES")
        return GRAFANA_VARIABLES[match.group(1)]

    return re.sub(r"\$\{?(\w+)\}?", value, expr)


def dashboard_expressions() -> list[tuple[str, str]]:
    board = dashboard()
    found = [
        (f"{panel['title']} {target['refId']}", grafana_expr(target["expr"]))
        for panel in board["panels"]
        for target in panel["targets"]
    ]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            # label_values(selector, label) is Grafana's; this PromQL asks Prometheus the same question.
            selector, label = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["definition"]).groups()
            found.append((f"variable {variable['name']}", f"count by ({label}) ({selector})"))
    return found


def rule_expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [(rule["alert"], rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


# --- a real Prometheus scraping a real /metrics endpoint ---


@pytest.fixture(scope="module")
def metrics_target(broker, tmp_path_factory) -> Iterator[str]:
    """`host:port` of a running daemon's /metrics while the test split is replayed through it in real time."""
    directory = tmp_path_factory.mktemp("ops-daemon")
    # Partition 0 of 2, so the per-partition panels and rules have series; the replay publishes on partition 0's topic.
    config = daemon_config(directory / "monitor.yaml", broker.port, partitions={"count": 2, "consume": [0]})
    daemon = DaemonProcess(config)
    replay = None
    try:
        daemon.wait_for_event("ready", timeout=60)
        replay = spawn(
            "monitor replay",
            [sys.executable, "-m", "monitor", *replay_args(config, SPLITS / "test.txt.xz", 20, speed="1")],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: metric(daemon.scrape(), "monitor_alerts_published_total") > 0, 60, what="the first alerts")
        yield f"127.0.0.1:{daemon.metrics_port}"
        assert daemon.stop() == 0
    finally:
        if replay is not None:
            terminate(replay, first=signal.SIGKILL)
        daemon.shutdown()


def http_json(url: str) -> dict:
    """GET a Prometheus API URL; its error answers (HTTP 400/422) carry JSON too."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:
        return json.load(error)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory, metrics_target) -> Iterator[str]:
    """Base URL of a Prometheus scraping `metrics_target` as job `monitor` every second, with the alert rules loaded."""
    binary = require("prometheus")
    workdir = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "monitor", "static_configs": [{"targets": [metrics_target]}]}],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{free_port()}"
    with open(workdir / "prometheus.log", "wb") as log:
        process = spawn(
            "Prometheus",
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address={url.removeprefix('http://')}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: process.poll() is not None or http_ok(f"{url}/-/ready"), 30, what="Prometheus to be ready")
        assert process.poll() is None, (workdir / "prometheus.log").read_text()
        yield url
    finally:
        terminate(process)


def query(prometheus: str, expr: str) -> dict:
    return http_json(f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")


@pytest.fixture(scope="module")
def scraped(prometheus) -> str:
    """Prometheus once it holds enough scrapes for rates and quantiles over the stand-in's moving series."""
    moving = "rate(monitor_windows_scored_total[1m]) > 0"
    wait_until(lambda: query(prometheus, moving)["data"]["result"], 30, what="two scrapes of moving series")
    # the drift panel stays empty until drift.min_windows scores are in
    wait_until(lambda: query(prometheus, "monitor_drift_psi >= 0")["data"]["result"], 60, what="the drift statistic")
    return prometheus


def has_data(answer: dict) -> bool:
    """A non-empty result with at least one number: a panel of NaN (e.g. a quantile of nothing) draws nothing."""
    return any(not math.isnan(float(series["value"][1])) for series in answer["data"]["result"])


@pytest.mark.parametrize(
    ("where", "expr"), dashboard_expressions(), ids=[where for where, _ in dashboard_expressions()]
)
def test_dashboard_expression_returns_data(scraped, where, expr):
    answer = query(scraped, expr)
    assert answer["status"] == "success", answer
    assert has_data(answer), f"{where}: {expr} returned {answer['data']}"


@pytest.mark.parametrize(("alert", "expr"), rule_expressions(), ids=[alert for alert, _ in rule_expressions()])
def test_rule_expression_is_valid(scraped, alert, expr):
    answer = query(scraped, expr)
    assert answer["status"] == "success", answer


def test_rules_evaluate_cleanly(scraped):
    """Prometheus loaded every rule of alerts.yml and evaluates them without runtime errors (e.g. vector matching)."""

    def evaluated() -> list[dict]:
        rules = [rule for group in http_json(f"{scraped}/api/v1/rules")["data"]["groups"] for rule in group["rules"]]
        return rules if rules and all(rule["health"] != "unknown" for rule in rules) else []

    rules = wait_until(evaluated, 15, what="one evaluation of every rule")
    assert {rule["name"] for rule in rules} == {alert for alert, _ in rule_expressions()}
    assert [(rule["name"], rule.get("lastError")) for rule in rules if rule["health"] != "ok"] == []
