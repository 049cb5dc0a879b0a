"""Every test on one suspect: what an owner reports about a copy found in the wild."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from speechmimic.defences.mark import SECRET_FORMAT as MARK_FORMAT
from speechmimic.defences.mark import MarkSecret
from speechmimic.errors import InputError
from speechmimic.proof import answer_mark
from speechmimic.proof.inference import dataset_inference
from speechmimic.proof.watermark import ALPHA, Secret, verify


def load_secret(path: str | Path) -> MarkSecret | Secret:
    """An answer-mark secret (``watermark mark``) or a fingerprint secret (``watermark fingerprint``)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            kind = str(z["meta"])
    except (OSError, KeyError, ValueError) as e:
        raise InputError(f"{path}: not a watermark secret ({e})") from None
    return MarkSecret.load(path) if MARK_FORMAT in kind else Secret.load(path)


def verify_any(
    upstream: nn.Module,
    secret: MarkSecret | Secret,
    wavs: list[np.ndarray],
    alpha: float = ALPHA,
    progress: bool = False,
) -> dict:
    """The test of ``secret``'s kind on ``upstream``; the result names the kind."""
    if isinstance(secret, MarkSecret):
        return {
            "kind": "answer mark",
            **answer_mark.verify(upstream, secret, wavs, alpha=alpha, progress=progress),
        }
    return {"kind": "fingerprint", **verify(upstream, secret, wavs, alpha, progress)}


def examine(
    upstream: nn.Module,
    secret: MarkSecret | Secret | None,
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
        out["watermark"] = verify_any(upstream, secret, verification)
    layers = secret.layers if secret is not None else None
    out["dataset_inference"] = dataset_inference(upstream, private, public, layers, groups, seed=seed)
    return out
