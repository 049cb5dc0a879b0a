"""Stage 1: masked prediction on unlabelled audio, no query spent: HuBERT's, or data2vec's.

Per iteration: fit k-means units (:mod:`speechmimic.units`; iteration 1 on MFCCs, iteration 2 on a
layer of the iteration-1 student), label every student frame, then train a fresh student: spans of
front-end frames are replaced by the learned ``mask_emb`` (each frame starts a span of ``mask_length``
frames at 50 Hz with probability ``mask_prob``), the last layer is projected to ``codebook_dim``, and
cosine similarity to learned unit embeddings over a temperature gives the logits; cross-entropy on
masked frames only. The student goes to ``out_dir/iterN`` (``Student.save``, no heads) with the unit
head and k-means centroids in ``units.safetensors`` beside it, which :func:`score_clips` needs.

``objective="data2vec"`` (one iteration, no units) regresses instead, at the masked frames, the
average of an EMA teacher's top layers (each instance-normalised over time; the teacher reads the
clean, unmasked clip): targets that keep what the teacher keeps, speaker included, not one unit per
frame. ``mix_prob`` adds WavLM's utterance mixing to either: a clip gets a quieter segment of
another clip of its batch laid over it and must still predict its own targets.
"""

from __future__ import annotations

import copy
import json
import math
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
from speechmimic.config import option
from speechmimic.corpus import Clip, warn_unusable
from speechmimic.errors import InputError
from speechmimic.masked import (
    MaskedPredictor,
    UnitHead,
    collate_labelled,
    masked_cross_entropy,
    span_frames,
    span_mask,
)
from speechmimic.readahead import ReadAhead
from speechmimic.student import Student, build_student
from speechmimic.trainer import STATE_NAME, TrainConfig, record_of, save_trained, seed_all, train_loop
from speechmimic.units import MIN_SAMPLES, MFCCSource, StudentSource, Units, fit_units, source_from_dict

UNITS_NAME = "units.safetensors"
OBJECTIVES = ("hubert", "data2vec")
# Settings of one objective only: left out of the other's record, so that they do not retrain it.
DATA2VEC_ONLY = ("ema_start", "ema_end")
HUBERT_ONLY = ("k", "layer", "codebook_dim", "temperature", "kmeans_frames")


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
    objective: str = option(
        "hubert",
        "hubert: predict k-means units; data2vec: regress an EMA teacher's averaged top layers (1 iteration)",
        choices=OBJECTIVES,
    )
    ema_start: float = option(0.99, "data2vec: the teacher's EMA decay at the first step")
    ema_end: float = option(0.999, "data2vec: ... at the last (linear in between)")
    mix_prob: float = option(
        0.0,
        "chance that a clip gets a segment (<= half its length) of another clip of its batch mixed in "
        "at -5..5 dB, its targets unchanged (WavLM's utterance mixing: to tell the speakers apart)",
    )

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise InputError(f"objective {self.objective!r}: choose from {OBJECTIVES}")
        if self.objective == "data2vec" and self.iterations != 1:
            raise InputError("data2vec has no units to re-cluster: it runs one iteration")
        if not 0.0 <= self.mix_prob <= 1.0:
            raise InputError(f"mix_prob is a chance, in [0, 1], got {self.mix_prob}")
        if not 0.0 < self.ema_start <= self.ema_end < 1.0:
            raise InputError(
                f"EMA decays need 0 < ema_start <= ema_end < 1, got {self.ema_start}, {self.ema_end}"
            )


def instance_norm(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Each clip's frames normalised per dimension over its valid frames (data2vec's target norm)."""
    m = valid[..., None].to(x.dtype)
    n = m.sum(1, keepdim=True).clamp(min=1)
    mean = (x * m).sum(1, keepdim=True) / n
    var = ((x - mean).square() * m).sum(1, keepdim=True) / n
    return (x - mean) / torch.sqrt(var + 1e-5)


class Data2VecPredictor(nn.Module):
    """Student, regression head and EMA teacher, one module so that checkpoints hold the teacher."""

    def __init__(self, student: Student):
        super().__init__()
        self.student = student
        self.teacher = copy.deepcopy(student).requires_grad_(False)
        self.head = nn.Linear(student.cfg.dim, student.cfg.dim)
        self.top = math.ceil(2 * student.cfg.layers / 3)  # data2vec: the top 8 of 12
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # no dropout in the targets
        return self

    @torch.no_grad()
    def ema_update(self, decay: float) -> None:
        for t, s in zip(self.teacher.parameters(), self.student.parameters(), strict=True):
            t.lerp_(s.detach(), 1.0 - decay)
        self.updates += 1

    def forward(self, wav, clean, lengths, mask):
        states, valid = self.student.encode(wav, lengths, mask)
        with torch.no_grad():
            layers, _ = self.teacher.encode(clean, lengths)
            target = sum(instance_norm(x.float(), valid) for x in layers[-self.top :]) / self.top
        return self.head(states[-1]), target, valid


def mix_utterances(wav: torch.Tensor, lengths: torch.Tensor, prob: float, rng: random.Random) -> torch.Tensor:
    """WavLM's utterance mixing: with chance ``prob`` a clip gets a random segment (at most half its
    length) of another clip of the batch added at a random place, scaled so that the clip's energy
    over the segment's is 10^(r/10), r uniform in -5..5 dB. No number is drawn when ``prob`` is 0."""
    if not prob or len(wav) < 2:
        return wav
    out = wav.clone()
    for b in range(len(wav)):
        if rng.random() >= prob:
            continue
        j = rng.choice([i for i in range(len(wav)) if i != b])
        n_b, n_j = int(lengths[b]), int(lengths[j])
        seg = rng.randint(1, max(1, min(n_b // 2, n_j)))
        src, dst = rng.randrange(n_j - seg + 1), rng.randrange(n_b - seg + 1)
        piece = wav[j, src : src + seg]
        energy = lambda x: float(x.double().square().mean()) + 1e-10  # noqa: E731
        scale = math.sqrt(energy(wav[b, :n_b]) / (energy(piece) * 10 ** (rng.uniform(-5, 5) / 10)))
        out[b, dst : dst + seg] += scale * piece
    return out


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
    if cfg.objective == "data2vec":
        return _train_iteration(clips, None, out_dir / "iter1", cfg, preset, 1, progress, resume, on_step)
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
    units: Units | None,
    out_dir: Path,
    cfg: PretrainConfig,
    preset: str,
    iteration: int,
    progress: bool,
    resume: bool,
    on_step: Callable[[int, float], None] | None,
) -> Student:
    # What determines the result; device, checkpointing, the number of iterations, the iteration-2
    # layer (already in the units' fingerprint) and the other objective's settings do not, and
    # changing them must not retrain this one. (Nor does mixing while off: older records lack it.)
    other = DATA2VEC_ONLY if units is not None else HUBERT_ONLY
    record = record_of(cfg, "iterations", "layer", *other, *(() if cfg.mix_prob else ("mix_prob",)))
    if units is not None:
        record.pop("objective")  # HuBERT's records predate the choice
    record.update(preset=preset, iteration=iteration, units=units.fingerprint() if units else None)
    device = distributed.device_for(cfg.device)
    done = out_dir / "config.json"
    if done.exists() and (units is None or (out_dir / UNITS_NAME).exists()):
        config = json.loads(done.read_text())
        if config.get("pretrain") == record:
            return Student.load(out_dir)[0].to(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_all(cfg.seed)
    student = build_student(preset)
    if units is None:
        model = Data2VecPredictor(student)
        labels = None
    else:
        model = MaskedPredictor(
            student, UnitHead(student.cfg.dim, units.k, cfg.codebook_dim, cfg.temperature)
        )
        with distributed.main_first():
            labels = units.student_labels(clips, student.cfg, out_dir.parent / "units", progress)
        clips = [c for c in clips if c.id in labels]  # a clip that does not decode is skipped, not fatal
        warn_unusable(f"pretrain iter{iteration}", units.unusable)
    model.to(device).train()
    waves = ReadAhead(lambda i: clips[i].load(min_samples=MIN_SAMPLES))
    span = span_frames(cfg.mask_length, student.cfg)
    per_step = cfg.accumulate  # step functions per optimiser step: the EMA moves once per step

    def step(net: nn.Module, batch_idx: list[int], rng: random.Random):
        wav, lengths, target = collate_labelled(
            [waves[i] for i in batch_idx],
            [labels[clips[i].id] for i in batch_idx] if labels is not None else None,
            student.cfg,
            cfg.crop_seconds,
            rng,
        )
        mixed = mix_utterances(wav, lengths, cfg.mix_prob, rng)
        frames = [int(student.cfg.num_frames(int(n))) for n in lengths]
        mask = span_mask(
            frames, target.shape[1], cfg.mask_prob, span, np.random.default_rng(rng.getrandbits(64))
        )
        # Every rank draws the whole batch's crops and masks; each runs the model on its rows.
        valid = torch.arange(target.shape[1])[None, :] < torch.tensor(frames)[:, None]
        count = int((mask & valid & ((target >= 0) if labels is not None else True)).sum())
        rows, weight = distributed.my_share(len(batch_idx))
        lengths, mask = lengths[rows].to(device), mask[rows].to(device)
        if labels is None:
            if int(model.updates) % per_step == 0:
                done = int(model.updates) // per_step
                model.ema_update(cfg.ema_start + (cfg.ema_end - cfg.ema_start) * done / max(1, cfg.steps - 1))
            else:
                model.updates += 1
            pred, goal, ok = net(mixed[rows].to(device), wav[rows].to(device), lengths, mask)
            sel = mask & ok
            loss = F.mse_loss(pred[sel].float(), goal[sel], reduction="sum") / goal.shape[-1] / max(1, count)
            return loss * weight, {}
        logits, ok, _ = net(mixed[rows].to(device), lengths, mask)
        loss, correct, n_masked = masked_cross_entropy(logits, ok, target[rows].to(device), mask, count)
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
    if units is not None and distributed.is_main():  # one writer; save_trained waits for it
        _save_units(out_dir, model.head, units)
    extra = {
        "pretrain": record,
        "units_source": units.source.describe(out_dir) if units else None,
        "clips": len(clips),
        "unusable": units.unusable if units else {},
        "train_seconds": round(time.time() - t0, 1),
    }
    save_trained(student, out_dir, log, extra)
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
        what = (
            "a data2vec stage 1 predicts no units"
            if config.get("pretrain", {}).get("objective") == "data2vec"
            else "no unit head"
        )
        raise InputError(f"{directory} is not a HuBERT stage-1 student ({what}): it cannot score clips")
    rec = config["pretrain"]
    tensors = load_file(directory / UNITS_NAME)
    centroids = tensors.pop("centroids").numpy()
    head = UnitHead(student.cfg.dim, len(centroids), rec["codebook_dim"], rec["temperature"])
    head.load_state_dict({k.removeprefix("head."): v for k, v in tensors.items()})
    units = Units(source_from_dict(config["units_source"], directory, device), centroids)
    return student.to(device), head.to(device).eval(), units
