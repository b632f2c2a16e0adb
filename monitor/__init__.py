"""monitor: a streaming anomaly monitor for ECG and other sensor signals."""

__version__ = "0.1.0"
