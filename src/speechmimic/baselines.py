"""Upstreams with nothing learned: MFCC and log-mel filterbank features, for the bottom row of a probe table.

Both follow the upstream contract of :mod:`speechmimic.upstream`: ``forward(list[Tensor 16 kHz])``
returns ``{"hidden_states": [Tensor (B, T, D)]}`` (one state), ``downsample_rate`` (and s3prl's
``get_downsample_rates``) is 160 and ``hidden_state_names`` names the state. Frames are 25 ms Hann
windows every 10 ms, centred, so a clip of N samples gives ``N // 160 + 1`` frames.

Normalisation: by default a fixed affine map of the log-mel energies (the student front end's
``(log(mel + 1e-6) + 6) / 4``), the same for every clip. Per-utterance CMVN (``cmvn=True``, specs
``mfcc+cmvn`` / ``fbank+cmvn``) makes every clip's time mean exactly zero and its variance one, so an
utterance probe, which sees only the time mean (see :mod:`speechmimic.probe.features`), would be at
chance by construction; it suits frame-level (CTC) probes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from speechmimic import dsp


class _SpectralUpstream(nn.Module):
    downsample_rate = dsp.HOP

    def get_downsample_rates(self, key: str) -> int:
        """s3prl's contract: samples per frame of the features under ``key``."""
        if key != "hidden_states":
            raise KeyError(f"{key!r} is not among this upstream's features: hidden_states")
        return self.downsample_rate

    def __init__(self, n_mels: int, cmvn: bool):
        super().__init__()
        self.cmvn = cmvn
        self.register_buffer("window", torch.hann_window(dsp.N_FFT), persistent=False)
        self.register_buffer("fbank", dsp.mel_filterbank(n_mels), persistent=False)

    def log_mel(self, wav: torch.Tensor) -> torch.Tensor:  # (N,) -> (N // 160 + 1, n_mels)
        return dsp.log_mel(wav, self.window, self.fbank, pad_mode="constant")

    def features(self, log_mel: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, wavs: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        feats = [self.features(self.log_mel(w.to(self.window.device).float().reshape(-1))) for w in wavs]
        feats = [dsp.cmvn(f) for f in feats] if self.cmvn else feats
        t = max(f.shape[0] for f in feats)
        return {"hidden_states": [torch.stack([F.pad(f, (0, 0, 0, t - f.shape[0])) for f in feats])]}


class MFCCUpstream(_SpectralUpstream):
    """13 MFCCs (40 mel bands, log, DCT-II) with deltas and delta-deltas: 39-d at 100 Hz."""

    hidden_state_names = ["mfcc"]

    def __init__(self, n_mels: int = 40, n_ceps: int = 13, cmvn: bool = False):
        super().__init__(n_mels, cmvn)
        self.spec = "mfcc+cmvn" if cmvn else "mfcc"
        self.register_buffer("dct", dsp.dct_matrix(n_mels, n_ceps), persistent=False)

    def features(self, log_mel: torch.Tensor) -> torch.Tensor:
        c = log_mel @ self.dct
        d = dsp.deltas(c)
        return torch.cat([c, d, dsp.deltas(d)], dim=1)


class FbankUpstream(_SpectralUpstream):
    """80 log-mel filterbank energies at 100 Hz."""

    hidden_state_names = ["fbank"]

    def __init__(self, n_mels: int = 80, cmvn: bool = False):
        super().__init__(n_mels, cmvn)
        self.spec = "fbank+cmvn" if cmvn else "fbank"

    def features(self, log_mel: torch.Tensor) -> torch.Tensor:
        return log_mel


BASELINES = {
    "mfcc": MFCCUpstream,
    "fbank": FbankUpstream,
    "mfcc+cmvn": lambda: MFCCUpstream(cmvn=True),
    "fbank+cmvn": lambda: FbankUpstream(cmvn=True),
}
