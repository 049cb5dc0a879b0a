"""Helpers shared by the recipes: clips from metadata, seeded hash splits, input checks."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from speechmimic.audio import AudioError, audio_info
from speechmimic.corpus import Clip
from speechmimic.errors import InputError

FRACTIONS = (0.6, 0.2, 0.2)  # train, dev, test of the per-group splits


def require_dir(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise NotADirectoryError(f"{path}: not a directory ({what})")
    return path


def require_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file ({what})")
    return path


def clip_from_file(path: Path, clip_id: str, labels: dict, source: str) -> Clip:
    """A whole-file clip from its header only (metadata-driven recipes list far more files than scan
    should decode); ``source`` names the listing that referenced the file, for the error message."""
    try:
        sr, frames, _ = audio_info(path)
    except AudioError as e:
        raise AudioError(path, f"{e.reason} (listed in {source})") from e
    return Clip(clip_id, str(path), sr, frames, frames / sr, 0.0, labels)


def hash_key(key: str, seed: int) -> str:
    # sha1 rather than hash(): stable across processes and Python versions.
    return hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()


def split_counts(n: int, fractions: Sequence[float] = FRACTIONS) -> tuple[int, int, int]:
    """(train, dev, test) counts for ``n`` items: dev and test round their fraction, at least 1 each."""
    if n < 3:
        raise InputError(f"{n} item(s) cannot fill train, dev and test")
    test = max(1, round(fractions[2] * n))
    dev = max(1, round(fractions[1] * n))
    return n - dev - test, dev, test


def split_items(
    items: Iterable, key: Callable[[object], str], seed: int, fractions: Sequence[float] = FRACTIONS
) -> dict[str, list]:
    """Deterministic train/dev/test split of one group: items ranked by a seeded hash of their key."""
    ranked = sorted(items, key=lambda item: hash_key(key(item), seed))
    n_train, n_dev, _ = split_counts(len(ranked), fractions)
    return {
        "train": ranked[:n_train],
        "dev": ranked[n_train : n_train + n_dev],
        "test": ranked[n_train + n_dev :],
    }


def split_by_group(
    clips: Iterable[Clip],
    group: Callable[[Clip], str],
    seed: int,
    fractions: Sequence[float] = FRACTIONS,
    what: str = "group",
) -> dict[str, list[Clip]]:
    """Split every group (e.g. speaker) on its own, so every group appears in train, dev and test."""
    groups: dict[str, list[Clip]] = {}
    for clip in clips:
        groups.setdefault(group(clip), []).append(clip)
    out: dict[str, list[Clip]] = {"train": [], "dev": [], "test": []}
    for name in sorted(groups):
        try:
            parts = split_items(groups[name], lambda c: c.id, seed, fractions)
        except ValueError as e:
            raise InputError(f"{what} {name!r}: {e}") from e
        for split, part in parts.items():
            out[split].extend(part)
    return out
