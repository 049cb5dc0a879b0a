"""Clip selection under a query budget.

A strategy is a small function ``(clips, scores, budget, rng) -> list of indices, in the order they
should be queried``. ``scores`` holds whatever the strategy needs per clip (a loss, an embedding) or
is ``None``. ``Budget`` caps clips, seconds or both; ``take_within`` applies it to any ranking, so a
new strategy only has to rank. Register a strategy in ``STRATEGIES`` to expose it in the CLI.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from speechmimic.corpus import Clip


@dataclass
class Scores:
    """What informed strategies rank by, one row per candidate clip (in ``ids`` order).

    ``uncertainty``: higher = the stage-1 student knows the clip less (masked-prediction loss or
    predictive entropy). ``embeddings``: utterance embeddings (N, D) for diversity.
    """

    ids: list[str]
    uncertainty: np.ndarray | None = None
    embeddings: np.ndarray | None = None

    def save(self, path: str | os.PathLike) -> None:
        arrays = {"ids": np.array(self.ids)}
        if self.uncertainty is not None:
            arrays["uncertainty"] = np.asarray(self.uncertainty, dtype=np.float32)
        if self.embeddings is not None:
            arrays["embeddings"] = np.asarray(self.embeddings, dtype=np.float32)
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


@dataclass(frozen=True)
class Budget:
    """What may be spent: ``clips`` and/or ``seconds`` (``None`` = no cap on that axis)."""

    clips: int | None = None
    seconds: float | None = None

    @classmethod
    def parse(cls, text: str, pool_seconds: float | None = None, pool_clips: int | None = None) -> Budget:
        """``"200"`` clips, ``"600s"`` / ``"10m"`` / ``"1h"`` of audio, or ``"25%"`` of the pool's seconds."""
        text = text.strip().lower()
        try:
            if text.endswith("%"):
                if pool_seconds is None:
                    raise ValueError("a percentage budget needs the pool")
                return cls(seconds=float(text[:-1]) / 100 * pool_seconds)
            for suffix, scale in (("s", 1), ("m", 60), ("h", 3600)):
                if text.endswith(suffix):
                    return cls(seconds=float(text[:-1]) * scale)
            return cls(clips=int(text))
        except ValueError as e:
            raise ValueError(f"bad budget {text!r}: use N (clips), Ns/Nm/Nh (audio) or N% ({e})") from None


def take_within(clips: Sequence[Clip], ranking: Sequence[int], budget: Budget) -> list[int]:
    """Walk ``ranking`` and keep each clip that still fits the budget."""
    chosen, seconds = [], 0.0
    for i in ranking:
        if budget.clips is not None and len(chosen) >= budget.clips:
            break
        if budget.seconds is not None and seconds + clips[i].duration > budget.seconds + 1e-9:
            continue
        chosen.append(i)
        seconds += clips[i].duration
    return chosen


Strategy = Callable[[Sequence[Clip], "np.ndarray | None", Budget, random.Random], list[int]]


def random_strategy(
    clips: Sequence[Clip], scores: np.ndarray | None, budget: Budget, rng: random.Random
) -> list[int]:
    order = list(range(len(clips)))
    rng.shuffle(order)
    return take_within(clips, order, budget)


STRATEGIES: dict[str, Strategy] = {"random": random_strategy}


def select(
    clips: Sequence[Clip],
    budget: Budget,
    strategy: str = "random",
    seed: int = 0,
    scores: np.ndarray | None = None,
) -> list[Clip]:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {sorted(STRATEGIES)}")
    idx = STRATEGIES[strategy](clips, scores, budget, random.Random(seed))
    return [clips[i] for i in idx]
