"""The monitor's benchmark suite: `python -m bench.run` (bench/README.md says what it measures and how to read it).

Parts are registered in bench/parts.py and return their records; results go to bench/results.json, one table per
part to bench/RESULTS.md (bench/results.py).
"""
