"""What each candidate clip is worth to the thief, read off the stage-1 student (no query spent).

:func:`score_clips` gives per clip the stage-1 student's mean masked-prediction loss over seeded
masks (``uncertainty``: higher = less known) and its mean-pooled last-layer features
(``embeddings``), as :class:`Scores`, which the informed selection strategies rank by.
:func:`cached_scores` keeps them on disk under a name that hashes the clips and the student.
:func:`masked_accuracy` / :func:`checkpoint_accuracy` say how well a stage-1 checkpoint predicts
the units of held-out clips.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from speechmimic.audio import AudioError
from speechmimic.corpus import Clip, clips_fingerprint, warn_unusable
from speechmimic.masked import MaskedPredictor, UnitHead, span_frames, span_mask
from speechmimic.pretrain import load_pretrained
from speechmimic.student import CONFIG_NAME, WEIGHTS_NAME, Student
from speechmimic.units import MIN_SAMPLES, Units


@dataclass
class Scores:
    """What informed strategies rank by, one row per candidate clip (in ``ids`` order).

    ``uncertainty``: higher = the stage-1 student knows the clip less (masked-prediction loss or
    predictive entropy). ``embeddings``: utterance embeddings (N, D) for diversity; :func:`score_clips`
    gives unit-length float16 rows: the strategies compare directions only, float16 halves what
    selection holds per clip, and on stage-1 embeddings k-center picks the clips float32 picks.
    """

    ids: list[str]
    uncertainty: np.ndarray | None = None
    embeddings: np.ndarray | None = None

    def save(self, path: str | os.PathLike) -> None:
        arrays = {"ids": np.array(self.ids)}
        if self.uncertainty is not None:
            arrays["uncertainty"] = np.asarray(self.uncertainty, dtype=np.float32)
        if self.embeddings is not None:
            half = self.embeddings.dtype == np.float16
            arrays["embeddings"] = np.asarray(self.embeddings, dtype=np.float16 if half else np.float32)
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Scores:
        with np.load(path) as f:
            return cls(
                [str(i) for i in f["ids"]],
                f["uncertainty"] if "uncertainty" in f else None,
                f["embeddings"] if "embeddings" in f else None,
            )

    def aligned(self, clips: Sequence[Clip]) -> Scores:
        """These scores reordered to ``clips``; KeyError naming a clip that has none."""
        if len(clips) == len(self.ids) and all(c.id == i for c, i in zip(clips, self.ids, strict=True)):
            return self  # the usual case (scored from the same manifest): no copy of the embeddings
        row = {clip_id: i for i, clip_id in enumerate(self.ids)}
        missing = [c.id for c in clips if c.id not in row]
        if missing:
            raise KeyError(f"{len(missing)} clips have no scores, e.g. {missing[:3]}")
        idx = np.array([row[c.id] for c in clips], dtype=int)
        return Scores(
            [c.id for c in clips],
            None if self.uncertainty is None else self.uncertainty[idx],
            None if self.embeddings is None else self.embeddings[idx],
        )


def _clip_rng(seed: int, clip_id: str, draw: int) -> np.random.Generator:
    """Masks that depend on the seed and the clip only, not on the order clips come in."""
    return np.random.default_rng([seed, zlib.crc32(clip_id.encode()), draw])


def _labelled(clips: Iterable[Clip], units: Units, cfg) -> Iterator[tuple[Clip, np.ndarray, np.ndarray]]:
    """Each clip that decodes, its waveform and its units one per student frame, computed as it
    comes (never all held); a clip that does not decode is named in ``units.unusable``."""
    for clip in clips:
        try:
            wav = clip.load(min_samples=MIN_SAMPLES)
        except AudioError as e:
            units.unusable[clip.id] = e.reason
            continue
        yield clip, wav, units.labels_of(wav, cfg)


@torch.no_grad()
def _per_clip(
    student: Student,
    head: UnitHead,
    items: Iterable[tuple[Clip, np.ndarray, np.ndarray]],
    total: int | None,
    seed: int,
    n_masks: int,
    mask_prob: float,
    span: int,
    device: str,
    progress: bool,
    desc: str,
):
    """Per (clip, waveform, labels): masked-prediction losses and hits over ``n_masks`` seeded masks,
    and the mean last-layer features of the unmasked clip."""
    model = MaskedPredictor(student, head).to(device).eval()
    for clip, wav, labels in tqdm(items, total=total, desc=desc, unit="clip", disable=not progress):
        wav = torch.from_numpy(wav)[None].to(device)
        target = torch.from_numpy(labels).long()[None].to(device)
        n = target.shape[1]
        _, _, states = model(wav, None, None)
        embedding = states[-1][0, :n].mean(0).cpu().numpy()
        losses, hits, targets = [], [], []
        for draw in range(n_masks):
            mask = span_mask([n], n, mask_prob, span, _clip_rng(seed, clip.id, draw)).to(device)
            logits, _, _ = model(wav, None, mask)
            logits, y = logits[0][mask[0]], target[0][mask[0]]
            losses.append(F.cross_entropy(logits, y, reduction="none").cpu().numpy())
            hits.append((logits.argmax(-1) == y).cpu().numpy())
            targets.append(y.cpu().numpy())
        yield clip, np.concatenate(losses), np.concatenate(hits), np.concatenate(targets), embedding


def _accuracy(student, head, items, total, seed, n_masks, mask_prob, mask_length, device, progress) -> dict:
    span = span_frames(mask_length, student.cfg)
    losses, hits, targets = [], [], []
    for _, loss, hit, target, _ in _per_clip(
        student, head, items, total, seed, n_masks, mask_prob, span, device, progress, "masked accuracy"
    ):
        losses.append(loss)
        hits.append(hit)
        targets.append(target)
    targets = np.concatenate(targets)
    return {
        "accuracy": float(np.concatenate(hits).mean()),
        "majority": float(np.bincount(targets).max() / len(targets)),
        "loss": float(np.concatenate(losses).mean()),
        "frames": int(len(targets)),
    }


def masked_accuracy(
    student: Student,
    head: UnitHead,
    clips: list[Clip],
    labels: dict[str, np.ndarray],
    seed: int = 0,
    n_masks: int = 1,
    mask_prob: float = 0.08,
    mask_length: int = 10,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Masked-prediction accuracy over ``clips`` with seeded masks, and what always answering the most
    frequent unit of those same masked frames would score (``majority``)."""
    items = ((c, c.load(min_samples=MIN_SAMPLES), labels[c.id]) for c in clips)
    return _accuracy(
        student, head, items, len(clips), seed, n_masks, mask_prob, mask_length, device, progress
    )


def checkpoint_accuracy(
    directory: str | Path, clips: list[Clip], seed: int = 0, device: str = "cpu", progress: bool = True
) -> dict:
    """:func:`masked_accuracy` of a stage-1 checkpoint on ``clips`` (e.g. held out), masked as in
    its training; a clip that does not decode is named on stderr and left out."""
    student, head, units = load_pretrained(directory, device)
    rec = json.loads((Path(directory) / CONFIG_NAME).read_text())["pretrain"]
    items = _labelled(clips, units, student.cfg)
    result = _accuracy(
        student, head, items, len(clips), seed, 1, rec["mask_prob"], rec["mask_length"], device, progress
    )
    warn_unusable("stage-1 scoring", units.unusable)
    return result


def score_clips(
    student_dir: str | Path,
    clips: Iterable[Clip],
    seed: int = 0,
    n_masks: int = 2,
    device: str = "cpu",
    progress: bool = True,
    total: int | None = None,
) -> Scores:
    """What clip selection ranks by: per clip, the stage-1 student's mean masked-prediction loss over
    ``n_masks`` seeded masks (uncertainty) and the direction of its mean-pooled last-layer features
    (embedding, unit length, float16). A clip that does not decode gets no row (and is named on stderr).

    ``clips`` may be a lazily read manifest (:func:`~speechmimic.corpus.iter_manifest`; then give its
    ``total``): each clip is labelled, scored and dropped in turn, so memory holds one row per clip."""
    student, head, units = load_pretrained(student_dir, device)
    rec = json.loads((Path(student_dir) / CONFIG_NAME).read_text())["pretrain"]
    span = span_frames(rec["mask_length"], student.cfg)
    n = len(clips) if total is None else total
    # filled in place: a list of per-clip rows, then stacked, would hold the embeddings twice
    ids: list[str] = []
    uncertainty = np.zeros(n, dtype=np.float32)
    embeddings = np.zeros((n, student.cfg.dim), dtype=np.float16)
    items = _labelled(clips, units, student.cfg)
    for clip, loss, _, _, emb in _per_clip(
        student, head, items, n, seed, n_masks, rec["mask_prob"], span, device, progress, "scoring"
    ):
        uncertainty[len(ids)] = loss.mean()
        embeddings[len(ids)] = emb / max(float(np.linalg.norm(emb)), 1e-12)
        ids.append(clip.id)
    warn_unusable("stage-1 scoring", units.unusable)
    if len(ids) < n:  # clips that did not decode have no row
        uncertainty, embeddings = uncertainty[: len(ids)].copy(), embeddings[: len(ids)].copy()
    return Scores(ids, uncertainty, embeddings)


def scores_path(
    stage1_dir: str | Path, clips: list[Clip], cache_dir: str | Path, seed: int = 0, progress: bool = True
) -> Path:
    """The file of :func:`score_clips` in ``cache_dir``, computed if absent; its name hashes the
    clips, the seed and the stage-1 student's weights."""
    stage1_dir, cache_dir = Path(stage1_dir), Path(cache_dir)
    h = hashlib.sha256(clips_fingerprint(clips).encode() + str(seed).encode())
    h.update((stage1_dir / WEIGHTS_NAME).read_bytes())
    path = cache_dir / f"scores-{h.hexdigest()[:16]}.npz"
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")  # renamed when complete: a crash leaves no half file
        score_clips(stage1_dir, clips, seed=seed, progress=progress).save(tmp)
        tmp.replace(path)
    return path


def cached_scores(
    stage1_dir: str | Path, clips: list[Clip], cache_dir: str | Path, seed: int = 0, progress: bool = True
) -> Scores:
    """:func:`score_clips`, cached (see :func:`scores_path`)."""
    return Scores.load(scores_path(stage1_dir, clips, cache_dir, seed, progress))
