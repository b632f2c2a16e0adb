"""Which channels alerted, end to end: a fault injected into one channel of the 38 of an SMD machine, streamed
through a real Mosquitto to the daemon process; its alerts and `monitor evaluate --json` name that channel first,
by index and by name, and agree window by window."""

from __future__ import annotations

import numpy as np
import pytest

from tests.e2e.test_baseline_daemon import EXCERPT, STRIDE, WARM_UP, WINDOW, publish
from tests.support import daemon_config, metric, train_and_evaluate, wait_until

pytestmark = pytest.mark.slow

MACHINES = ("machine-1-3", "machine-2-4")
FAULT_CHANNEL, FAULT_ROWS = 17, (300, 500)  # a quiet stretch of machine-2-4, after its warm-up
NAMES = [f"metric-{index:02d}" for index in range(38)]


@pytest.fixture(scope="module")
def faulted(tmp_path_factory):
    """A small sensor-baseline model with channel names; machine-2-4's test excerpt with channel 17 pushed far off
    its range over rows 300-499, and what `monitor evaluate --json` reports on it. One channel of 38 at the clip adds
    only about CLIP / 38 to a window's mean error, so the threshold here is the calibration windows' 1st
    percentile (on unscaled scores: the quiet test excerpt's own scale would put it above every window) and the model
    is trained long enough to rank the fault above the normal windows: faulted windows must alert, and the test is
    about which channels the alerts name."""
    root = tmp_path_factory.mktemp("top-channels")
    (root / "train.yaml").write_text("threshold:\n  method: quantile\n  params:\n    q: 0.01\n")
    rows = np.load(EXCERPT / "machine-2-4_test.npy")
    rows[FAULT_ROWS[0] : FAULT_ROWS[1], FAULT_CHANNEL] += 5.0  # SMD values lie in [0, 1]
    labels = np.zeros(len(rows), np.int8)
    labels[FAULT_ROWS[0] : FAULT_ROWS[1]] = 1
    np.save(root / "faulted.npy", rows)
    np.save(root / "labels.npy", labels)
    report = train_and_evaluate(
        root / "model",
        [EXCERPT / f"{m}_train.npy" for m in MACHINES],
        [root / "faulted.npy"],
        [root / "labels.npy"],
        WINDOW,
        STRIDE,
        *("--config", str(root / "train.yaml"), "--baseline", "sensor", "--baseline-windows", str(WARM_UP)),
        *("--channel-names", ",".join(NAMES), "--embedding-dim", "8", "--epochs", "10", "--score-scale", "none"),
    )
    return root, rows, report["recordings"][0]


def inside_fault(start: int) -> bool:
    return FAULT_ROWS[0] <= start and start + WINDOW <= FAULT_ROWS[1]


def test_alerts_name_the_faulty_channel_first_as_evaluate_does(faulted, broker, capture_factory, daemon_factory):
    root, rows, report = faulted
    offline = dict(zip(report["flagged_window_starts"], report["flagged_top_channels"], strict=True))
    in_fault = [start for start in offline if inside_fault(start)]
    assert len(in_fault) >= 3, "faulted windows must alert"  # 14 of the 18 with this seed
    for start in in_fault:
        first = offline[start][0]
        assert (first["index"], first["name"]) == (FAULT_CHANNEL, NAMES[FAULT_CHANNEL])

    config = daemon_config(
        root / "monitor.yaml",
        broker.port,
        model=root / "model",
        windowing={"stride": STRIDE, "baseline": "sensor", "baseline_windows": WARM_UP},
    )
    alerts = capture_factory(broker.port, ["alerts/#"])
    daemon = daemon_factory(config)
    publish(broker.port, {"machine-2-4": rows}, 0, len(rows))
    scored = (len(rows) - WINDOW) // STRIDE + 1 - WARM_UP
    wait_until(lambda: metric(daemon.scrape(), "monitor_windows_scored_total") >= scored, 120, what="all scored")
    alerts.wait_for(lambda c: len(c.payloads("alerts/")) >= len(offline), 60, what="all alerts")
    live = {alert["window_start_seq"]: alert["top_channels"] for alert in alerts.payloads("alerts/")}
    assert live == offline  # the same windows, the same channels in the same order, the same errors
    assert daemon.stop() == 0
