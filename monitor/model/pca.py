"""The PCA yardstick: principal components fitted on the same normalised windows as the LSTM, scored the same way.

A window is flattened to W x C values and projected on the components that explain `VARIANCE` of the training
windows' variance; its score is the mean absolute error of that reconstruction, in the units of the LSTM's score
(the mean over the window and its channels of |x - reconstruction|). `monitor train` fits it beside the model,
calibrates its own threshold on the same calibration windows and stores it in the artifact (`PCA_FILE`), so the
training summary and `monitor evaluate` report both models on the same windows: a model that does not beat
this simplest reconstruction model is not yet worth its cost. The daemon does not serve it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from monitor.errors import ArtifactError
from monitor.model.artifact import ModelArtifact, Normalisation
from monitor.model.scoring import BatchScorer, Scores

VARIANCE = 0.9
PCA_FILE = "pca.npz"
METADATA_KEY = "yardstick"


class PcaModel(BatchScorer):
    """Mean and components of the flattened `[W, C]` windows; scores like the LSTM's scoring pass."""

    def __init__(self, normalisation: Normalisation, mean: np.ndarray, components: np.ndarray, window: int) -> None:
        self.normalisation = normalisation
        self.mean = np.asarray(mean, np.float64)
        self.components = np.asarray(components, np.float64)
        self.window = window
        self.channels = len(normalisation.mean)

    @classmethod
    def fit(cls, windows: np.ndarray, normalisation: Normalisation, variance: float = VARIANCE) -> PcaModel:
        """The components explaining `variance` of the normalised windows' total variance (at least one)."""
        flat = normalisation.apply(windows).reshape(len(windows), -1).astype(np.float64)
        mean = flat.mean(axis=0)
        _, singular, vt = np.linalg.svd(flat - mean, full_matrices=False)
        energy = singular**2
        share = np.cumsum(energy) / max(float(energy.sum()), np.finfo(float).tiny)
        count = min(int(np.searchsorted(share, variance)) + 1, len(vt))
        return cls(normalisation, mean, vt[:count], windows.shape[1])

    def score(self, windows: np.ndarray) -> Scores:
        """Raw windows in, as for the LSTM's `Scorer`: the model's normalisation applies first."""
        normalised = self.normalisation.apply(windows)
        centred = normalised.reshape(len(windows), -1).astype(np.float64) - self.mean
        residual = centred - (centred @ self.components.T) @ self.components
        errors = np.abs(residual).reshape(len(windows), self.window, self.channels)
        return Scores(
            errors.mean(axis=(1, 2)).astype(np.float32),
            errors.mean(axis=2).astype(np.float32),
            errors.mean(axis=1).astype(np.float32),
        )

    def save(self, directory: Path) -> None:
        """The mean and components beside the model (the normalisation is the artifact's own)."""
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / PCA_FILE, "wb") as handle:
            np.savez(handle, mean=self.mean, components=self.components)

    @classmethod
    def load(cls, artifact: ModelArtifact) -> PcaModel | None:
        """The artifact's PCA part, or None for an artifact without one."""
        if not isinstance(artifact.metadata.get(METADATA_KEY), dict) or artifact.path is None:
            return None
        directory = Path(artifact.path)
        try:
            with np.load(directory / PCA_FILE) as stored:
                mean, components = stored["mean"], stored["components"]
        except (OSError, KeyError, ValueError) as error:
            raise ArtifactError(f"{directory}: its PCA part cannot be read ({type(error).__name__}: {error})") from None
        size = artifact.window * artifact.channels
        if mean.shape != (size,) or components.ndim != 2 or components.shape[1] != size:
            raise ArtifactError(
                f"{directory}: its PCA part does not fit windows of {artifact.window}x{artifact.channels}"
            )
        return cls(artifact.normalisation, mean, components, artifact.window)
