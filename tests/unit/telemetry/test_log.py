"""RateLimiter: per-key interval, a bounded number of small keys, and a global budget no flood of keys can pass."""

from __future__ import annotations

import json
import logging

from monitor.telemetry.log import RateLimiter, configure_logging


def test_each_key_at_most_once_per_interval() -> None:
    limiter = RateLimiter(60.0)
    assert limiter.allow(("a", "bad_json"), now=0.0)
    assert not limiter.allow(("a", "bad_json"), now=59.9)
    assert limiter.allow(("b", "bad_json"), now=1.0)
    assert limiter.allow(("a", "bad_json"), now=60.0)


def test_keys_are_bounded_in_number_and_size() -> None:
    limiter = RateLimiter(60.0, max_keys=50, max_per_interval=10**9)
    for index in range(10_000):
        assert limiter.allow(("x" * 60_000 + str(index), "bad_topic"), now=0.0)
    assert len(limiter) == 50
    assert not any(isinstance(key, str) for key in limiter._last)  # hashes only: a 60 KB key is not kept


def test_a_flood_of_distinct_keys_cannot_write_a_line_per_message(capsys) -> None:
    configure_logging("info", "json")
    limiter = RateLimiter(60.0, max_per_interval=100)
    allowed = sum(limiter.allow((f"sensor-{index}", "bad_topic"), now=index * 0.001) for index in range(6_000))
    assert allowed == 100 and limiter.suppressed == 5_900
    assert limiter.allow(("sensor-new", "bad_topic"), now=60.0)  # the next interval: budget again
    logging.getLogger().handlers[0].flush()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(line["event"], line["count"]) for line in lines] == [("log_lines_suppressed", 5_900)]
