"""The LSTM autoencoder of the ECG5000 tutorial, batch-first so one forward pass scores a batch."""

from __future__ import annotations

import torch
from torch import nn


class LSTMAutoencoder(nn.Module):
    """Encoder LSTM(C->2E), LSTM(2E->E); decoder repeats the embedding, LSTM(E->E), LSTM(E->2E), Linear(2E->C).

    Input and output are `[batch, window, channels]`. Windows in a batch never interact, so a
    window's reconstruction does not depend on what else is in the batch.

    With a level path (`level_dim` K > 0, for machines with many channels) each window's per-channel mean, its
    level, is reconstructed apart: through a linear bottleneck Linear(C->K), Linear(K->C), added back at every
    step, while the LSTMs encode and reconstruct the window minus its level. An LSTM's states are bounded, so
    levels beyond those seen in training saturate it and a machine that has drifted but is normal reconstructs
    badly; a linear path extrapolates. K < C keeps the path from passing any level through: a level that breaks
    the channels' usual relations to each other is not reconstructed.
    """

    def __init__(self, channels: int, embedding_dim: int, level_dim: int = 0) -> None:
        super().__init__()
        if not (level_dim == 0 or 0 < level_dim < channels):
            raise ValueError(f"level_dim {level_dim}: 0 (no level path) or fewer than the {channels} channel(s)")
        hidden_dim = 2 * embedding_dim
        self.channels = channels
        self.embedding_dim = embedding_dim
        self.level_dim = level_dim
        self.encoder_wide = nn.LSTM(channels, hidden_dim, batch_first=True)
        self.encoder_narrow = nn.LSTM(hidden_dim, embedding_dim, batch_first=True)
        self.decoder_narrow = nn.LSTM(embedding_dim, embedding_dim, batch_first=True)
        self.decoder_wide = nn.LSTM(embedding_dim, hidden_dim, batch_first=True)
        self.output = nn.Linear(hidden_dim, channels)
        if level_dim:
            self.level_down = nn.Linear(channels, level_dim)
            self.level_up = nn.Linear(level_dim, channels)

    def encode(self, windows: torch.Tensor) -> torch.Tensor:
        """Embed `[B, W, C]` windows as the last hidden state of the encoder, `[B, E]`."""
        hidden, _ = self.encoder_wide(windows)
        _, (last_hidden, _) = self.encoder_narrow(hidden)
        return last_hidden[-1]

    def decode(self, embedding: torch.Tensor, window: int) -> torch.Tensor:
        """Reconstruct `[B, window, C]` from `[B, E]` embeddings repeated over the window."""
        repeated = embedding.unsqueeze(1).expand(-1, window, -1)
        hidden, _ = self.decoder_narrow(repeated)
        hidden, _ = self.decoder_wide(hidden)
        return self.output(hidden)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        if not self.level_dim:
            return self.decode(self.encode(windows), windows.shape[1])
        level = windows.mean(dim=1, keepdim=True)
        shape = self.decode(self.encode(windows - level), windows.shape[1])
        return shape + self.level_up(self.level_down(level))


def reconstruction_errors(windows: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Per-timestep error `[B, W]`: absolute error averaged over channels (L1, as in training).

    The window score is the mean of this profile over time: the mean absolute error of the window.
    """
    return (windows - reconstructions).abs().mean(dim=2)


def window_scores(profiles: torch.Tensor) -> torch.Tensor:
    """A window's score `[B]`: the mean of its error profile over time, i.e. its mean absolute error."""
    return profiles.mean(dim=1)


def channel_errors(windows: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Per-channel error `[B, C]`: absolute error averaged over the window; which channels make a window's score."""
    return (windows - reconstructions).abs().mean(dim=1)
