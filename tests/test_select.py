from __future__ import annotations

import json
import random
import time
import tracemalloc

import numpy as np
import pytest

from speechmimic.budget import Budget
from speechmimic.cli import main
from speechmimic.corpus import Clip, read_manifest, write_manifest
from speechmimic.score import Scores
from speechmimic.select import STRATEGIES, k_center_greedy, select


def _clips(n: int, rs: np.random.Generator) -> list[Clip]:
    durations = rs.uniform(0.5, 6.0, n).round(3).tolist()
    return [Clip(f"c{i:04d}", f"c{i:04d}.wav", 16000, int(d * 16000), d) for i, d in enumerate(durations)]


def _blobs(per_blob: int = 40, blobs: int = 5, dim: int = 16, seed: int = 0):
    """Clips in well-separated Gaussian blobs: clips, scores (uncertainty unrelated to blobs), blob ids."""
    rs = np.random.default_rng(seed)
    centers = rs.standard_normal((blobs, dim)) * 10
    blob = np.repeat(np.arange(blobs), per_blob)
    emb = centers[blob] + rs.standard_normal((len(blob), dim)) * 0.3
    clips = _clips(len(blob), rs)
    return clips, Scores([c.id for c in clips], rs.random(len(clips)), emb), blob


@pytest.fixture(scope="module")
def pool():
    return _blobs()


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_budgets_and_determinism(pool, strategy):
    clips, scores, _ = pool
    by_clips = select(clips, Budget(clips=12), strategy, seed=3, scores=scores)
    assert len(by_clips) == 12 and len({c.id for c in by_clips}) == 12
    assert by_clips == select(clips, Budget(clips=12), strategy, seed=3, scores=scores)
    by_seconds = select(clips, Budget(seconds=30), strategy, seed=3, scores=scores)
    assert 0 < sum(c.duration for c in by_seconds) <= 30
    both = select(clips, Budget(clips=4, seconds=30), strategy, seed=3, scores=scores)
    assert len(both) <= 4 and sum(c.duration for c in both) <= 30
    assert [c.labels["selection"]["rank"] for c in by_clips] == list(range(12))
    assert all(c.labels["selection"]["strategy"] == strategy for c in by_clips)
    assert all("selection" not in c.labels for c in clips)  # copies: the caller's clips are untouched
    json.dumps([c.to_dict() for c in by_clips])  # scores are plain JSON values


def test_longest_and_uncertainty_take_the_highest(pool):
    clips, scores, _ = pool
    longest = select(clips, Budget(clips=5), "longest")
    assert [c.duration for c in longest] == sorted((c.duration for c in clips), reverse=True)[:5]
    assert [c.labels["selection"]["score"] for c in longest] == [c.duration for c in longest]
    top = select(clips, Budget(clips=5), "uncertainty", scores=scores)
    expected = np.argsort(-scores.uncertainty)[:5]
    assert [c.id for c in top] == [clips[i].id for i in expected]
    assert [c.labels["selection"]["score"] for c in top] == pytest.approx(scores.uncertainty[expected])


def test_scores_are_aligned_by_id(pool):
    clips, scores, _ = pool
    shuffled = list(reversed(clips))
    assert [c.id for c in select(shuffled, Budget(clips=5), "uncertainty", scores=scores)] == [
        c.id for c in select(clips, Budget(clips=5), "uncertainty", scores=scores)
    ]
    with pytest.raises(ValueError, match="do not cover"):
        extra = Clip("new", "new.wav", 16000, 16000, 1.0)
        select(clips + [extra], Budget(clips=3), "diversity", scores=scores)


def test_diversity_covers_separated_blobs(pool):
    clips, scores, blob = pool
    index = {c.id: i for i, c in enumerate(clips)}
    for seed in range(3):
        chosen = select(clips, Budget(clips=5), "diversity", seed=seed, scores=scores)
        assert sorted(blob[index[c.id]] for c in chosen) == [0, 1, 2, 3, 4]
        dists = [c.labels["selection"]["score"] for c in chosen]
        assert dists[0] is None and all(d > 1.0 for d in dists[1:])  # normalised: at most 2


def _reference_k_center(emb, durations, budget, rng):
    """Unchunked greedy k-center with the full N x N distance matrix, for small N."""
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    fits = [i for i in range(len(x)) if budget.seconds is None or durations[i] <= budget.seconds]
    picks = [fits[rng.randrange(len(fits))]]
    spent = durations[picks[0]]
    while budget.clips is None or len(picks) < budget.clips:
        left = [
            i
            for i in range(len(x))
            if i not in picks and (budget.seconds is None or spent + durations[i] <= budget.seconds + 1e-9)
        ]
        if not left:
            break
        gap = d[np.ix_(left, picks)].min(axis=1)
        picks.append(left[int(np.argmax(gap))])
        spent += durations[picks[-1]]
    return picks


@pytest.mark.parametrize("budget", [Budget(clips=15), Budget(seconds=40), Budget(clips=30, seconds=60)])
def test_chunked_k_center_equals_reference(budget):
    rs = np.random.default_rng(1)
    emb = rs.standard_normal((60, 8))
    durations = rs.uniform(0.5, 6.0, 60).tolist()
    picks, dists = k_center_greedy(emb, durations, budget, random.Random(5), chunk=7)
    assert picks == _reference_k_center(emb, durations, budget, random.Random(5))
    assert dists[0] is None and all(a >= b - 1e-6 for a, b in zip(dists[1:], dists[2:], strict=False))


@pytest.mark.parametrize("strategy", ["cluster", "hybrid"])
def test_clustered_strategies_draw_from_every_cluster(pool, strategy):
    clips, scores, blob = pool
    index = {c.id: i for i, c in enumerate(clips)}
    everything = select(clips, Budget(clips=len(clips)), strategy, seed=2, scores=scores)
    cluster = {c.id: c.labels["selection"]["cluster"] for c in everything}
    sizes = np.bincount(list(cluster.values()))
    assert len(sizes) <= 50  # k = min(50, N // 4); k-means may leave a cluster empty
    present = np.flatnonzero(sizes)
    k = len(present)
    first_round = select(clips, Budget(clips=k), strategy, seed=2, scores=scores)
    assert first_round == everything[:k]  # the same clustering for a seed, whatever the budget
    assert sorted(cluster[c.id] for c in first_round) == present.tolist()
    assert {int(blob[index[c.id]]) for c in first_round} == {0, 1, 2, 3, 4}
    # Past the first round, each cluster holds its share of the budget, give or take one clip.
    b = 120
    counts = np.bincount([cluster[c.id] for c in everything[:b]], minlength=len(sizes))
    assert np.all(counts >= np.floor(sizes * (b - k) / len(clips)))
    assert np.all(counts <= np.ceil(sizes * b / len(clips)) + 1)
    if strategy == "hybrid":
        # Within a cluster the most uncertain come first.
        by_cluster: dict[int, list[float]] = {}
        for c in everything:
            by_cluster.setdefault(cluster[c.id], []).append(c.labels["selection"]["score"])
        assert all(u == sorted(u, reverse=True) for u in by_cluster.values())


@pytest.mark.parametrize(
    "strategy,what",
    [
        ("uncertainty", "uncertainty"),
        ("diversity", "embeddings"),
        ("cluster", "embeddings"),
        ("hybrid", "embeddings"),
    ],
)
def test_missing_scores_is_a_clear_error(pool, strategy, what):
    clips, scores, _ = pool
    with pytest.raises(ValueError, match=f"{strategy}.*needs.*{what}.*speechmimic score"):
        select(clips, Budget(clips=3), strategy)
    partial = Scores(scores.ids, uncertainty=scores.uncertainty if what == "embeddings" else None)
    with pytest.raises(ValueError, match=f"needs.*{what}"):
        select(clips, Budget(clips=3), strategy, scores=partial)


def test_half_precision_embeddings_cover_as_well():
    # What `score` writes: unit-length float16 rows. Blobs of clips, as stage-1 embeddings form them.
    rs = np.random.default_rng(3)
    centres = rs.standard_normal((40, 32))
    emb = (centres[rs.integers(0, 40, 4000)] + 0.3 * rs.standard_normal((4000, 32))).astype(np.float32)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)

    def radius(picks):  # the k-center objective, measured on the float32 rows
        return np.sqrt(np.maximum(2 - 2 * (unit @ unit[picks].T).max(axis=1), 0)).max()

    full, _ = k_center_greedy(emb, np.ones(4000), Budget(clips=200), random.Random(0))
    half, _ = k_center_greedy(unit.astype(np.float16), np.ones(4000), Budget(clips=200), random.Random(0))
    assert len(set(full) & set(half)) >= 190
    assert radius(half) <= radius(full) * 1.01


def test_diversity_scales_without_a_pairwise_matrix():
    n, dim = 100_000, 64
    emb = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    tracemalloc.start()
    t = time.perf_counter()
    picks, _ = k_center_greedy(emb, np.ones(n), Budget(clips=200), random.Random(0))
    elapsed = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(set(picks)) == 200
    assert elapsed < 10
    assert peak < 16 * 2**20  # O(N + chunk x D) floats; a 100k x 100k distance matrix would be 40 GB


def test_cli_writes_the_manifest_with_scores(tmp_path, pool, capsys):
    clips, scores, _ = pool
    write_manifest(clips, tmp_path / "pool.jsonl")
    scores.save(tmp_path / "scores.npz")
    argv = ["select", "--manifest", str(tmp_path / "pool.jsonl"), "--budget", "8", "--out"]
    informed = ["--strategy", "hybrid", "--scores", str(tmp_path / "scores.npz")]
    assert main(argv + [str(tmp_path / "sel.jsonl")] + informed) == 0
    out = capsys.readouterr().out
    assert "selected 8 of 200 clips" in out and "hybrid" in out and "uncertainty" in out
    chosen = read_manifest(tmp_path / "sel.jsonl")
    assert len(chosen) == 8
    assert [c.labels["selection"]["rank"] for c in chosen] == list(range(8))
    row = {i: k for k, i in enumerate(scores.ids)}
    assert [c.labels["selection"]["score"] for c in chosen] == pytest.approx(
        [scores.uncertainty[row[c.id]] for c in chosen]
    )
    # Without scores an informed strategy fails with the way to get them.
    assert main(argv + [str(tmp_path / "x.jsonl"), "--strategy", "diversity"]) == 2
    assert "speechmimic score" in capsys.readouterr().err


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_selecting_from_a_manifest_never_held_is_selecting_from_the_list(pool, strategy, tmp_path):
    from speechmimic.select import select_from_manifest

    clips, scores, _ = pool
    write_manifest(clips, tmp_path / "m.jsonl")
    listed = select(read_manifest(tmp_path / "m.jsonl"), Budget(seconds=40), strategy, seed=5, scores=scores)
    chosen, n, seconds = select_from_manifest(tmp_path / "m.jsonl", "40s", strategy, seed=5, scores=scores)
    assert chosen == listed and n == len(clips) and seconds == pytest.approx(sum(c.duration for c in clips))
    pct, _, _ = select_from_manifest(tmp_path / "m.jsonl", "10%", strategy, seed=5, scores=scores)
    assert sum(c.duration for c in pct) <= 0.1 * seconds + 1e-6
