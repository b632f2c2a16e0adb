"""Reading a daemon's Prometheus endpoint from outside: samples by name, and quantiles of its histograms."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def scrape_metrics(url: str) -> dict[str, list]:
    """{sample name: [(labels, value), ...]} from a Prometheus endpoint."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def histogram_quantile(quantile: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative counts by upper bound (`le`): linear inside the bucket
    holding rank quantile*count; None for an empty histogram."""
    points = sorted(buckets.items())
    total = points[-1][1] if points else 0.0
    if total <= 0:
        return None
    rank = quantile * total
    lower_bound, lower_count = 0.0, 0.0
    for upper_bound, count in points:
        if count >= rank:
            if upper_bound == float("inf"):
                return lower_bound  # beyond the last finite bucket: its bound, as Prometheus does
            if count == lower_count:
                return upper_bound
            return lower_bound + (upper_bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = upper_bound, count
    return lower_bound
