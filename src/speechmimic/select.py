"""Clip selection under a query budget.

A strategy ranks the candidate clips; :func:`~speechmimic.budget.take_within` then keeps those that
fit the :class:`~speechmimic.budget.Budget`, so most strategies only rank. Its function is
``(clips, scores, budget, rng) -> indices in query order``, where ``scores`` is a
:class:`~speechmimic.score.Scores` aligned to ``clips`` (or ``None``) holding what informed
strategies rank by: stage-1 uncertainty and/or utterance embeddings (``speechmimic score``). It may
return a :class:`Ranking` (a ``list[int]``) to report the score each clip was chosen by. A
:class:`Strategy` record names the function, what it needs, what its score means and its help;
one in ``STRATEGIES`` is offered everywhere (CLI, extract, the experiment runner).

``random``       nothing; a smaller clip budget with the same seed is a prefix of a larger one.
``longest``      nothing; longest clips first (most audio per query when paying per clip).
``uncertainty``  ``uncertainty``; highest first.
``diversity``    ``embeddings``; greedy k-center on L2-normalised embeddings (chunked: no N x N matrix).
``cluster``      ``embeddings``; MiniBatchKMeans, then one clip of every cluster, then clusters in
                 proportion to their size; random order within a cluster.
``hybrid``       ``embeddings`` and ``uncertainty``; as ``cluster``, most uncertain first within a cluster.
"""

from __future__ import annotations

import os
import random
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import torch

from speechmimic.budget import Budget, take_within
from speechmimic.corpus import Clip, iter_manifest
from speechmimic.errors import InputError
from speechmimic.score import Scores


class Ranking(list):
    """Chosen indices in query order (a plain ``list[int]``) and what each was chosen by.

    ``scores[k]``: the k-th pick's score (``None`` where there is none); ``clusters[k]``: its cluster
    for the clustered strategies, else ``clusters`` is ``None``.
    """

    def __init__(self, indices=(), scores=None, clusters=None):
        super().__init__(int(i) for i in indices)
        self.scores = [None] * len(self) if scores is None else list(scores)
        self.clusters = None if clusters is None else list(clusters)


Rank = Callable[[Sequence[Clip], "Scores | None", Budget, random.Random], list[int]]


@dataclass(frozen=True)
class Strategy:
    """A selection strategy: its ranking function, what it needs from ``speechmimic score``, what
    the score it reports for each pick means (``labels["selection"]["score"]``), and its help."""

    name: str
    rank: Rank
    help: str
    needs: tuple[str, ...] = ()
    score: str | None = None

    def describe(self) -> str:
        return f"{self.name} ({self.help}; needs {' + '.join(self.needs) or 'nothing'})"


_WHAT = {
    "uncertainty": "stage-1 masked-prediction loss or predictive entropy",
    "embeddings": "stage-1 utterance embeddings",
}

# Whole-array passes over the embeddings go this many rows at a time, so temporaries stay O(chunk x D).
CHUNK = 8192
MAX_CLUSTERS = 50


def _check_needs(strategy: Strategy, scores: Scores | None) -> None:
    missing = [w for w in strategy.needs if scores is None or getattr(scores, w) is None]
    if missing:
        need = " and ".join(f"{w} ({_WHAT[w]})" for w in missing)
        raise InputError(
            f"strategy {strategy.name!r} needs per-clip {need}: run `speechmimic score` with the stage-1 "
            "student on these clips and pass its .npz (--scores)"
        )


def _uncertainty(scores: Scores) -> np.ndarray:
    u = np.asarray(scores.uncertainty, dtype=np.float64)
    if not np.isfinite(u).all():
        raise InputError("uncertainty contains NaN or inf")
    return u


def _shuffled(n: int, rng: random.Random) -> np.ndarray:
    order = list(range(n))
    rng.shuffle(order)
    return np.array(order, dtype=np.int64)


def _take(clips, order, budget, score=None, cluster=None) -> Ranking:
    idx = take_within(clips, order, budget)
    return Ranking(
        idx,
        # tolist(): plain Python numbers, so the manifest's JSON can hold them.
        None if score is None else np.asarray(score)[idx].tolist(),
        None if cluster is None else np.asarray(cluster)[idx].tolist(),
    )


def _highest_first(values: np.ndarray, rng: random.Random) -> np.ndarray:
    # Shuffling before a stable sort breaks ties at random: equal durations (e.g. 1 s keyword clips)
    # would otherwise be taken in manifest order, i.e. one folder first.
    perm = _shuffled(len(values), rng)
    return perm[np.argsort(-values[perm], kind="stable")]


def random_strategy(
    clips: Sequence[Clip], scores: Scores | None, budget: Budget, rng: random.Random
) -> Ranking:
    order = list(range(len(clips)))
    rng.shuffle(order)
    return _take(clips, order, budget)


def longest_strategy(
    clips: Sequence[Clip], scores: Scores | None, budget: Budget, rng: random.Random
) -> Ranking:
    durations = np.array([c.duration for c in clips], dtype=np.float64)
    return _take(clips, _highest_first(durations, rng), budget, durations)


def uncertainty_strategy(
    clips: Sequence[Clip], scores: Scores | None, budget: Budget, rng: random.Random
) -> Ranking:
    u = _uncertainty(scores)
    return _take(clips, _highest_first(u, rng), budget, u)


def _row_norms(x: np.ndarray, chunk: int) -> np.ndarray:
    norms = np.empty(len(x), dtype=np.float32)
    for s in range(0, len(x), chunk):
        norms[s : s + chunk] = np.linalg.norm(np.asarray(x[s : s + chunk], dtype=np.float32), axis=1)
    if not np.isfinite(norms).all():
        raise InputError("embeddings contain NaN or inf")
    # A zero embedding then sits at distance sqrt(2) from everything instead of producing NaN.
    return np.maximum(norms, 1e-12)


def _dot(block: np.ndarray, center: np.ndarray) -> np.ndarray:
    """``block @ center`` in float32. Half-precision rows go through torch: numpy has no fast float16
    kernel (converting a block each time costs 13x the product), torch's half matvec is as fast as
    numpy's float32 one and rounds only its result."""
    if block.dtype == np.float16:
        return torch.mv(torch.from_numpy(block), torch.from_numpy(center.astype(np.float16))).float().numpy()
    # einsum, not @: a threaded BLAS matvec on chunks this small stalls 10-50x on a busy machine.
    return np.einsum("ij,j->i", np.asarray(block, dtype=np.float32), center)


def k_center_greedy(
    embeddings: np.ndarray,
    durations: Sequence[float],
    budget: Budget,
    rng: random.Random,
    chunk: int = CHUNK,
) -> tuple[list[int], list[float | None]]:
    """Greedy k-center on L2-normalised ``embeddings`` within ``budget``.

    Starts from a random clip that fits, then repeatedly takes the clip farthest (Euclidean, after
    normalising) from those chosen. Returns the picks and each one's distance to the nearest earlier
    pick (``None`` for the first). Clips that no longer fit a seconds budget are skipped. Memory is
    O(N + chunk x D) beyond ``embeddings`` (float32 or float16, may be a memmap); time O(picks x N x D).
    """
    n = len(embeddings)
    dur = np.asarray(durations, dtype=np.float64)
    norms = _row_norms(embeddings, chunk)
    # Squared distance of each clip to its nearest pick; -inf marks clips chosen or no longer fitting.
    gap = np.full(n, np.inf, dtype=np.float32)
    picks: list[int] = []
    dists: list[float | None] = []
    spent = 0.0

    def drop_unfit() -> None:
        if budget.seconds is not None:
            gap[dur > budget.seconds - spent + 1e-9] = -np.inf

    drop_unfit()
    fitting = np.flatnonzero(gap > -np.inf)
    if not len(fitting) or budget.clips == 0:
        return picks, dists
    pick, dist = int(fitting[rng.randrange(len(fitting))]), None
    while True:
        picks.append(pick)
        dists.append(dist)
        spent += dur[pick]
        gap[pick] = -np.inf
        if budget.clips is not None and len(picks) >= budget.clips:
            break
        center = np.asarray(embeddings[pick], dtype=np.float32) / norms[pick]
        for s in range(0, n, chunk):
            rows = slice(s, s + chunk)
            cos = _dot(embeddings[rows], center) / norms[rows]
            np.minimum(gap[rows], np.maximum(2.0 - 2.0 * cos, 0.0), out=gap[rows])
        drop_unfit()
        pick = int(np.argmax(gap))
        if gap[pick] == -np.inf:
            break
        dist = float(np.sqrt(gap[pick]))
    return picks, dists


def diversity_strategy(
    clips: Sequence[Clip], scores: Scores | None, budget: Budget, rng: random.Random
) -> Ranking:
    picks, dists = k_center_greedy(scores.embeddings, [c.duration for c in clips], budget, rng)
    return Ranking(picks, dists)


def cluster_ids(embeddings: np.ndarray, rng: random.Random, k: int | None = None) -> np.ndarray:
    """MiniBatchKMeans labels of the L2-normalised embeddings.

    ``k`` defaults to ``min(MAX_CLUSTERS, N // 4)`` (at least 1): enough strata to spread a budget
    over the pool's variety, while clusters keep a few members each.
    """
    from sklearn.cluster import MiniBatchKMeans  # only the clustered strategies need scikit-learn

    n = len(embeddings)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    k = k or max(1, min(MAX_CLUSTERS, n // 4))
    x = np.empty((n, embeddings.shape[1]), dtype=np.float32)
    norms = _row_norms(embeddings, CHUNK)
    for s in range(0, n, CHUNK):
        rows = slice(s, s + CHUNK)
        x[rows] = np.asarray(embeddings[rows], dtype=np.float32) / norms[rows, None]
    km = MiniBatchKMeans(n_clusters=k, n_init=3, random_state=rng.randrange(2**31))
    return km.fit_predict(x).astype(np.int64)


def _interleave(labels: np.ndarray, grouped: np.ndarray, rng: random.Random) -> np.ndarray:
    """Merge clusters into one query order: a round over every cluster, then in proportion to size.

    ``grouped`` lists every index, cluster by cluster, each cluster in the order it should be taken.
    The j-th clip of a cluster of n gets priority j / n (Adams' divisor method): every cluster's first
    clip comes before any second one, and any prefix holds each cluster in proportion to its size
    give or take one clip. Ties go to the larger cluster, then to clusters in a random order.
    """
    lab = labels[grouped]
    sizes = np.bincount(labels)
    starts = np.cumsum(sizes) - sizes
    key = (np.arange(len(grouped)) - starts[lab]) / sizes[lab]
    tie = _shuffled(len(sizes), rng)
    return grouped[np.lexsort((tie[lab], -sizes[lab], key))]


def cluster_strategy(
    clips: Sequence[Clip], scores: Scores | None, budget: Budget, rng: random.Random
) -> Ranking:
    labels = cluster_ids(scores.embeddings, rng)
    perm = _shuffled(len(clips), rng)
    grouped = perm[np.argsort(labels[perm], kind="stable")]
    return _take(clips, _interleave(labels, grouped, rng), budget, labels, labels)


def hybrid_strategy(
    clips: Sequence[Clip], scores: Scores | None, budget: Budget, rng: random.Random
) -> Ranking:
    u = _uncertainty(scores)
    labels = cluster_ids(scores.embeddings, rng)
    perm = _shuffled(len(clips), rng)
    # By cluster, then most uncertain first; lexsort is stable, so ties keep the random order.
    grouped = perm[np.lexsort((-u[perm], labels[perm]))]
    return _take(clips, _interleave(labels, grouped, rng), budget, u, labels)


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("random", random_strategy, "uniformly at random"),
        Strategy("longest", longest_strategy, "longest clips first", score="duration (s)"),
        Strategy(
            "uncertainty",
            uncertainty_strategy,
            "highest stage-1 uncertainty first",
            ("uncertainty",),
            "uncertainty",
        ),
        Strategy(
            "diversity",
            diversity_strategy,
            "greedy k-center on the embeddings: each next clip the farthest from those chosen",
            ("embeddings",),
            "distance to the nearest earlier pick",
        ),
        Strategy(
            "cluster",
            cluster_strategy,
            "k-means on the embeddings; a clip of every cluster, then clusters in proportion to size",
            ("embeddings",),
            "cluster id",
        ),
        Strategy(
            "hybrid",
            hybrid_strategy,
            "as cluster, most uncertain first within each cluster",
            ("embeddings", "uncertainty"),
            "uncertainty",
        ),
    )
}


def _ranked(clips, budget: Budget, strategy: str, seed: int, scores: Scores | None):
    """The strategy's picks (indices into ``clips``, in query order) and their selection labels."""
    if strategy not in STRATEGIES:
        raise InputError(f"unknown strategy {strategy!r}; choose from {sorted(STRATEGIES)}")
    if scores is not None:
        try:
            scores = scores.aligned(clips)
        except KeyError as e:
            raise InputError(f"the scores do not cover the clips: {e.args[0]}") from None
    _check_needs(STRATEGIES[strategy], scores)
    picks = STRATEGIES[strategy].rank(clips, scores, budget, random.Random(seed))
    values = getattr(picks, "scores", None) or [None] * len(picks)
    clusters = getattr(picks, "clusters", None)
    infos = []
    for rank in range(len(picks)):
        info = {"strategy": strategy, "rank": rank, "score": values[rank]}
        if clusters is not None:
            info["cluster"] = clusters[rank]
        infos.append(info)
    return list(picks), infos


def select(
    clips: Sequence[Clip],
    budget: Budget,
    strategy: str = "random",
    seed: int = 0,
    scores: Scores | None = None,
) -> list[Clip]:
    """The chosen clips in query order, as copies labelled ``labels["selection"]``.

    The label is ``{"strategy", "rank", "score"}`` (plus ``"cluster"`` for the clustered strategies);
    see :attr:`Strategy.score`. ``scores`` may cover more clips than ``clips``, in any order.
    """
    picks, infos = _ranked(clips, budget, strategy, seed, scores)
    return [
        replace(clips[i], labels={**clips[i].labels, "selection": info})
        for i, info in zip(picks, infos, strict=True)
    ]


class _Brief(NamedTuple):
    id: str
    duration: float


class _Pool(Sequence):
    """What ranking reads of a pool (ids and durations), held as two columns instead of one object per
    clip: a clip costs its id (shared with the scores' when they match) and eight bytes."""

    def __init__(self, ids: list[str], durations: np.ndarray):
        self.ids, self.durations = ids, durations

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> _Brief:
        return _Brief(self.ids[i], float(self.durations[i]))


def select_from_manifest(
    path: str | os.PathLike,
    budget: str | Budget,
    strategy: str = "random",
    seed: int = 0,
    scores: Scores | None = None,
) -> tuple[list[Clip], int, float]:
    """:func:`select` over a manifest read twice and never held: once for what the strategy ranks
    by, once for the chosen clips. ``budget`` may be text (a percentage is of this pool). Returns the
    chosen clips and the pool's clips and seconds."""
    known = scores.ids if scores is not None else []
    ids, durations = [], array("d")
    for i, clip in enumerate(iter_manifest(path)):
        ids.append(known[i] if i < len(known) and known[i] == clip.id else clip.id)
        durations.append(clip.duration)
    pool = _Pool(ids, np.frombuffer(durations, dtype=np.float64))
    seconds = sum(durations)  # in file order, as a list of clips would sum them
    if isinstance(budget, str):
        budget = Budget.parse(budget, pool_seconds=seconds)
    picks, infos = _ranked(pool, budget, strategy, seed, scores)
    rank_of = {i: r for r, i in enumerate(picks)}
    chosen: list[Clip | None] = [None] * len(picks)
    for i, clip in enumerate(iter_manifest(path)):
        if i >= len(pool) or clip.id != pool[i].id:
            raise InputError(f"{path} changed while clips were being selected from it")
        if i in rank_of:
            r = rank_of[i]
            chosen[r] = replace(clip, labels={**clip.labels, "selection": infos[r]})
    return chosen, len(pool), seconds
