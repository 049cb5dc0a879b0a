"""Probe metrics: accuracy, edit distance, PER/WER, greedy CTC decoding, equal error rate."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from speechmimic.errors import InputError
from speechmimic.probe.heads import BLANK


def accuracy(predicted: Sequence, reference: Sequence) -> float:
    if len(predicted) != len(reference) or not reference:
        raise ValueError("accuracy needs equally many, and at least one, predictions and references")
    return sum(p == r for p, r in zip(predicted, reference, strict=True)) / len(reference)


def edit_distance(hyp: Sequence, ref: Sequence) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1)."""
    prev = list(range(len(ref) + 1))
    for i, h in enumerate(hyp, 1):
        cur = [i]
        for j, r in enumerate(ref, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (h != r)))
        prev = cur
    return prev[-1]


def error_rate(hyps: Sequence[Sequence], refs: Sequence[Sequence]) -> float:
    """Corpus-level error rate: the sum of edit distances over the sum of reference lengths (PER, WER)."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses for {len(refs)} references")
    total = sum(len(r) for r in refs)
    if total == 0:
        raise ValueError("references are all empty")
    return sum(edit_distance(h, r) for h, r in zip(hyps, refs, strict=True)) / total


def words(chars: Sequence[str]) -> list[str]:
    """Character tokens with '|' between words (``Task.tokens`` of a chars task) -> words."""
    return [w for w in "".join(chars).split("|") if w]


def ctc_greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor | None = None) -> list[list[int]]:
    """Best path per clip: argmax per frame, repeats merged, blanks removed. (B, T, V) -> token ids."""
    best = log_probs.argmax(-1).cpu()
    lengths = lengths.cpu() if lengths is not None else torch.full((best.shape[0],), best.shape[1])
    out = []
    for row, n in zip(best, lengths.tolist(), strict=True):
        ids = torch.unique_consecutive(row[:n]).tolist()
        out.append([i for i in ids if i != BLANK])
    return out


def equal_error_rate(scores: np.ndarray, target: np.ndarray) -> float:
    """The rate at which false accepts equal false rejects, as the threshold on ``scores`` (higher =
    more alike) sweeps; ``target`` marks the same-speaker trials. Interpolated between the two
    thresholds where the rates cross."""
    scores, target = np.asarray(scores, dtype=np.float64), np.asarray(target, dtype=bool)
    n_target, n_other = int(target.sum()), int((~target).sum())
    if not n_target or not n_other:
        raise InputError("an equal error rate needs same-speaker and different-speaker trials")
    order = np.argsort(-scores, kind="stable")
    hits = np.cumsum(target[order])  # accepting the k highest-scored trials
    false_accept = np.concatenate([[0.0], (np.arange(1, len(order) + 1) - hits) / n_other])
    false_reject = np.concatenate([[1.0], 1 - hits / n_target])
    k = int(np.argmax(false_accept >= false_reject))  # first threshold where the curves have crossed
    a0, r0, a1, r1 = false_accept[k - 1], false_reject[k - 1], false_accept[k], false_reject[k]
    t = (r0 - a0) / ((r0 - a0) - (r1 - a1))
    return float(a0 + t * (a1 - a0))
