"""The pretrained GE2E speaker encoder shipped in the resemblyzer wheel, at frame level."""

from __future__ import annotations

import importlib.util
import os
from collections import defaultdict

import numpy as np
import torch
from torch import nn

from speechmimic.audio import SAMPLE_RATE
from speechmimic.errors import InputError
from speechmimic.targets.base import as_clip, parse_layers

N_FFT = 400  # 25 ms window, resemblyzer's hparams.mel_window_length
HOP = 160  # 10 ms step, hparams.mel_window_step
N_MELS = 40
HIDDEN = 256
N_LAYERS = 3
TARGET_DBFS = -30.0
_INT16_MAX = 2**15 - 1
# Equal-length clips are stacked into one LSTM batch, at most this many at a time.
_MAX_BATCH = 32
_LSTM_PARAMS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def weights_path() -> str:
    """Path of ``pretrained.pt`` inside the installed resemblyzer package, found without importing it
    (its import pulls in webrtcvad, librosa and a deprecated scipy module)."""
    spec = importlib.util.find_spec("resemblyzer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the resemblyzer package is not installed")
    return os.path.join(spec.submodule_search_locations[0], "pretrained.pt")


class ResemblyzerTarget:
    """Frame-level outputs of resemblyzer's ``VoiceEncoder`` (a 3-layer 256-unit LSTM over 40 mels).

    The three LSTM layers' output sequences are returned as ``lstm1``, ``lstm2``, ``lstm3``
    (256-d, 100 Hz, ``1 + len // 160`` frames); ``layers`` picks them 1-based (negative from the
    end, or ``all``), default the last only. The 3-layer LSTM is split into three single-layer
    LSTMs carrying the same weights so every layer's sequence is visible.

    Preprocessing is resemblyzer's: volume normalised to -30 dBFS (increase only), then its
    centred power mel spectrogram (n_fft 400, hop 160, 40 slaney mels), computed with
    ``torch.stft`` and librosa's filterbank. Resemblyzer's VAD silence trimming is skipped: it would
    drop audio and make frame counts depend on content rather than on length. A silent clip is left
    at zero instead of becoming NaN as resemblyzer's normalisation would make it.

    Only ``per_clip`` padding is offered; clips of equal length share an LSTM batch, which pads nothing
    (answers equal a lone run up to float32 rounding: a GEMM of another batch size may round the last
    bit differently).
    """

    frame_rate = SAMPLE_RATE / HOP
    min_samples = N_FFT
    padding = "per_clip"

    def __init__(
        self,
        layers: str | None = None,
        padding: str = "per_clip",
        device: str = "cpu",
        weights: str | None = None,
    ):
        import librosa

        if padding != "per_clip":
            raise InputError(f"resemblyzer supports only padding 'per_clip', got {padding!r}")
        self.device = torch.device(device)
        self._indices = parse_layers(layers, count=N_LAYERS, first=1, default=N_LAYERS)
        self.layers = [f"lstm{i}" for i in self._indices]
        self.spec = f"resemblyzer?layers={','.join(map(str, self._indices))}"
        if weights is not None:
            weights = os.path.abspath(weights)
            self.spec += f"&weights={weights}"

        checkpoint = torch.load(weights or weights_path(), map_location="cpu", weights_only=True)
        state = checkpoint["model_state"]
        self.lstms = nn.ModuleList()
        for layer in range(N_LAYERS):
            lstm = nn.LSTM(N_MELS if layer == 0 else HIDDEN, HIDDEN, 1, batch_first=True)
            lstm.load_state_dict({f"{name}_l0": state[f"lstm.{name}_l{layer}"] for name in _LSTM_PARAMS})
            self.lstms.append(lstm)
        self.lstms.eval().to(self.device)
        # Only the layers up to the deepest requested one need running.
        self._depth = max(self._indices)

        mel = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS)
        self._mel_basis = torch.from_numpy(mel).to(self.device)
        self._window = torch.hann_window(N_FFT, periodic=True, device=self.device)

    def mel(self, wavs: torch.Tensor) -> torch.Tensor:
        """Resemblyzer's ``wav_to_mel_spectrogram`` for a batch ``(B, N)`` -> ``(B, 1 + N // 160, 40)``."""
        spec = torch.stft(
            wavs,
            N_FFT,
            hop_length=HOP,
            window=self._window,
            center=True,
            pad_mode="constant",  # librosa >= 0.10's default
            return_complex=True,
        )
        return (self._mel_basis @ spec.abs().pow(2)).transpose(1, 2)

    def __call__(self, wavs: list[np.ndarray], keys: list[str] | None = None) -> list[dict[str, np.ndarray]]:
        clips = [self._prepare(wav) for wav in wavs]
        by_length: dict[int, list[int]] = defaultdict(list)
        for index, clip in enumerate(clips):
            by_length[len(clip)].append(index)
        results: list[dict[str, np.ndarray] | None] = [None] * len(clips)
        for group in by_length.values():
            for start in range(0, len(group), _MAX_BATCH):
                chunk = group[start : start + _MAX_BATCH]
                batch = torch.from_numpy(np.stack([clips[i] for i in chunk])).to(self.device)
                for index, frames in zip(chunk, self._forward(batch), strict=True):
                    results[index] = frames
        return results

    def _prepare(self, wav: np.ndarray) -> np.ndarray:
        wav = as_clip(wav, self.min_samples)
        return normalize_volume(wav)

    # -- fine-tuning (an owner watermarking their encoder) -----------------------------------------------
    @property
    def module(self) -> nn.Module:
        """The weights a fine-tune changes."""
        return self.lstms

    def encode(self, wavs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Differentiable answers ``{layer: (B, T, 256)}`` for equal-length raw clips ``(B, N)``: the
        same preprocessing as an API call (volume raised to -30 dBFS), with gradients."""
        rms = wavs.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-12)
        gain = (10 ** (TARGET_DBFS / 20) / rms).clamp_min(1.0)  # increase only, as normalize_volume
        hidden = self.mel(wavs * gain)
        outputs = {}
        for layer in range(1, self._depth + 1):
            hidden, _ = self.lstms[layer - 1](hidden)
            if layer in self._indices:
                outputs[f"lstm{layer}"] = hidden
        return outputs

    def save_weights(self, directory: str | os.PathLike) -> str:
        """Write the (fine-tuned) weights as resemblyzer's checkpoint layout; returns the spec that
        loads them with this target's layers."""
        os.makedirs(directory, exist_ok=True)
        state = {
            f"lstm.{name}_l{layer}": getattr(lstm, f"{name}_l0").detach().cpu().clone()
            for layer, lstm in enumerate(self.lstms)
            for name in _LSTM_PARAMS
        }
        # The linear projection is not among the frame-level answers; kept so the file stays complete.
        original = torch.load(weights_path(), map_location="cpu", weights_only=True)["model_state"]
        state.update({k: v for k, v in original.items() if not k.startswith("lstm.")})
        path = os.path.join(directory, "resemblyzer.pt")
        torch.save({"model_state": state}, path + ".tmp")
        os.replace(path + ".tmp", path)
        return f"resemblyzer?layers={','.join(map(str, self._indices))}&weights={os.path.abspath(path)}"

    def _forward(self, batch: torch.Tensor) -> list[dict[str, np.ndarray]]:
        with torch.inference_mode():
            hidden = self.mel(batch)
            outputs = {}
            for layer in range(1, self._depth + 1):
                hidden, _ = self.lstms[layer - 1](hidden)
                if layer in self._indices:
                    outputs[f"lstm{layer}"] = hidden.cpu().numpy()
        return [
            {name: np.ascontiguousarray(outputs[name][row]) for name in self.layers}
            for row in range(len(batch))
        ]


def normalize_volume(wav: np.ndarray) -> np.ndarray:
    """resemblyzer.audio.normalize_volume(wav, -30, increase_only=True), keeping silence at zero."""
    rms = np.sqrt(np.mean((wav * _INT16_MAX) ** 2))
    if rms == 0:
        return wav
    change = TARGET_DBFS - 20 * np.log10(rms / _INT16_MAX)
    if change < 0:
        return wav
    return (wav * (10 ** (change / 20))).astype(np.float32)
