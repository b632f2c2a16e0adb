"""The training report: PNG plots beside the artifact, as the tutorials draw them in notebooks.

Needs matplotlib (the `report` extra); without it training still succeeds and says so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import structlog

from monitor.model.pca import PcaModel
from monitor.model.scoring import BatchScorer, Scorer
from monitor.training.trainer import TrainingResult

log = structlog.get_logger("monitor.report")


def write_report(result: TrainingResult, directory: Path, normal_label: int = 1, examples: int = 3) -> list[Path]:
    """Write loss.png, errors.png and reconstructions.png (examples from the labelled evaluation data, else
    from the calibration windows); returns the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("report_skipped", reason="matplotlib is not installed (pip install 'monitor[report]')")
        return []
    directory.mkdir(parents=True, exist_ok=True)
    scorer = Scorer.from_artifact(result.artifact)
    threshold = result.calibration.threshold
    written = []

    figure, axes = plt.subplots(figsize=(7, 4))
    epochs = np.arange(1, len(result.train_losses) + 1)
    axes.plot(epochs, result.train_losses, label="training loss (noisy input)")
    axes.plot(epochs, result.validation_losses, label="validation error")
    axes.axvline(result.best_epoch, color="grey", linestyle=":", label=f"best epoch {result.best_epoch}")
    axes.set(xlabel="epoch", ylabel="mean absolute error", title="Training", yscale="log")
    axes.legend()
    written.append(_save(figure, directory / "loss.png"))

    data = result.evaluation_data
    pca = PcaModel.load(result.artifact)
    models: list[tuple[str, BatchScorer, float]] = [("LSTM", scorer, threshold)]
    if pca is not None:
        models.append(("PCA yardstick", pca, float(result.artifact.metadata["yardstick"]["threshold"]["value"])))
    figure, panels = plt.subplots(1, len(models), figsize=(7 * len(models), 4), squeeze=False)
    for axes, (name, model, cut) in zip(panels[0], models, strict=True):
        groups = [("calibration (normal)", model.score_all(result.calibration_windows).errors)]
        if data is not None and data.labels is not None:
            errors = model.score_all(data.windows).errors
            anomalous = data.is_anomaly(normal_label)
            groups += [("evaluation normal", errors[~anomalous]), ("evaluation anomalous", errors[anomalous])]
        bins = np.linspace(0, np.quantile(np.concatenate([g[1] for g in groups]), 0.995), 80)
        for label, values in groups:
            axes.hist(values, bins=list(bins), alpha=0.5, density=True, label=f"{label} ({len(values)})")
        axes.axvline(cut, color="red", label=f"threshold {cut:.4f} ({result.calibration.method})")
        axes.set(xlabel="window score (mean absolute error)", ylabel="density", title=f"Reconstruction error, {name}")
        axes.legend()
    written.append(_save(figure, directory / "errors.png"))
    calibration_errors = scorer.score_all(result.calibration_windows).errors

    if data is not None and data.labels is not None:
        anomalous = data.is_anomaly(normal_label)
        rows = [
            ("normal", data.windows, np.flatnonzero(~anomalous)[:examples]),
            ("anomalous", data.windows, np.flatnonzero(anomalous)[:examples]),
        ]
    else:  # no labelled data: typical and worst-reconstructed held-out normal windows
        worst = np.argsort(calibration_errors)[::-1][:examples]
        rows = [
            ("calibration", result.calibration_windows, np.arange(min(examples, len(calibration_errors)))),
            ("calibration, highest score", result.calibration_windows, worst),
        ]
    written.append(_reconstructions(result, scorer, rows, examples, directory / "reconstructions.png"))
    return written


def _reconstructions(result: TrainingResult, scorer: Scorer, rows: list, examples: int, path: Path) -> Path:
    """A grid of windows and their reconstructions: one row per (kind, windows, indices) in `rows`."""
    import matplotlib.pyplot as plt

    threshold = result.calibration.threshold
    figure, grid = plt.subplots(len(rows), examples, figsize=(4 * examples, 3 * len(rows)), sharey=True, squeeze=False)
    for (kind, windows, indices), axes_row in zip(rows, grid, strict=True):
        chosen = windows[indices]
        batch, reconstructed = scorer.reconstruct(chosen)
        scores = scorer.score(chosen).errors
        for slot, (index, axes) in enumerate(zip(indices, axes_row, strict=False)):
            axes.plot(batch[slot, :, 0], label="input")
            axes.plot(reconstructed[slot, :, 0], label="reconstruction")
            verdict = "flagged" if scores[slot] > threshold else "passed"
            axes.set_title(f"{kind} #{index}: score {scores[slot]:.3f} ({verdict})", fontsize=9)
    grid.flat[0].legend()
    figure.suptitle("Windows and their reconstructions (normalised units)")
    return _save(figure, path)


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path
