"""SUPERB's light downstream heads: utterance classification and frame-level CTC."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

BLANK = 0


def length_mask(lengths: torch.Tensor, t: int) -> torch.Tensor:
    """(B, T) bool, True on the valid frames."""
    return torch.arange(t, device=lengths.device)[None, :] < lengths[:, None]


class UtteranceHead(nn.Module):
    """Linear(D, 256) projection -> mean pooling over valid frames -> Linear(256, n_classes).

    Also accepts already time-averaged features (B, D): projection and pooling are both linear, so
    projecting the mean equals pooling the projected frames exactly.
    """

    def __init__(self, dim: int, n_classes: int, proj: int = 256):
        super().__init__()
        self.proj = nn.Linear(dim, proj)
        self.out = nn.Linear(proj, n_classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        h = self.proj(x)
        if h.dim() == 3:
            if lengths is None:
                h = h.mean(1)
            else:
                mask = length_mask(lengths, h.shape[1]).unsqueeze(-1).to(h.dtype)
                h = (h * mask).sum(1) / lengths.clamp_min(1).unsqueeze(-1).to(h.dtype)
        return self.out(h)


class CTCHead(nn.Module):
    """Frame-level CTC head: a linear layer to ``n_tokens`` (blank at index 0), optionally after a
    2-layer BiLSTM (SUPERB's ASR head uses 1024 units per direction; 256 keeps it CPU-sized).

    Returns log-probabilities (B, T, n_tokens). The BiLSTM runs on packed sequences so padding never
    reaches the backward direction of a shorter clip.
    """

    def __init__(self, dim: int, n_tokens: int, lstm: bool = False, hidden: int = 256, lstm_layers: int = 2):
        super().__init__()
        self.lstm = nn.LSTM(dim, hidden, lstm_layers, batch_first=True, bidirectional=True) if lstm else None
        self.out = nn.Linear(2 * hidden if lstm else dim, n_tokens)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.lstm is not None:
            packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            x, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=x.shape[1])
        return self.out(x).log_softmax(-1)
