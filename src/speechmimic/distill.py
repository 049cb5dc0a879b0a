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

from speechmimic import distributed
from speechmimic.audio import SAMPLE_RATE, AudioError
from speechmimic.config import option
from speechmimic.corpus import Clip, fingerprint, warn_unusable
from speechmimic.ledger import Ledger
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
from speechmimic.trainer import STATE_NAME, TrainConfig, crop_start, record_of, seed_all, train_loop


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

    def __post_init__(self):
        if not 0.0 <= self.augment <= 1.0:
            raise ValueError(f"augment is a share of clips, in [0, 1], got {self.augment}")
        if self.stats_weight < 0:
            raise ValueError(f"stats_weight is a weight, >= 0, got {self.stats_weight}")


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
            raise ValueError(f"none of the {len(clips)} clips has a usable paid response in {ledger.root}")
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


def student_from_stage1(directory: str | Path, heads: list[HeadSpec]) -> Student:
    """A student with the architecture and trunk weights of a stage-1 checkpoint and new ``heads``."""
    directory = Path(directory)
    config = json.loads((directory / CONFIG_NAME).read_text())
    if config.get("speechmimic") != "student":
        raise ValueError(f"{directory} is not a speechmimic student checkpoint")
    cfg = StudentConfig.from_dict({**config["student"], "targets": []})
    cfg.targets = list(heads)
    student = Student(cfg)
    own = student.state_dict()
    state = load_file(directory / WEIGHTS_NAME)
    trunk = {k: v for k, v in state.items() if k in own and not k.startswith("heads.")}
    if not trunk:
        raise ValueError(f"{directory} holds no trunk weights this student can use")
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
) -> Student:
    """Train a student on the paid responses of ``clips`` and save it to ``out_dir``.

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
    device = distributed.device_for(cfg.device)
    student.to(device).train()

    def step(model: torch.nn.Module, batch_idx: list[int], rng: random.Random):
        # The whole batch is collated on every rank (same crops); each runs the model on its rows.
        wav, lengths, targets = _collate(
            [data[i] for i in batch_idx], student, cfg.crop_seconds, rng, cfg.augment
        )
        frames = {name: sum(len(t[name]) for t in targets) for name in student.heads}
        rows, weight = distributed.my_share(len(batch_idx))
        lengths = lengths[rows].to(device)
        _, _, preds = model(wav[rows].to(device), lengths)
        targets = [{k: v.to(device) for k, v in targets[i].items()} for i in rows]
        loss, _ = distill_loss(
            student, preds, lengths, targets, cfg.cos_weight, frames, cfg.stats_weight, len(batch_idx)
        )
        return loss * weight, {}

    # What the training state belongs to: a state left by other settings, answers or architecture is
    # not resumed (device and checkpointing do not change the result).
    record = record_of(cfg)
    record.update(answers=fingerprint(keys), student=student.cfg.to_dict(), init=str(init) if init else None)
    t0 = time.time()
    log = train_loop(
        student,
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
    if distributed.is_main():  # one writer; the others wait until the student is on disk
        student.save(
            out_dir,
            extra={
                "distill": asdict(cfg),
                "init": str(init) if init else None,  # what the trunk started from
                "ledger": str(ledger.root),
                "target": (ledger.header or {}).get("target"),
                "queried_clips": len(data),
                "train_seconds": round(time.time() - t0, 1),
            },
        )
        (out_dir / "train_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
    distributed.barrier()
    return student
