"""The Grafana dashboard says what its numbers are: every rate panel a per-second unit, the heatmap its units."""

from __future__ import annotations

import json

from tests.support import REPO

PANELS = json.loads((REPO / "dashboards" / "monitor.json").read_text())["panels"]


def test_rate_panels_have_a_per_second_unit():
    rates = [
        panel
        for panel in PANELS
        if panel["type"] == "timeseries"
        and all("rate(" in target["expr"] and "_bucket" not in target["expr"] for target in panel["targets"])
        and not any(" / " in target["expr"] for target in panel["targets"])
    ]
    assert len(rates) >= 6
    for panel in rates:
        assert panel["fieldConfig"]["defaults"]["unit"].endswith("/s"), panel["title"]


def test_heatmap_names_its_axis_and_cells():
    (heatmap,) = [panel for panel in PANELS if panel["type"] == "heatmap"]
    assert heatmap["options"]["yAxis"]["axisLabel"] == "window score (normalised MAE)"
    assert heatmap["options"]["cellValues"]["unit"] == "suffix: windows"
