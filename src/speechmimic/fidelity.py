"""How close the student's predictions are to the target's answers, on clips never queried.

Per returned layer: mean frame cosine, mean L1, and explained variance
``r2 = 1 - sum ||pred - target||^2 / sum ||target - mean_target||^2``, where ``mean_target`` is the
mean target frame over the *queried* clips (what the thief could know). ``constant_cosine`` is the
cosine the constant predictor ``mean_target`` scores: cosine alone flatters, since target frames
share one large common direction (on resemblyzer the constant already scores ~0.67).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from speechmimic.audio import AudioError
from speechmimic.corpus import Clip, warn_unusable
from speechmimic.ledger import Ledger, query_clips
from speechmimic.student import CHUNK_SECONDS, Student, predict
from speechmimic.targets import Target


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12
    return num / den


class FidelityMeter:
    """Accumulates per-layer sums over clips; ``result()`` gives the metrics."""

    def __init__(self, mean_target: dict[str, np.ndarray]):
        self.mean = {k: v.astype(np.float64) for k, v in mean_target.items()}
        self.sums: dict[str, dict[str, float]] = {
            k: {"cos": 0.0, "l1": 0.0, "sse": 0.0, "sst": 0.0, "const_cos": 0.0, "frames": 0}
            for k in self.mean
        }
        self.clips = 0

    def add(self, pred: dict[str, np.ndarray], target: dict[str, np.ndarray]) -> None:
        for name, s in self.sums.items():
            y = target[name].astype(np.float64)
            p = pred[name].astype(np.float64)
            if p.shape != y.shape:
                raise ValueError(f"layer {name}: prediction {p.shape} vs target {y.shape}")
            s["cos"] += _cosine(p, y).sum()
            s["l1"] += np.abs(p - y).mean(-1).sum()
            s["sse"] += ((p - y) ** 2).sum()
            s["sst"] += ((y - self.mean[name]) ** 2).sum()
            s["const_cos"] += _cosine(np.broadcast_to(self.mean[name], y.shape), y).sum()
            s["frames"] += len(y)
        self.clips += 1

    def result(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, s in self.sums.items():
            n = max(1, s["frames"])
            out[name] = {
                "cosine": round(float(s["cos"]) / n, 4),
                "l1": round(float(s["l1"]) / n, 4),
                "r2": round(float(1.0 - s["sse"] / max(s["sst"], 1e-12)), 4),
                "constant_cosine": round(float(s["const_cos"]) / n, 4),
                "frames": int(s["frames"]),
            }
        return out


def mean_r2(fidelity: dict[str, dict[str, float]]) -> float:
    return float(np.mean([v["r2"] for v in fidelity.values()]))


def evaluate_fidelity(
    student: Student,
    pairs: Iterable[tuple[np.ndarray, dict[str, np.ndarray]]],
    mean_target: dict[str, np.ndarray],
    total: int | None = None,
    progress: bool = True,
    chunk_seconds: float | None = CHUNK_SECONDS,
) -> dict[str, dict[str, float]]:
    """Fidelity of ``student`` on (waveform, target response) pairs of held-out clips; clips longer
    than ``chunk_seconds`` are encoded in windows (:func:`~speechmimic.student.infer`)."""
    meter = FidelityMeter(mean_target)
    student.eval()
    for wav, target in tqdm(pairs, total=total, desc="fidelity", unit="clip", disable=not progress):
        frames = {k: len(v) for k, v in target.items()}
        pred = predict(student, torch.from_numpy(wav), frames, chunk_seconds)
        meter.add({k: v.numpy() for k, v in pred.items()}, target)
    return meter.result()


def heldout_fidelity(
    student: Student,
    target: Target,
    heldout: list[Clip],
    eval_ledger: Ledger,
    progress: bool = True,
    chunk_seconds: float | None = CHUNK_SECONDS,
) -> dict:
    """Fidelity on clips the attack never queried, the target's answers read through ``eval_ledger``
    (the evaluator's, never the attack's budget); ``mean_target`` is the student's stored mean of the
    queried frames (its heads' de-standardisation means). Clips that do not decode are left out and
    named on stderr."""
    stats = query_clips(target, heldout, eval_ledger, progress=progress)
    unusable = dict(stats["unusable"])
    mean_target = {name: head.mean.numpy() for name, head in student.heads.items()}

    def pairs():
        for clip in heldout:
            if clip.id in unusable:
                continue
            try:
                wav = clip.load(min_samples=target.min_samples)
            except AudioError as e:  # it decoded when it was queried; the file has changed since
                unusable[clip.id] = e.reason
                continue
            yield wav, eval_ledger.get_clip(clip.id)

    result = evaluate_fidelity(
        student, pairs(), mean_target, total=len(heldout), progress=progress, chunk_seconds=chunk_seconds
    )
    warn_unusable("held-out fidelity", unusable)
    return result
