"""Stage 1: HuBERT-style masked prediction on unlabelled audio, no query spent.

Per iteration: fit k-means units (:mod:`speechmimic.units`; iteration 1 on MFCCs, iteration 2 on a
layer of the iteration-1 student), label every student frame, then train a fresh student: spans of
front-end frames are replaced by the learned ``mask_emb`` (each frame starts a span of ``mask_length``
frames at 50 Hz with probability ``mask_prob``), the last layer is projected to ``codebook_dim``, and
cosine similarity to learned unit embeddings over a temperature gives the logits; cross-entropy on
masked frames only. The student goes to ``out_dir/iterN`` (``Student.save``, no heads) with the unit
head and k-means centroids in ``units.safetensors`` beside it, which :func:`score_clips` needs.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from speechmimic import distributed
from speechmimic.audio import SAMPLE_RATE
from speechmimic.config import option
from speechmimic.corpus import Clip, warn_unusable
from speechmimic.readahead import ReadAhead
from speechmimic.student import Student, StudentConfig, build_student
from speechmimic.trainer import STATE_NAME, TrainConfig, crop_start, record_of, seed_all, train_loop
from speechmimic.units import MIN_SAMPLES, MFCCSource, StudentSource, Units, fit_units, source_from_dict

UNITS_NAME = "units.safetensors"


@dataclass
class PretrainConfig(TrainConfig):
    steps: int = option(2000, "optimiser steps per iteration")
    warmup: int = option(200, "linear warm-up steps")
    mask_prob: float = option(0.08, "chance that a frame starts a masked span (HuBERT)")
    mask_length: int = option(10, "span length in frames at 50 Hz, scaled to the student's rate")
    k: int = option(100, "k-means clusters (units)")
    iterations: int = option(
        1, "1: MFCC units; 2: then units of a layer of the first student's own features", choices=(1, 2)
    )
    layer: int | None = option(
        None, "iteration 2: student state clustered (0 = front end, i = after block i; default: middle)"
    )
    codebook_dim: int = option(256, "width of the projected frames and unit embeddings")
    temperature: float = option(0.1, "cosine-logit temperature")
    kmeans_frames: int = option(200_000, "k-means is fitted on a seeded sample of about this many frames")


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
    frame j of the crop is frame ``m + j`` of the clip (same centre, same label)."""
    hop = student_cfg.hop
    crop = int(crop_seconds * SAMPLE_RATE) // hop * hop
    wavs, labs = [], []
    for wav, lab in zip(waves, labels, strict=True):
        m = 0
        if len(wav) > crop:
            m = crop_start(len(wav), crop, hop, rng)
            wav = wav[m * hop : m * hop + crop]
        n = int(student_cfg.num_frames(len(wav)))
        if m + n > len(lab):
            raise AssertionError(f"labels ({len(lab)}) shorter than frames ({m} + {n})")
        wavs.append(torch.from_numpy(wav))
        labs.append(torch.from_numpy(lab[m : m + n]))
    lengths = torch.tensor([len(w) for w in wavs])
    batch = torch.zeros(len(wavs), int(lengths.max()))
    target = torch.full((len(wavs), int(student_cfg.num_frames(batch.shape[1]))), -100, dtype=torch.long)
    for i, (w, lab) in enumerate(zip(wavs, labs, strict=True)):
        batch[i, : len(w)] = w
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


def pretrain(
    clips: list[Clip],
    out_dir: str | Path,
    cfg: PretrainConfig,
    preset: str = "small",
    progress: bool = True,
    resume: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> Student:
    """Run ``cfg.iterations`` iterations of masked prediction on ``clips``; returns the last student.

    Units and labels are cached in ``out_dir/units``; an iteration whose checkpoint already holds the
    same config and units is loaded, not retrained; an interrupted one resumes from its train_state.
    """
    out_dir = Path(out_dir)
    source = MFCCSource()
    student = None
    for it in range(1, cfg.iterations + 1):
        it_dir = out_dir / f"iter{it}"
        if it == 2:
            layer = cfg.layer if cfg.layer is not None else (student.cfg.layers + 1) // 2
            source = StudentSource(student, layer, cfg.device, out_dir / "iter1")
        with distributed.main_first():  # rank 0 fits and caches the units; the others read them
            units = fit_units(clips, source, cfg.k, cfg.seed, out_dir / "units", cfg.kmeans_frames, progress)
        student = _train_iteration(clips, units, it_dir, cfg, preset, it, progress, resume, on_step)
    return student


def _train_iteration(
    clips: list[Clip],
    units: Units,
    out_dir: Path,
    cfg: PretrainConfig,
    preset: str,
    iteration: int,
    progress: bool,
    resume: bool,
    on_step: Callable[[int, float], None] | None,
) -> Student:
    # What determines the result; device, checkpointing, the number of iterations and the iteration-2
    # layer (already in the units' fingerprint) do not, and changing them must not retrain this one.
    record = record_of(cfg, "iterations", "layer")
    record.update(preset=preset, iteration=iteration, units=units.fingerprint())
    device = distributed.device_for(cfg.device)
    done = out_dir / "config.json"
    if done.exists() and (out_dir / UNITS_NAME).exists():
        config = json.loads(done.read_text())
        if config.get("pretrain") == record:
            return Student.load(out_dir)[0].to(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_all(cfg.seed)
    student = build_student(preset)
    model = MaskedPredictor(student, UnitHead(student.cfg.dim, units.k, cfg.codebook_dim, cfg.temperature))
    with distributed.main_first():
        labels = units.student_labels(clips, student.cfg, out_dir.parent / "units", progress)
    clips = [c for c in clips if c.id in labels]  # a clip that does not decode is skipped, not fatal
    warn_unusable(f"pretrain iter{iteration}", units.unusable)
    model.to(device).train()
    waves = ReadAhead(lambda i: clips[i].load(min_samples=MIN_SAMPLES))
    span = span_frames(cfg.mask_length, student.cfg)

    def step(model: nn.Module, batch_idx: list[int], rng: random.Random):
        wav, lengths, target = collate_labelled(
            [waves[i] for i in batch_idx],
            [labels[clips[i].id] for i in batch_idx],
            student.cfg,
            cfg.crop_seconds,
            rng,
        )
        frames = [int(student.cfg.num_frames(int(n))) for n in lengths]
        mask = span_mask(
            frames, target.shape[1], cfg.mask_prob, span, np.random.default_rng(rng.getrandbits(64))
        )
        # Every rank draws the whole batch's crops and masks; each runs the model on its rows.
        valid = torch.arange(target.shape[1])[None, :] < torch.tensor(frames)[:, None]
        count = int((mask & valid & (target >= 0)).sum())
        rows, weight = distributed.my_share(len(batch_idx))
        mask = mask[rows].to(device)
        logits, valid, _ = model(wav[rows].to(device), lengths[rows].to(device), mask)
        loss, correct, n_masked = masked_cross_entropy(logits, valid, target[rows].to(device), mask, count)
        return loss * weight, {"masked_acc": round(correct / max(1, n_masked), 4)}

    t0 = time.time()
    log = train_loop(
        model,
        cfg,
        [c.duration for c in clips],
        step,
        out_dir / STATE_NAME,
        record=record,
        resume=resume,
        desc=f"pretrain iter{iteration}",
        progress=progress,
        on_step=on_step,
        reader=waves,
    )
    model.eval()
    if distributed.is_main():  # one writer; the others wait until the checkpoint is on disk
        _save_units(out_dir, model.head, units)
        student.save(
            out_dir,
            extra={
                "pretrain": record,
                "units_source": units.source.describe(out_dir),
                "clips": len(clips),
                "unusable": units.unusable,
                "train_seconds": round(time.time() - t0, 1),
            },
        )
        (out_dir / "train_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
    distributed.barrier()
    return student


def _save_units(directory: Path, head: UnitHead, units: Units) -> None:
    tensors = {f"head.{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    tensors["centroids"] = torch.from_numpy(units.centroids)
    tmp = directory / (UNITS_NAME + ".tmp")
    save_file(tensors, tmp)
    tmp.replace(directory / UNITS_NAME)


def load_pretrained(directory: str | Path, device: str = "cpu") -> tuple[Student, UnitHead, Units]:
    """A stage-1 checkpoint: the student, its unit head and the units it was trained to predict."""
    directory = Path(directory)
    student, config = Student.load(directory)
    if "pretrain" not in config or not (directory / UNITS_NAME).exists():
        raise ValueError(f"{directory} is not a pretrained (stage-1) student: no unit head")
    rec = config["pretrain"]
    tensors = load_file(directory / UNITS_NAME)
    centroids = tensors.pop("centroids").numpy()
    head = UnitHead(student.cfg.dim, len(centroids), rec["codebook_dim"], rec["temperature"])
    head.load_state_dict({k.removeprefix("head."): v for k, v in tensors.items()})
    units = Units(source_from_dict(config["units_source"], directory, device), centroids)
    return student.to(device), head.to(device).eval(), units
