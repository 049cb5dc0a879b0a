"""Verification of the answer watermark (:mod:`speechmimic.defences.mark`): does a suspect lean
toward the owner's secret key when a clip carries the secret band?

Each verification clip is asked as it is and with band-limited noise in the secret band
(:func:`~speechmimic.defences.mark.trigger`); the suspect's **reaction** is the change of its
time-mean answer, in the original's standardised coordinates. With a ``reference`` (the unmarked
original, which the owner holds) its reaction is subtracted first, so what is left of a copy is
what it learned beyond the original's own behaviour. The statistic is the mean over clips of the
cosine between the (unit) reaction and the key.

The p-value needs no null models: under the null hypothesis that the suspect was made without the
key (an independent model, the unmarked original, anything stolen from it), the key is a uniform
random direction with respect to the mean reaction ``m``, so the statistic divided by ``|m|`` is
distributed as one coordinate ``u`` of a uniform unit vector in ``D`` dimensions, for which
``(u + 1) / 2 ~ Beta((D - 1) / 2, (D - 1) / 2)``. That tail is the p-value.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from speechmimic.defences.mark import MarkSecret, trigger
from speechmimic.proof.watermark import ALPHA, layer_indices


@torch.no_grad()
def reactions(upstream: nn.Module, secret: MarkSecret, wavs: list[np.ndarray], progress: bool = False):
    """(N, D): per clip, the standardised change of the suspect's time-mean answer (the secret's
    layers side by side) when the trigger is mixed in."""
    where = layer_indices(upstream, secret.layers)

    def pooled(wav: np.ndarray) -> np.ndarray:
        states = upstream([torch.from_numpy(np.asarray(wav, np.float32))])["hidden_states"]
        return np.concatenate([states[i][0].float().mean(0).numpy() for i in where])

    rows = []
    for i, wav in enumerate(tqdm(wavs, desc="verify", unit="clip", disable=not progress)):
        rows.append((pooled(trigger(wav, secret, seed=i)) - pooled(wav)) / secret.std)
    return np.stack(rows)


def p_value(d: np.ndarray, key: np.ndarray) -> tuple[float, float, float]:
    """``(statistic, z, p)`` of reactions ``d`` (N, D) against ``key``: the mean cosine of each unit
    reaction with the key, it in null standard deviations, and its exact one-sided p-value for a key
    drawn uniformly on the sphere independently of ``d``."""
    from scipy.stats import beta  # here, not at the top: scipy.stats is 100 MB for every command

    u = d / (np.linalg.norm(d, axis=1, keepdims=True) + 1e-12)
    m = u.mean(0)
    stat = float(m @ key)
    dims = len(key)
    scaled = stat / (float(np.linalg.norm(m)) + 1e-12)
    p = float(beta.sf((scaled + 1) / 2, (dims - 1) / 2, (dims - 1) / 2))
    return stat, scaled * float(np.sqrt(dims)), p


def verify(
    upstream: nn.Module,
    secret: MarkSecret,
    wavs: list[np.ndarray],
    reference: nn.Module | None = None,
    alpha: float = ALPHA,
    progress: bool = False,
) -> dict:
    """The mean cosine of the suspect's reactions (less the ``reference``'s) to the key, its exact
    p-value under the null of a model made without the key, and the verdict at ``alpha``."""
    layer_indices(upstream, secret.layers)  # a suspect without the layers fails before any query
    d = reactions(upstream, secret, wavs, progress)
    if reference is not None:
        d = d - reactions(reference, secret, wavs, progress)
    stat, z, p = p_value(d, secret.key)
    return {
        "mean_cosine": round(stat, 4),
        "z": round(z, 2),  # the statistic in null standard deviations
        "clips": len(wavs),
        "reference": reference is not None,
        "p_value": p,
        "verdict": "watermark found" if p < alpha else "no watermark",
    }
