"""s3prl's Featurizer: a learnable softmax-weighted sum of an upstream's hidden states."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Featurizer(nn.Module):
    """``sum_l softmax(w)_l * h_l`` over L states of equal width D.

    Weights start at zero, i.e. a uniform average. With ``layer_norm`` each state is first normalised
    over its feature dimension (no affine parameters, as s3prl's ``normalize``); off by default because
    it is per frame and nonlinear, so it rules out pooling before the weighted sum.
    """

    def __init__(self, n_layers: int, layer_norm: bool = False):
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(n_layers))
        self.layer_norm = layer_norm

    def normalized_weights(self) -> torch.Tensor:
        return F.softmax(self.weights, dim=0)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """``states`` (L, ..., D) -> (..., D)."""
        if states.shape[0] != self.weights.shape[0]:
            raise ValueError(f"expected {self.weights.shape[0]} states, got {states.shape[0]}")
        if self.layer_norm:
            states = F.layer_norm(states, states.shape[-1:])
        w = self.normalized_weights().to(states.dtype)
        return torch.tensordot(w, states, dims=1)
