"""Both tests on one suspect: what an owner reports about a copy found in the wild."""

from __future__ import annotations

import numpy as np
from torch import nn

from speechmimic.proof.inference import dataset_inference
from speechmimic.proof.watermark import Secret, verify


def examine(
    upstream: nn.Module,
    secret: Secret | None,
    verification: list[np.ndarray],
    private: list[np.ndarray],
    public: list[np.ndarray],
    groups: list[str] | None = None,
    seed: int = 0,
) -> dict:
    """The watermark's verdict (when there is a secret) and dataset inference on the secret's layers
    (all of the suspect's states without one); ``groups``: each private clip's source, see
    :func:`~speechmimic.proof.inference.dataset_inference`."""
    out = {}
    if secret is not None:
        out["watermark"] = verify(upstream, secret, verification)
    layers = secret.layers if secret is not None else None
    out["dataset_inference"] = dataset_inference(upstream, private, public, layers, groups, seed=seed)
    return out
