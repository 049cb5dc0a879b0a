"""The student: a small speech encoder plus one prediction head per layer the target returns.

Read top to bottom: front end (log-mel + convs, or a wav2vec2-style waveform CNN) -> convolutional
positional encoding -> N transformer layers -> heads. Each head reads a learned softmax-weighted sum
of all student layers (so a head copying a shallow target layer can use shallow features) and emits
``ratio`` frames of the target's width per student frame, which adapts to whatever frame rate the
target answered at. Head outputs are predicted in standardised units and mapped back with the
per-dimension mean/std of the paid responses, so predictions are in the target's own units.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from speechmimic import conv_as_matmul
from speechmimic.audio import SAMPLE_RATE
from speechmimic.dsp import N_FFT, log_mel, mel_filterbank
from speechmimic.errors import InputError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# Long clips are encoded in windows of CHUNK_SECONDS, each with CHUNK_CONTEXT_SECONDS of context
# either side; CHUNK_TOLERANCE bounds the mean relative error of frames away from joins (see infer).
CHUNK_SECONDS = 30.0
CHUNK_CONTEXT_SECONDS = 4.0
CHUNK_TOLERANCE = 0.05

# wav2vec2 / DistilHuBERT feature extractor: (channels, kernel, stride) per layer, 320x stride.
W2V2_CONV = [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2


@dataclass
class HeadSpec:
    """A target layer as seen through the API: its name, width and frame rate (inferred)."""

    name: str
    dim: int
    rate: float


@dataclass
class StudentConfig:
    frontend: str = "fbank"  # "fbank": log-mel + 2 convs; "conv": wav2vec2-style waveform CNN
    n_mels: int = 80
    frontend_stride: int = 2  # fbank only: 100 Hz mel frames -> 50 Hz
    dim: int = 256
    layers: int = 3
    heads: int = 4
    ffn: int = 1024
    dropout: float = 0.0
    pos_kernel: int = 31
    conv_dim: int = 512  # "conv" only: channels of the waveform CNN
    norm_first: bool = True  # pre-norm transformer layers; False: post-norm (HuBERT/wav2vec2 base)
    input_norm: bool = False  # a layer norm after the positional encoding (HuBERT base's encoder)
    pos_groups: int = 16  # groups of the positional convolution (1 when they do not divide dim)
    targets: list[HeadSpec] = field(default_factory=list)

    @property
    def hop(self) -> int:
        """Samples per student frame."""
        if self.frontend == "fbank":
            return 160 * self.frontend_stride
        return math.prod(s for _, _, s in W2V2_CONV)

    @property
    def frame_rate(self) -> float:
        return SAMPLE_RATE / self.hop

    @property
    def min_samples(self) -> int:
        if self.frontend == "fbank":
            return 400
        rf = 1
        for _, k, s in reversed(W2V2_CONV):
            rf = (rf - 1) * s + k
        return rf

    def num_frames(self, num_samples: torch.Tensor | int) -> torch.Tensor | int:
        """Student frames for a clip of ``num_samples`` samples (one formula, used everywhere)."""
        if self.frontend == "fbank":
            mel = num_samples // 160 + 1
            return (mel - 1) // self.frontend_stride + 1
        n = num_samples
        for _, k, s in W2V2_CONV:
            n = (n - k) // s + 1
        return n

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> StudentConfig:
        d = dict(d)
        d["targets"] = [HeadSpec(**h) for h in d.get("targets", [])]
        return cls(**d)


PRESETS: dict[str, StudentConfig] = {
    # DistilHuBERT's size: waveform CNN, 2 transformer layers, 768-d, FFN 3072, 12 heads.
    "distilhubert": StudentConfig(
        frontend="conv", dim=768, layers=2, heads=12, ffn=3072, dropout=0.1, pos_kernel=127
    ),
    # A CPU-sized student (~3 M parameters): trains at ~15x real time on 2 cores.
    "small": StudentConfig(frontend="fbank", dim=256, layers=3, heads=4, ffn=1024),
    # The same parameters spent on width or on depth (FitHuBERT: width serves speaker tasks, depth content).
    "small-wide": StudentConfig(frontend="fbank", dim=304, layers=2, heads=4, ffn=1216),
    "small-deep": StudentConfig(frontend="fbank", dim=192, layers=6, heads=4, ffn=768),
    "tiny": StudentConfig(frontend="fbank", dim=64, layers=1, heads=2, ffn=128),
}
PRESET_HELP = (
    "student size: 'small' (~3 M params, CPU; 'small-wide' 2 x 304-d and 'small-deep' 6 x 192-d spend "
    "them on width or depth), 'distilhubert' (2 x 768-d, 23 M), 'tiny' (tests)"
)


class FbankFrontend(nn.Module):
    """Log-mel (25 ms / 10 ms) followed by two 1-D convolutions, the second strided."""

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)
        self.register_buffer("fbank", mel_filterbank(cfg.n_mels), persistent=False)
        self.conv1 = nn.Conv1d(cfg.n_mels, cfg.dim, 5, padding=2)
        self.conv2 = nn.Conv1d(cfg.dim, cfg.dim, 3, stride=cfg.frontend_stride, padding=1)
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:  # (B, N) -> (B, T, D)
        return self.from_log_mel(log_mel(wav, self.window, self.fbank))

    def from_log_mel(self, x: torch.Tensor) -> torch.Tensor:  # (B, T_mel, n_mels) -> (B, T, D)
        x = F.gelu(self.conv1(x.transpose(1, 2)))
        x = F.gelu(self.conv2(x))
        return self.norm(x.transpose(1, 2))


class ConvFrontend(nn.Module):
    """wav2vec2-style waveform CNN (group norm on the first layer), projected to the model width."""

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        layers, c_in = [], 1
        for i, (_, k, s) in enumerate(W2V2_CONV):
            c = cfg.conv_dim
            layers += [nn.Conv1d(c_in, c, k, stride=s, bias=False)]
            if i == 0:
                layers += [nn.GroupNorm(c, c)]
            layers += [nn.GELU()]
            c_in = c
        self.cnn = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(c_in)
        self.proj = nn.Linear(c_in, cfg.dim)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        if conv_as_matmul.applies(self.cnn, wav):
            x = conv_as_matmul.waveform_cnn(self.cnn, wav)
        else:
            x = self.cnn(wav.unsqueeze(1)).transpose(1, 2)
        return self.proj(self.norm(x))


class Head(nn.Module):
    """Predicts one target layer: weighted sum of student layers -> ``ratio`` frames per student frame."""

    def __init__(self, spec: HeadSpec, dim: int, n_states: int, student_rate: float):
        super().__init__()
        self.spec = spec
        self.ratio = max(1, round(spec.rate / student_rate))
        self.layer_logits = nn.Parameter(torch.zeros(n_states))
        self.proj = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, self.ratio * spec.dim))
        self.register_buffer("mean", torch.zeros(spec.dim))
        self.register_buffer("std", torch.ones(spec.dim))

    def forward(self, states: list[torch.Tensor]) -> torch.Tensor:
        """Standardised predictions, (B, T_student * ratio, D)."""
        w = torch.softmax(self.layer_logits, 0)
        x = sum(wi * s for wi, s in zip(w, states, strict=True))
        y = self.proj(x)
        b, t, _ = y.shape
        return y.reshape(b, t * self.ratio, self.spec.dim)

    def set_stats(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Standardise with the per-dimension mean/std of the answers; a dimension that barely varies
        gets a floor (a thousandth of the mean std), so it is not blown up."""
        std = np.maximum(std, 1e-3 * float(std.mean()) + 1e-8)
        self.mean.copy_(torch.from_numpy(np.asarray(mean)).float())
        self.std.copy_(torch.from_numpy(np.asarray(std)).float())

    def denormalise(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.std + self.mean


class Student(nn.Module):
    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.cfg = cfg
        self.frontend = FbankFrontend(cfg) if cfg.frontend == "fbank" else ConvFrontend(cfg)
        self.pos_conv = nn.Conv1d(
            cfg.dim,
            cfg.dim,
            cfg.pos_kernel,
            padding=cfg.pos_kernel // 2,
            groups=cfg.pos_groups if cfg.dim % cfg.pos_groups == 0 else 1,
        )
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                cfg.dim,
                cfg.heads,
                cfg.ffn,
                cfg.dropout,
                activation="gelu",
                batch_first=True,
                norm_first=cfg.norm_first,
            )
            for _ in range(cfg.layers)
        )
        self.final_norm = nn.LayerNorm(cfg.dim)
        self.input_norm = nn.LayerNorm(cfg.dim) if cfg.input_norm else None
        # Stands in for masked front-end frames in stage-1 masked prediction (HuBERT). Zeros, not random:
        # building a student draws the same random numbers as before this parameter existed.
        self.mask_emb = nn.Parameter(torch.zeros(cfg.dim))
        self.heads = nn.ModuleDict(
            {h.name: Head(h, cfg.dim, cfg.layers + 1, cfg.frame_rate) for h in cfg.targets}
        )

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def encode(
        self, wav: torch.Tensor, lengths: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Student hidden states (front end + each layer), each (B, T, D), and a (B, T) validity mask.

        ``mask`` (B, T) bool: front-end frames replaced by ``mask_emb`` before the positional conv.
        """
        x = self.frontend(wav)
        if mask is not None:
            x = torch.where(mask[..., None], self.mask_emb.to(x.dtype), x)
        b, t, _ = x.shape
        if lengths is None:
            lengths = torch.full((b,), wav.shape[1], device=wav.device)
        n = torch.clamp(self.cfg.num_frames(lengths), max=t)
        valid = torch.arange(t, device=wav.device)[None, :] < n[:, None]
        x = x * valid[..., None]
        pos = self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        x = x + F.gelu(pos[:, :t])  # an even kernel gives one frame more: drop it (wav2vec 2.0's SamePad)
        if self.input_norm is not None:
            x = self.input_norm(x)
        states = [x]
        for i, block in enumerate(self.blocks):
            x = block(x, src_key_padding_mask=~valid)
            # pre-norm layers leave the residual stream unnormalised: the last state is normalised
            last = i == len(self.blocks) - 1 and self.cfg.norm_first
            states.append(self.final_norm(x) if last else x)
        return states, valid

    def forward(
        self, wav: torch.Tensor, lengths: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ):
        """Returns (student states, validity mask, {head: standardised predictions})."""
        states, valid = self.encode(wav, lengths, mask)
        return states, valid, {name: head(states) for name, head in self.heads.items()}

    # -- checkpoints: safetensors weights + a JSON config ----------------------------------------------
    def save(self, directory: str | Path, extra: dict | None = None) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / (WEIGHTS_NAME + ".tmp")
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, tmp)
        tmp.replace(directory / WEIGHTS_NAME)
        config = {"speechmimic": "student", "student": self.cfg.to_dict(), **(extra or {})}
        (directory / (CONFIG_NAME + ".tmp")).write_text(json.dumps(config, indent=2))
        (directory / (CONFIG_NAME + ".tmp")).replace(directory / CONFIG_NAME)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> tuple[Student, dict]:
        directory = Path(directory)
        config = json.loads((directory / CONFIG_NAME).read_text())
        if config.get("speechmimic") != "student":
            raise InputError(f"{directory} is not a speechmimic student checkpoint")
        model = cls(StudentConfig.from_dict(config["student"]))
        missing, unexpected = model.load_state_dict(load_file(directory / WEIGHTS_NAME), strict=False)
        # Checkpoints older than ``mask_emb`` lack only that key; anything else is a real mismatch.
        if unexpected or set(missing) - {"mask_emb"}:
            raise RuntimeError(
                f"{directory}: weights do not match the config: missing {missing}, unexpected {unexpected}"
            )
        return model.eval(), config


def build_student(preset: str = "small", targets: list[HeadSpec] | None = None, **overrides) -> Student:
    """A student from a preset name (``small``, ``distilhubert``, ``tiny``) and field overrides."""
    if preset not in PRESETS:
        raise InputError(f"unknown student preset {preset!r}; choose from {sorted(PRESETS)}")
    cfg = StudentConfig.from_dict({**PRESETS[preset].to_dict(), **overrides})
    cfg.targets = list(targets or [])
    return Student(cfg)


def align(pred: torch.Tensor, n_pred: int, n_target: int) -> torch.Tensor:
    """Map a clip's predicted frames (T, D) onto the target's ``n_target`` frames.

    When the head's rate matches the target's, the sequences differ by edge frames only: crop, or
    repeat the last frame. Otherwise the rates differ by a non-integer factor: interpolate linearly.
    """
    pred = pred[:n_pred]
    if abs(n_pred - n_target) <= max(2, 0.02 * n_target):
        if n_pred >= n_target:
            return pred[:n_target]
        return torch.cat([pred, pred[-1:].expand(n_target - n_pred, -1)])
    return F.interpolate(pred.T[None], size=n_target, mode="linear", align_corners=False)[0].T


def _encode_chunked(
    student: Student, wav: torch.Tensor, chunk_seconds: float
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """States (T, D) and standardised head outputs (T * ratio, D) of one clip, computed on windows of
    ``chunk_seconds``: each window keeps its middle frames and gives :data:`CHUNK_CONTEXT_SECONDS`
    of audio on either side as context only. The front end and the positional convolution see
    less than that context, so they match the whole clip exactly; only attention, which no longer
    reaches beyond the window, differs."""
    hop = student.cfg.hop
    n = int(student.cfg.num_frames(wav.shape[-1]))
    context = round(CHUNK_CONTEXT_SECONDS * SAMPLE_RATE / hop)
    core = int(chunk_seconds * SAMPLE_RATE) // hop - 2 * context
    if core < 1:
        raise InputError(
            f"chunk_seconds {chunk_seconds:g} leaves no frame to keep: it must exceed twice the "
            f"{CHUNK_CONTEXT_SECONDS:g} s of context each window gives either side"
        )
    states: list[list[torch.Tensor]] = []
    preds: dict[str, list[torch.Tensor]] = {name: [] for name in student.heads}
    for first in range(0, n, core):
        lo, hi = max(0, first - context), min(n, first + core + context)
        # One hop more than the window's frames: the last frame's analysis window reaches past it.
        seg_states, _, seg_preds = student(wav[None, lo * hop : (hi + 1) * hop])
        keep = slice(first - lo, min(first + core, n) - lo)
        states.append([s[0, keep] for s in seg_states])
        for name, head in student.heads.items():
            r = head.ratio
            preds[name].append(seg_preds[name][0, keep.start * r : keep.stop * r])
    return [torch.cat(parts) for parts in zip(*states, strict=True)], {
        k: torch.cat(v) for k, v in preds.items()
    }


def infer(
    student: Student,
    wav: torch.Tensor,
    target_frames: dict[str, int] | None = None,
    chunk_seconds: float | None = CHUNK_SECONDS,
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """One clip through the student: its states (T, D) and its prediction of each target layer.

    Predictions are in the target's units, (T_target, D). ``target_frames`` gives the target's frame
    count per layer when known; otherwise the count implied by the head's inferred rate is used.

    A clip longer than ``chunk_seconds`` is encoded in overlapping windows of that length and the
    windows' middles stitched (see :func:`_encode_chunked`), so memory stays bounded whatever the
    clip's length (attention over a whole clip grows with the square of its length: a 5-minute clip
    took 7.6 GB). Attention is global, so no window reproduces the whole clip exactly: frames more
    than ``CHUNK_CONTEXT_SECONDS / 2`` from a join differ from whole-clip frames by a mean relative
    L2 error under ``CHUNK_TOLERANCE`` (0.004-0.04 measured on LibriSpeech); the front end's frames
    are equal. A clip no longer than ``chunk_seconds`` is encoded whole, exactly as before; ``None``:
    every clip whole. Gradients flow where they are enabled (fine-tuning an upstream); ``predict``
    runs without them.
    """
    n_student = int(student.cfg.num_frames(wav.shape[-1]))
    if chunk_seconds is None or wav.shape[-1] <= chunk_seconds * SAMPLE_RATE:
        states, _, batch_preds = student(wav[None])
        states, preds = [s[0] for s in states], {name: p[0] for name, p in batch_preds.items()}
    else:
        states, preds = _encode_chunked(student, wav, chunk_seconds)
    out = {}
    for name, head in student.heads.items():
        n_target = (target_frames or {}).get(name) or max(
            1, round(wav.shape[-1] / SAMPLE_RATE * head.spec.rate)
        )
        out[name] = head.denormalise(align(preds[name], n_student * head.ratio, n_target))
    return states, out


@torch.no_grad()
def predict(
    student: Student,
    wav: torch.Tensor,
    target_frames: dict[str, int] | None = None,
    chunk_seconds: float | None = CHUNK_SECONDS,
) -> dict[str, torch.Tensor]:
    """The student's prediction of each target layer for one clip (see :func:`infer`)."""
    return infer(student, wav, target_frames, chunk_seconds)[1]
