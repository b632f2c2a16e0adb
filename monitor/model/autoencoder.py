"""The LSTM autoencoder of the ECG5000 tutorial, batch-first so one forward pass scores a batch."""

from __future__ import annotations

import torch
from torch import nn


class LSTMAutoencoder(nn.Module):
    """Encoder LSTM(C->2E), LSTM(2E->E); decoder repeats the embedding, LSTM(E->E), LSTM(E->2E), Linear(2E->C).

    Input and output are `[batch, window, channels]`. Windows in a batch never interact, so a
    window's reconstruction does not depend on what else is in the batch.
    """

    def __init__(self, channels: int, embedding_dim: int) -> None:
        super().__init__()
        hidden_dim = 2 * embedding_dim
        self.channels = channels
        self.embedding_dim = embedding_dim
        self.encoder_wide = nn.LSTM(channels, hidden_dim, batch_first=True)
        self.encoder_narrow = nn.LSTM(hidden_dim, embedding_dim, batch_first=True)
        self.decoder_narrow = nn.LSTM(embedding_dim, embedding_dim, batch_first=True)
        self.decoder_wide = nn.LSTM(embedding_dim, hidden_dim, batch_first=True)
        self.output = nn.Linear(hidden_dim, channels)

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
        return self.decode(self.encode(windows), windows.shape[1])


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
