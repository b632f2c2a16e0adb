"""The alert rules and the dashboard as files: promtool checks and unit-tests the rules, the dashboard imports into
any Grafana; the expressions both hold are listed here for `tests/e2e/test_prometheus.py` to run against a real
Prometheus."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import yaml

from tests.support import REPO, missing_tool

DASHBOARD = REPO / "dashboards" / "monitor.json"
ALERTS = REPO / "dashboards" / "alerts.yml"
PROMETHEUS_CONFIG = REPO / "dashboards" / "prometheus.yml"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# What Grafana would put in place of its variables; `.*` is the instance variable's "All".
GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h", "instance": ".*"}


def promtool() -> str:
    return shutil.which("promtool") or missing_tool("promtool", "prometheus")


def test_promtool_checks_rules_and_config():
    for command in (["check", "rules", str(ALERTS)], ["check", "config", str(PROMETHEUS_CONFIG)]):
        result = subprocess.run([promtool(), *command], capture_output=True, text=True, timeout=60)
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
    result = subprocess.run([promtool(), "test", "rules", str(tests)], capture_output=True, text=True, timeout=60)
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
