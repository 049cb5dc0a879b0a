"""Spectral features shared by the student's front end and the learning-free baselines.

25 ms Hann windows every 10 ms at 16 kHz, centred (a clip of N samples gives ``N // 160 + 1``
frames), HTK-style mel filters, log compressed as ``(log(mel + 1e-6) + 6) / 4``: roughly zero-mean and
unit-scale for speech at usual levels, the same fixed map for every clip. The pad mode of the
centred STFT is a parameter because the two users differ (the student reflects, the baselines pad
with zeros) and changing either would change its outputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from speechmimic.audio import SAMPLE_RATE

N_FFT = 400  # 25 ms at 16 kHz
HOP = 160  # 10 ms
LOG_FLOOR = 1e-6  # silence does not dominate the log scale


def mel_filterbank(n_mels: int, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """HTK-style triangular mel filters, (n_fft // 2 + 1, n_mels)."""

    def hz_to_mel(f):
        return 2595.0 * torch.log10(1.0 + f / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10 ** (m / 2595.0) - 1.0)

    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(
        torch.linspace(hz_to_mel(torch.tensor(20.0)), hz_to_mel(torch.tensor(sample_rate / 2)), n_mels + 2)
    )
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    up = (freqs[:, None] - lower) / (centre - lower)
    down = (upper - freqs[:, None]) / (upper - centre)
    return torch.clamp(torch.minimum(up, down), min=0.0)


def log_mel(
    wav: torch.Tensor, window: torch.Tensor, fbank: torch.Tensor, pad_mode: str = "reflect"
) -> torch.Tensor:
    """Log-mel energies of ``(..., N)`` waveforms -> ``(..., N // 160 + 1, n_mels)``."""
    spec = torch.stft(wav, N_FFT, HOP, window=window, center=True, pad_mode=pad_mode, return_complex=True)
    return (torch.log(spec.abs().pow(2).transpose(-1, -2) @ fbank + LOG_FLOOR) + 6.0) / 4.0


def dft_basis(window: torch.Tensor) -> torch.Tensor:
    """The windowed real DFT as convolution kernels, (2 (n_fft // 2 + 1), 1, n_fft): cosines, then sines."""
    n_fft = window.shape[0]
    n = torch.arange(n_fft, dtype=torch.float64)
    k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)
    angle = 2 * math.pi * k[:, None] * n[None, :] / n_fft
    basis = torch.cat([torch.cos(angle), -torch.sin(angle)]) * window.double()
    return basis.float()[:, None, :]


def log_mel_dft(wav: torch.Tensor, basis: torch.Tensor, fbank: torch.Tensor) -> torch.Tensor:
    """:func:`log_mel` (reflect-padded) of ``(B, N)`` waveforms as a strided convolution with
    :func:`dft_basis`: equal to float32 rounding, and it exports to ONNX as a convolution, where
    ONNX Runtime's STFT loses precision with the clip's length (1.6e-2 on a 12 s clip)."""
    n_fft = basis.shape[-1]
    x = F.pad(wav[:, None], (n_fft // 2, n_fft // 2), mode="reflect")
    re, im = F.conv1d(x, basis, stride=HOP).chunk(2, dim=1)
    return (torch.log((re * re + im * im).transpose(1, 2) @ fbank + LOG_FLOOR) + 6.0) / 4.0


def dct_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """Orthonormal DCT-II as a (n_in, n_out) matrix: ``x @ dct_matrix(n, k)`` keeps k coefficients."""
    n = torch.arange(n_in, dtype=torch.float64)
    k = torch.arange(n_out, dtype=torch.float64)
    m = torch.cos(math.pi / n_in * (n[:, None] + 0.5) * k[None, :]) * math.sqrt(2.0 / n_in)
    m[:, 0] /= math.sqrt(2.0)
    return m.float()


def deltas(x: torch.Tensor, width: int = 2) -> torch.Tensor:
    """HTK regression deltas over time of (T, D) features, edges padded by repetition."""
    padded = F.pad(x.T[None], (width, width), mode="replicate")[0].T
    t = x.shape[0]
    ks = range(1, width + 1)
    num = sum(k * (padded[width + k : width + k + t] - padded[width - k : width - k + t]) for k in ks)
    return num / (2 * sum(k * k for k in ks))


def cmvn(x: torch.Tensor) -> torch.Tensor:
    """Per-utterance mean and variance normalisation of (T, D); a one-frame clip is only centred."""
    centred = x - x.mean(0, keepdim=True)
    if x.shape[0] < 2:
        return centred
    return centred / x.std(0, keepdim=True).clamp_min(1e-5)
