"""The monitor's benchmark suite: `python -m bench.run` (bench/README.md says what it measures and how to read it).

Parts are registered in bench/parts.py, return the typed records of bench/records.py, and are compared against
bench/targets.py; results go to bench/results.json, their tables to bench/RESULTS.md (bench/report.py).
"""
