"""docs/interface.md's metrics table names exactly the series the daemon registers: a metric added without a row,
or a row left behind by a removed metric, fails here."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry

from monitor.telemetry.metrics import Metrics
from tests.support import REPO

SUFFIX = {"counter": "_total", "info": "_info"}  # how prometheus_client names a family's samples


def registered() -> set[str]:
    registry = CollectorRegistry()
    Metrics(registry, max_batch=64, threshold=1.0)
    return {family.name + SUFFIX.get(family.type, "") for family in registry.collect()}


def documented() -> set[str]:
    """The names in the first cell of each row of the "Metrics" table (labels left out)."""
    text = (REPO / "docs" / "interface.md").read_text()
    rows = re.findall(r"(?m)^\| ([^|]*) \|", text[text.index("## Metrics") :])
    return {name for cell in rows for name in re.findall(r"`(monitor_\w+)", cell)}


def test_the_metrics_table_names_every_registered_series_and_no_other():
    assert documented() == registered()
