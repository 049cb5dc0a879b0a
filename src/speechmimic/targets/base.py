"""The one contract every target backend honours, and nothing the attack may see beyond it."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

SAMPLE_RATE = 16_000


@runtime_checkable
class Target(Protocol):
    """A black-box speech encoder behind an embedding API.

    ``__call__`` takes a batch of 16 kHz mono float32 waveforms and returns, for each clip, a dict
    ``{layer_name: frames (T, D) float32}`` with one entry per layer the API returns. ``frame_rate``
    is the rate of those frames in Hz. ``spec`` is the string that rebuilds the target with
    :func:`speechmimic.targets.load_target`. ``padding`` names the batching policy ("per_clip" or
    "bucket"): padding changes the outputs of transformer encoders, so it is recorded with every
    paid query. ``min_samples`` is the shortest clip the target accepts (its receptive field).

    The attack code reads only the returned arrays and these attributes; never weights, configs
    or layer counts of the model behind the API.
    """

    spec: str
    frame_rate: float
    layers: list[str]
    padding: str
    min_samples: int

    def __call__(self, wavs: list[np.ndarray]) -> list[dict[str, np.ndarray]]: ...


def as_clip(wav: np.ndarray, min_samples: int) -> np.ndarray:
    """A waveform as the float32 1-D array a target accepts; ValueError if it is not one."""
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise ValueError(f"expected a mono 1-D waveform, got shape {wav.shape}")
    if len(wav) < min_samples:
        raise ValueError(
            f"clip of {len(wav)} samples is shorter than the model's receptive field ({min_samples} samples)"
        )
    return wav
