"""The load generator the e2e bench starts: its closing summary, from a real run against a real broker, is the
record the bench reads."""

from __future__ import annotations

import subprocess

import orjson
import pytest

from bench import loadgen, records
from bench.data import DATA_DIR, TRAIN_NORMAL, split_path
from tests.support import REPO, Broker

pytestmark = pytest.mark.slow


def test_load_generator_summary_is_read_by_the_bench(broker: Broker) -> None:
    """The generator's closing line (a real run against a real broker) must fit the record the e2e bench reads."""
    command = loadgen.command(broker.port, 4, 1.0, 250.0, 35, 1, split_path(DATA_DIR, TRAIN_NORMAL))
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True, cwd=REPO)
    summary = records.LoadSummary(**orjson.loads(result.stdout.strip().splitlines()[-1]))
    assert summary.error is None
    assert summary.messages > 0 and summary.publish_errors == 0 and summary.unacknowledged == 0
