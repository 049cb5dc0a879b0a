"""Stage 2: train the student to predict every layer the target returned (DistilHuBERT loss).

Reads a manifest of queried clips and the ledger holding their paid responses; writes a student
checkpoint. Loss per head: L1 + (-log sigmoid(cos)) between prediction and target frames, both in
standardised units (per-dimension mean/std of the paid responses: without it, a cosine loss rewards
copying the one large direction all target frames share), averaged over heads. AdamW, linear warm-up
then cosine decay, batches capped by total seconds of (padded) audio, seeds, checkpoints and resume.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from speechmimic import distributed
from speechmimic.audio import SAMPLE_RATE, AudioError
from speechmimic.config import option
from speechmimic.corpus import Clip, fingerprint, warn_unusable
from speechmimic.errors import InputError
from speechmimic.ledger import Ledger
from speechmimic.masked import UnitHead, collate_labelled, masked_cross_entropy, span_frames, span_mask
from speechmimic.readahead import ReadAhead
from speechmimic.student import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    HeadSpec,
    Student,
    StudentConfig,
    align,
    build_student,
)
from speechmimic.trainer import (
    STATE_NAME,
    TrainConfig,
    crop_start,
    record_of,
    save_trained,
    seed_all,
    train_loop,
)
from speechmimic.units import MIN_SAMPLES, MFCCSource, fit_units


@dataclass
class DistillConfig(TrainConfig):
    cos_weight: float = option(1.0, "weight of the -log sigmoid(cosine) term beside L1")
    stats_weight: float = option(
        0.0,
        "weight of a term matching each clip's mean and std over frames of every returned layer "
        "(utterance-level statistics, where a speaker encoder keeps who is speaking)",
    )
    augment: float = option(
        0.0,
        "share of training clips seen as an augmented view (gain within 6 dB, white noise at 15-35 dB "
        "SNR) and trained toward the clip's paid answer all the same (StolenEncoder's reuse of answers)",
    )

    masked_weight: float = option(
        0.0,
        "weight of a masked-prediction term on the clips not queried (semi-supervised stage 2: "
        "HuBERT's loss on MFCC k-means units of the unpaid pool, beside the paid answers)",
    )
    masked_k: int = option(100, "k-means units of that term")

    def __post_init__(self):
        if self.masked_weight < 0:
            raise InputError(f"masked_weight is a weight, >= 0, got {self.masked_weight}")
        if self.masked_k < 2:
            raise InputError(f"masked_k counts k-means units, >= 2, got {self.masked_k}")
        if not 0.0 <= self.augment <= 1.0:
            raise InputError(f"augment is a share of clips, in [0, 1], got {self.augment}")
        if self.stats_weight < 0:
            raise InputError(f"stats_weight is a weight, >= 0, got {self.stats_weight}")


def infer_heads(ledger: Ledger, keys: list[str]) -> list[HeadSpec]:
    """Width and frame rate of each returned layer, read off the paid responses only. Heads come in
    the target's order (the ledger's header), never the stored answer's, whose names are sorted as
    strings (``hidden_12`` before ``hidden_4``)."""
    rates = ledger.frame_rates(keys)
    answer = ledger.get(keys[0])
    return [
        HeadSpec(name=name, dim=int(answer[name].shape[1]), rate=rates[name])
        for name in (ledger.header or {}).get("layers") or answer
    ]


class PairedClips(ReadAhead):
    """Waveforms and paid responses of the queried clips, read ahead of the step (see
    :mod:`speechmimic.readahead`), never all held in memory.

    Every pair is read once here: a clip whose audio no longer decodes is left out and named in
    ``unusable`` (a damaged answer, in contrast, raises: it must be repaired, not trained around)."""

    def __init__(self, clips: list[Clip], ledger: Ledger):
        super().__init__(self._pair)
        self.ledger = ledger
        self.clips: list[Clip] = []
        self.unusable: dict[str, str] = {}
        for clip in clips:
            key = ledger.key_of(clip.id)
            if key not in ledger.entries:
                continue
            try:
                clip.load()
                ledger.get(key, dtype=None)
            except AudioError as e:
                self.unusable[clip.id] = e.reason
                continue
            self.clips.append(clip)
        if not self.clips:
            raise InputError(f"none of the {len(clips)} clips has a usable paid response in {ledger.root}")
        warn_unusable("distill", self.unusable)

    def _pair(self, i: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        clip = self.clips[i]
        return clip.load(), self.ledger.get(self.ledger.key_of(clip.id), dtype=None)  # as stored

    def __len__(self) -> int:
        return len(self.clips)

    def keys(self) -> list[str]:
        return [self.ledger.key_of(c.id) for c in self.clips]


def augmented(wav: np.ndarray, rng: random.Random) -> np.ndarray:
    """Another view of the same clip, which the target would answer (nearly) alike: a gain change
    and white noise."""
    gain = 10 ** (rng.uniform(-6, 6) / 20)
    rms = float(np.sqrt(np.mean(np.square(wav, dtype=np.float64)))) or 1e-3
    noise = np.random.default_rng(rng.getrandbits(32)).standard_normal(len(wav))
    return (gain * (wav + noise * rms / 10 ** (rng.uniform(15, 35) / 20))).astype(np.float32)


def _collate(items, student: Student, crop_seconds: float, rng: random.Random, augment: float = 0.0):
    """Pad waveforms; crop long clips at a student-frame boundary so targets stay aligned; with
    ``augment``, that share of clips becomes an augmented view (no random number drawn without)."""
    hop = student.cfg.hop
    crop = int(crop_seconds * SAMPLE_RATE) // hop * hop
    wavs, targets, lengths = [], [], []
    for wav, resp in items:
        if len(wav) > crop:
            s = crop_start(len(wav), crop, hop, rng) * hop
            per_sample = {name: len(frames) / len(wav) for name, frames in resp.items()}
            wav = wav[s : s + crop]
            resp = {
                name: frames[round(s * per_sample[name]) : round((s + crop) * per_sample[name])]
                for name, frames in resp.items()
            }
        if augment and rng.random() < augment:
            wav = augmented(wav, rng)
        wavs.append(torch.from_numpy(wav))
        targets.append({k: torch.from_numpy(v) for k, v in resp.items()})
        lengths.append(len(wav))
    batch = torch.zeros(len(wavs), max(lengths))
    for i, w in enumerate(wavs):
        batch[i, : len(w)] = w
    return batch, torch.tensor(lengths), targets


def distill_loss(
    student: Student,
    preds: dict[str, torch.Tensor],
    lengths: torch.Tensor,
    targets: list[dict[str, torch.Tensor]],
    cos_weight: float = 1.0,
    frames: dict[str, int] | None = None,
    stats_weight: float = 0.0,
    clips: int | None = None,
) -> tuple[torch.Tensor, dict]:
    """DistilHuBERT loss of the heads' standardised predictions (``student(wav, lengths)[2]``),
    averaged over heads; per-head parts returned for logging. ``frames``: each head's frame count
    to average over (default: those of ``targets``; a rank's rows of a batch pass the batch's).

    ``stats_weight`` adds, per clip, the mean absolute difference of the mean and of the std over
    frames of prediction and answer, averaged over ``clips`` (default: ``len(targets)``; a rank
    passes the batch's): a term on what pooling keeps, which frame losses weigh only weakly."""
    n_student = student.cfg.num_frames(lengths)
    total, parts = 0.0, {}
    for name, head in student.heads.items():
        l1_sum, cos_sum, stats_sum = 0.0, 0.0, 0.0
        # unbind, not preds[name][i]: each indexing's backward fills a zero tensor of the whole batch
        rows = preds[name].unbind(0)
        for i, tgt in enumerate(targets):
            y = (tgt[name] - head.mean) / head.std
            p = align(rows[i], int(n_student[i]) * head.ratio, len(y))
            l1_sum = l1_sum + F.l1_loss(p, y, reduction="sum") / y.shape[1]
            cos_sum = cos_sum - F.logsigmoid(F.cosine_similarity(p, y, dim=-1)).sum()
            if stats_weight:
                p_std, p_mean = torch.std_mean(p, 0, correction=0)
                y_std, y_mean = torch.std_mean(y, 0, correction=0)
                stats_sum = stats_sum + F.l1_loss(p_mean, y_mean) + F.l1_loss(p_std, y_std)
        count = frames[name] if frames else sum(len(t[name]) for t in targets)
        l1, cos = l1_sum / count, cos_sum / count
        parts[name] = {"l1": float(l1.detach()), "cos": float(cos.detach())}
        total = total + l1 + cos_weight * cos
        if stats_weight:
            st = stats_sum / (clips or len(targets))
            parts[name]["stats"] = float(st.detach())
            total = total + stats_weight * st
    return total / len(student.heads), parts


class SemiSupervised(nn.Module):
    """The student and a unit head, one module so that one forward (DDP's unit) runs both the paid
    batch and the masked unpaid one, and optimiser and checkpoints see both."""

    def __init__(self, student: Student, head: UnitHead):
        super().__init__()
        self.student = student
        self.head = head

    def forward(self, wav, lengths, unpaid, unpaid_lengths, mask):
        _, _, preds = self.student(wav, lengths)
        states, valid = self.student.encode(unpaid, unpaid_lengths, mask)
        return preds, self.head(states[-1]), valid


class UnpaidClips:
    """The clips not queried, with their k-means units per student frame, drawn in batches of about
    ``seconds`` of padded audio by the step's random generator (so a resume draws the same)."""

    def __init__(self, clips: list[Clip], student: Student, cfg: DistillConfig, cache: Path, progress: bool):
        with distributed.main_first():  # rank 0 fits and caches the units; the others read them
            units = fit_units(clips, MFCCSource(), cfg.masked_k, cfg.seed, cache, progress=progress)
            self.labels = units.student_labels(clips, student.cfg, cache, progress)
        self.clips = [c for c in clips if c.id in self.labels]  # a clip that does not decode is left out
        if not self.clips:
            raise InputError(f"none of the {len(clips)} unqueried clips decodes: no masked term possible")
        self.units, self.student_cfg, self.cfg = units, student.cfg, cfg

    def fingerprint(self) -> str:
        return fingerprint(self.units.fingerprint(), *[c.id for c in self.clips])

    def batch(self, rng: random.Random):
        crop = self.cfg.crop_seconds
        picked, longest = [], 0.0
        while True:
            clip = self.clips[rng.randrange(len(self.clips))]
            d = min(clip.duration, crop)
            if picked and (len(picked) + 1) * max(longest, d) > self.cfg.batch_seconds:
                break
            picked.append(clip)
            longest = max(longest, d)
        return collate_labelled(
            [c.load(min_samples=MIN_SAMPLES) for c in picked],
            [self.labels[c.id] for c in picked],
            self.student_cfg,
            crop,
            rng,
        )


def student_from_stage1(directory: str | Path, heads: list[HeadSpec]) -> Student:
    """A student with the architecture and trunk weights of a stage-1 checkpoint and new ``heads``."""
    directory = Path(directory)
    config = json.loads((directory / CONFIG_NAME).read_text())
    if config.get("speechmimic") != "student":
        raise InputError(f"{directory} is not a speechmimic student checkpoint")
    cfg = StudentConfig.from_dict({**config["student"], "targets": []})
    cfg.targets = list(heads)
    student = Student(cfg)
    own = student.state_dict()
    state = load_file(directory / WEIGHTS_NAME)
    trunk = {k: v for k, v in state.items() if k in own and not k.startswith("heads.")}
    if not trunk:
        raise InputError(f"{directory} holds no trunk weights this student can use")
    student.load_state_dict(trunk, strict=False)
    return student


def distill(
    clips: list[Clip],
    ledger: Ledger,
    out_dir: str | Path,
    cfg: DistillConfig,
    student: Student | None = None,
    preset: str = "small",
    init: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    unpaid: list[Clip] | None = None,
) -> Student:
    """Train a student on the paid responses of ``clips`` and save it to ``out_dir``.

    ``unpaid``: the thief's clips that were not queried, for the masked-prediction term of
    ``cfg.masked_weight`` (required when it is on; units are cached in ``out_dir/units``).

    ``init``: a stage-1 checkpoint (``speechmimic pretrain``) whose architecture and trunk weights
    the student starts from (``preset`` is then ignored); the heads are new, sized from the answers.
    With ``resume`` (default), a ``train_state.pt`` left in ``out_dir`` by an interrupted run is
    picked up where it stopped: same weights, optimiser, step and random state.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_all(cfg.seed)
    data = PairedClips(clips, ledger)
    keys = data.keys()
    if student is None and init is not None:
        student = student_from_stage1(init, infer_heads(ledger, keys))
    elif student is None:
        student = build_student(preset, infer_heads(ledger, keys))
    stats = ledger.layer_stats(keys)
    for name, head in student.heads.items():
        head.set_stats(*stats[name])
    model: torch.nn.Module = student
    unlabelled = None
    if cfg.masked_weight:
        if not unpaid:
            raise InputError("masked_weight > 0 needs the unqueried clips (unpaid=...) to predict units on")
        unlabelled = UnpaidClips(unpaid, student, cfg, out_dir / "units", progress)
        model = SemiSupervised(student, UnitHead(student.cfg.dim, cfg.masked_k, 256, 0.1))
        span = span_frames(10, student.cfg)  # HuBERT's masking, as stage 1's defaults
    device = distributed.device_for(cfg.device)
    model.to(device).train()

    def step(model: torch.nn.Module, batch_idx: list[int], rng: random.Random):
        # The whole batch is collated on every rank (same crops); each runs the model on its rows.
        wav, lengths, targets = _collate(
            [data[i] for i in batch_idx], student, cfg.crop_seconds, rng, cfg.augment
        )
        frames = {name: sum(len(t[name]) for t in targets) for name in student.heads}
        rows, weight = distributed.my_share(len(batch_idx))
        lengths = lengths[rows].to(device)
        targets = [{k: v.to(device) for k, v in targets[i].items()} for i in rows]
        if unlabelled is None:
            _, _, preds = model(wav[rows].to(device), lengths)
            loss, _ = distill_loss(
                student, preds, lengths, targets, cfg.cos_weight, frames, cfg.stats_weight, len(batch_idx)
            )
            return loss * weight, {}
        u_wav, u_lengths, u_target = unlabelled.batch(rng)
        u_frames = [int(student.cfg.num_frames(int(n))) for n in u_lengths]
        mask = span_mask(u_frames, u_target.shape[1], 0.08, span, np.random.default_rng(rng.getrandbits(64)))
        valid = torch.arange(u_target.shape[1])[None, :] < torch.tensor(u_frames)[:, None]
        count = int((mask & valid & (u_target >= 0)).sum())
        u_rows, u_weight = distributed.my_share(len(u_frames))
        mask = mask[u_rows].to(device)
        preds, logits, valid = model(
            wav[rows].to(device), lengths, u_wav[u_rows].to(device), u_lengths[u_rows].to(device), mask
        )
        loss, _ = distill_loss(
            student, preds, lengths, targets, cfg.cos_weight, frames, cfg.stats_weight, len(batch_idx)
        )
        masked, correct, n = masked_cross_entropy(logits, valid, u_target[u_rows].to(device), mask, count)
        total = loss * weight + cfg.masked_weight * masked * u_weight
        return total, {"masked_acc": round(correct / max(1, n), 4)}

    # What the training state belongs to: a state left by other settings, answers or architecture is
    # not resumed (device and checkpointing do not change the result).
    record = record_of(cfg)
    record.update(answers=fingerprint(keys), student=student.cfg.to_dict(), init=str(init) if init else None)
    if unlabelled is not None:
        record["unpaid"] = unlabelled.fingerprint()
    t0 = time.time()
    log = train_loop(
        model,
        cfg,
        [c.duration for c in data.clips],
        step,
        out_dir / STATE_NAME,
        record=record,
        resume=resume,
        desc="distill",
        progress=progress,
        on_step=on_step,
        reader=data,
    )
    student.eval()
    extra = {
        "distill": asdict(cfg),
        "init": str(init) if init else None,  # what the trunk started from
        "ledger": str(ledger.root),
        "target": (ledger.header or {}).get("target"),
        "queried_clips": len(data),
        "unpaid_clips": len(unlabelled.clips) if unlabelled else 0,
        "train_seconds": round(time.time() - t0, 1),
    }
    save_trained(student, out_dir, log, extra)
    return student
