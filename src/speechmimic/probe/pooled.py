"""Linear probes on pooled features: a quick look at what each hidden state of an upstream encodes.

Every clip becomes, per hidden state, its frames' time mean and standard deviation side by side
(mean+std pooling). A ridge classifier on standardised features, its regularisation chosen by
leave-one-out on the training part only, is scored by stratified k-fold cross-validation (grouped
when clips share a source, so crops of one recording never sit on both sides) or on a fixed split.
No gradient training: cheap enough to probe every state of every run of a benchmark grid, where
the SUPERB heads of :mod:`speechmimic.probe.train` would cost minutes each. A :class:`ProbeSet`
names the labelled clips; :func:`state_scores` and :func:`split_scores` score an upstream on them.

A set of ``task="verify"`` is a speaker-verification probe instead (SUPERB's ASV metric, without a
trained back end): every pair of clips is a trial, scored by the cosine of their pooled features
(standardised by the set's own statistics, no labels used), and its score is 1 - EER (the equal error
rate), so that higher is better for every set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from speechmimic.corpus import Clip, clips_fingerprint
from speechmimic.errors import InputError
from speechmimic.probe.metrics import equal_error_rate

ALPHAS = np.logspace(-1, 5, 13)


@dataclass
class ProbeSet:
    """Labelled clips to probe: ``labels[i]`` is clip i's class; clips of one ``groups`` entry (a
    speaker, a recording) never straddle a fold. ``task="verify"``: ``labels`` are speakers, scored
    by :func:`verification_eer` (two clips of one group, e.g. crops of one recording, are no trial)."""

    name: str
    clips: list[Clip]
    labels: list[str]
    groups: list[str] | None = None
    task: str = "classify"

    def __post_init__(self):
        if self.task not in ("classify", "verify"):
            raise InputError(f"probe task {self.task!r}: choose classify or verify")

    def waves(self) -> list[np.ndarray]:
        """The clips' 16 kHz waveforms, decoded once per process (a grid probes the same sets often)."""
        key = clips_fingerprint(self.clips)
        if key not in _WAVES:
            _WAVES[key] = [c.load() for c in self.clips]
        return _WAVES[key]


_WAVES: dict[str, list[np.ndarray]] = {}


@torch.no_grad()
def pooled_features(
    upstream: nn.Module, wavs: Iterable[np.ndarray], progress: bool = True, total: int | None = None
) -> dict[str, np.ndarray]:
    """``{state name: (N, 2 D) float32}``: mean and std over time of each hidden state of each 16 kHz
    waveform, one per call (so padding never enters a clip's statistics)."""
    names = list(upstream.hidden_state_names)
    rows: list[list[np.ndarray]] = [[] for _ in names]
    for wav in tqdm(wavs, total=total, desc="pooling", unit="clip", disable=not progress):
        states = upstream([torch.from_numpy(wav)])["hidden_states"]
        for i, s in enumerate(states):
            s = s[0].float()
            rows[i].append(torch.cat([s.mean(0), s.std(0, unbiased=False)]).numpy())
    return {name: np.stack(r).astype(np.float32) for name, r in zip(names, rows, strict=True)}


def _classifier():
    from sklearn.linear_model import RidgeClassifierCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), RidgeClassifierCV(alphas=ALPHAS))


def split_accuracy(x_train: np.ndarray, y_train, x_test: np.ndarray, y_test) -> float:
    """Accuracy on ``(x_test, y_test)`` of the probe fitted on the training part."""
    clf = _classifier().fit(x_train, np.asarray(y_train))
    return float((clf.predict(x_test) == np.asarray(y_test)).mean())


def cv_accuracy(
    x: np.ndarray, y: Sequence, folds: int = 5, seed: int = 0, groups: Sequence | None = None
) -> float:
    """Stratified ``folds``-fold cross-validated accuracy (every clip predicted once, by a probe that
    never saw it); with ``groups``, clips of one group stay in one fold."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    y = np.asarray(y)
    if groups is None:
        splits = StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y)
    else:
        splits = StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(x, y, np.asarray(groups))
    correct = 0
    for train, test in splits:
        clf = _classifier().fit(x[train], y[train])
        correct += int((clf.predict(x[test]) == y[test]).sum())
    return correct / len(y)


def verification_eer(
    x: np.ndarray,
    speakers: Sequence,
    groups: Sequence | None = None,
    max_trials: int = 500_000,
    seed: int = 0,
) -> float:
    """EER of cosine scoring over every pair of clips (a seeded sample of ``max_trials`` when there
    are more), pairs of one ``groups`` entry left out."""
    x = np.asarray(x, dtype=np.float64)
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
    i, j = np.triu_indices(len(x), 1)
    if groups is not None:
        g = np.asarray(groups)
        keep = g[i] != g[j]
        i, j = i[keep], j[keep]
    if len(i) > max_trials:
        pick = np.random.default_rng(seed).choice(len(i), max_trials, replace=False)
        i, j = i[pick], j[pick]
    s = np.asarray(speakers)
    return equal_error_rate(np.einsum("ij,ij->i", x[i], x[j]), s[i] == s[j])


def cv_by_state(
    features: dict[str, np.ndarray],
    y: Sequence,
    folds: int = 5,
    seed: int = 0,
    groups: Sequence | None = None,
) -> dict[str, float]:
    """:func:`cv_accuracy` of every hidden state."""
    return {name: round(cv_accuracy(x, y, folds, seed, groups), 4) for name, x in features.items()}


def state_scores(
    upstream: nn.Module, sets: dict[str, ProbeSet], keep: Callable[[str], bool] | None = None
) -> dict[str, dict[str, float]]:
    """Per probe set, the cross-validated accuracy (:func:`cv_by_state`), or 1 - EER for a
    verification set, of every hidden state of ``upstream`` whose name ``keep`` accepts (default: all)."""
    out = {}
    for name, ps in sets.items():
        feats = pooled_features(upstream, ps.waves(), progress=False)
        feats = {k: v for k, v in feats.items() if keep is None or keep(k)}
        if ps.task == "verify":
            out[name] = {k: round(1 - verification_eer(x, ps.labels, ps.groups), 4) for k, x in feats.items()}
        else:
            out[name] = cv_by_state(feats, ps.labels, groups=ps.groups)
    return out


def split_scores(upstream: nn.Module, train: ProbeSet, test: ProbeSet) -> dict:
    """A fixed split: the state is chosen by cross-validation on ``train``, then scored once on
    ``test``; returns the state, every state's CV accuracy and the test accuracy."""
    tr = pooled_features(upstream, train.waves(), progress=False)
    te = pooled_features(upstream, test.waves(), progress=False)
    cv = cv_by_state(tr, train.labels)
    best = max(cv, key=cv.get)
    test_accuracy = split_accuracy(tr[best], train.labels, te[best], test.labels)
    return {"state": best, "cv": cv, "test": round(test_accuracy, 4)}
