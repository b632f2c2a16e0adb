"""Every PromQL expression of the dashboard and the alert rules against a real Prometheus scraping a real daemon."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator

import pytest
import yaml

from tests.support import (
    REPO,
    SPLITS,
    DaemonProcess,
    daemon_config,
    free_port,
    metric,
    missing_tool,
    replay_args,
    spawn,
    terminate,
    wait_until,
)
from tests.unit.telemetry.test_alert_rules import ALERTS, dashboard_expressions, rule_expressions

pytestmark = pytest.mark.slow


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
            cwd=REPO,
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
    binary = shutil.which("prometheus") or missing_tool("prometheus", "prometheus")
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
