"""The monitor's benchmark suite: `python -m bench.run` (see bench/run.py and bench/RESULTS.md).

Side by side on one machine: the dense-matmul rate (the limit), the tutorial-style one-window loop,
the scoring engine alone (torch and ONNX Runtime, batch sizes and threads), the whole daemon end to
end through a real Mosquitto, training time per epoch and, behind `--model-table`, a model-size
table. Results go to bench/results.json and bench/RESULTS.md.
"""
