"""Masked prediction of units: the pieces stage 1 trains with and stage 2's semi-supervised term
reuses (so that neither stage imports the other).

HuBERT's recipe: spans of a student's front-end frames are masked (:func:`span_mask`, spans of
:func:`span_frames`), the last layer is projected and compared by cosine to learned unit embeddings
(:class:`UnitHead`), and cross-entropy is taken on the masked, labelled frames only
(:func:`masked_cross_entropy`). :func:`collate_labelled` pads a batch of clips and their per-frame
units, cropping long clips at a frame boundary so every crop keeps its labels.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from speechmimic.audio import SAMPLE_RATE
from speechmimic.student import Student, StudentConfig
from speechmimic.trainer import crop_start


class UnitHead(nn.Module):
    """HuBERT's classifier: cosine between projected frames and learned unit embeddings / temperature."""

    def __init__(self, dim: int, k: int, codebook_dim: int, temperature: float):
        super().__init__()
        self.proj = nn.Linear(dim, codebook_dim)
        self.units = nn.Parameter(torch.randn(k, codebook_dim))
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(x), dim=-1) @ F.normalize(self.units, dim=-1).T / self.temperature


class MaskedPredictor(nn.Module):
    """Student + unit head, one module so optimiser and checkpoints see both."""

    def __init__(self, student: Student, head: UnitHead):
        super().__init__()
        self.student = student
        self.head = head

    def forward(self, wav, lengths, mask):
        states, valid = self.student.encode(wav, lengths, mask)
        return self.head(states[-1]), valid, states


def span_frames(mask_length: int, student_cfg: StudentConfig) -> int:
    """A span of ``mask_length`` frames at 50 Hz (HuBERT's rate), in the student's frames."""
    return max(1, round(mask_length * student_cfg.frame_rate / 50.0))


def span_mask(frames: list[int], t: int, prob: float, span: int, rng: np.random.Generator) -> torch.Tensor:
    """(B, t) bool: each valid frame starts a span of ``span`` frames with probability ``prob``; spans
    stop at the clip's end; every clip with frames gets at least one span."""
    mask = np.zeros((len(frames), t), dtype=bool)
    for b, n in enumerate(frames):
        if n <= 0:
            continue
        starts = np.flatnonzero(rng.random(n) < prob)
        if not len(starts):
            starts = rng.integers(0, n, size=1)
        for s in starts:
            mask[b, s : min(s + span, n)] = True
    return torch.from_numpy(mask)


def collate_labelled(waves, labels, student_cfg: StudentConfig, crop_seconds: float, rng: random.Random):
    """Pad waveforms and labels (-100 beyond a clip); crop long clips at a student-frame boundary, so
    frame j of the crop is frame ``m + j`` of the clip (same centre, same label). ``labels`` None:
    waveforms only (the target is all -100)."""
    hop = student_cfg.hop
    crop = int(crop_seconds * SAMPLE_RATE) // hop * hop
    wavs, labs = [], []
    for wav, lab in zip(waves, labels if labels is not None else [None] * len(waves), strict=True):
        m = 0
        if len(wav) > crop:
            m = crop_start(len(wav), crop, hop, rng)
            wav = wav[m * hop : m * hop + crop]
        wavs.append(torch.from_numpy(wav))
        if lab is None:
            continue
        n = int(student_cfg.num_frames(len(wav)))
        if m + n > len(lab):
            raise AssertionError(f"labels ({len(lab)}) shorter than frames ({m} + {n})")
        labs.append(torch.from_numpy(lab[m : m + n]))
    lengths = torch.tensor([len(w) for w in wavs])
    batch = torch.zeros(len(wavs), int(lengths.max()))
    target = torch.full((len(wavs), int(student_cfg.num_frames(batch.shape[1]))), -100, dtype=torch.long)
    for i, w in enumerate(wavs):
        batch[i, : len(w)] = w
    for i, lab in enumerate(labs):
        target[i, : len(lab)] = lab
    return batch, lengths, target


def masked_cross_entropy(logits, valid, target, mask, count: int | None = None):
    """Cross-entropy over the masked, labelled frames, summed over those of these rows and divided by
    ``count`` (default: their number; a rank's rows of a batch pass the batch's); also the number
    predicted right and the number scored."""
    sel = mask & valid & (target >= 0)
    n = int(sel.sum())
    loss = F.cross_entropy(logits[sel], target[sel], reduction="sum") / max(1, count or n)
    correct = (logits[sel].argmax(-1) == target[sel]).sum()
    return loss, int(correct), n
