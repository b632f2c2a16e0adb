"""`python -m bench.suite_time`: time the fast part of the test suite and write bench/test-suite.json.

The fast part is `pytest -m "not slow" tests/unit`: in-process tests only (a guard in tests/conftest.py refuses
to start a broker or daemon there). The record keeps the wall and CPU time and the machine's load before and
after, since on a shared machine the wall time says as much about the neighbours as about the suite.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

COMMAND = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", "-m", "not slow", "tests/unit"]
RESULT = Path(__file__).resolve().parent / "test-suite.json"


def main() -> int:
    load = os.getloadavg()[0]
    stamp = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, *COMMAND], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    seconds = time.monotonic() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    summary = result.stdout.strip().splitlines()[-1]
    counts = {
        key: int(match.group(1)) if (match := re.search(rf"(\d+) {key}", summary)) else 0
        for key in ("passed", "failed")
    }
    record = {
        "command": 'OMP_NUM_THREADS=1 python -m pytest -m "not slow" tests/unit',
        "measured_at": stamp,
        "seconds": round(seconds, 1),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
        **counts,
        "failures": sorted(set(re.findall(r"^FAILED (\S+)", result.stdout, re.M))),
        "summary": summary,
        "cores": os.cpu_count(),
        "load_average_1m": round(load, 2),
        "load_average_1m_end": round(os.getloadavg()[0], 2),
    }
    RESULT.write_text(json.dumps(record, indent=2) + "\n")
    print(summary)
    return result.returncode


if __name__ == "__main__":
    raise SystemExit(main())
