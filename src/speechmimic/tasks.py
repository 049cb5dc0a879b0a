"""Downstream tasks on disk: what recipes write and what probes read.

A task is a folder::

    task.json      {"name", "kind", "label_key", "classes", "metric", "description"}
    train.jsonl    manifests (speechmimic.corpus format); the label of a clip is labels[label_key]
    dev.jsonl
    test.jsonl

Kinds:
- ``classify``: one label per clip (keyword spotting, speaker ID, intent, emotion); ``classes`` lists
  them in a fixed order; metric ``accuracy``.
- ``phones``: a space-separated phone string per clip ("h @ l oU"); frame-level CTC; metric ``per``.
- ``chars``: a transcript per clip; character CTC (word boundary "|"); metric ``wer``.
- ``verify``: speaker verification (SUPERB's ASV); ``label_key`` names the speaker; ``dev_trials.txt``
  and ``test_trials.txt`` hold one trial a line, ``<1|0> <clip id> <clip id>`` (1: same speaker), as
  VoxCeleb's ``veri_test.txt`` does with paths; metric ``eer``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from speechmimic.corpus import Clip, read_manifest, write_manifest
from speechmimic.errors import InputError, NotFound

KINDS = {"classify": "accuracy", "phones": "per", "chars": "wer", "verify": "eer"}
SPLITS = ("train", "dev", "test")
TRIAL_SPLITS = ("dev", "test")
MAX_TRIALS = 20_000


@dataclass
class Task:
    name: str
    kind: str
    label_key: str
    classes: list[str] = field(default_factory=list)
    description: str = ""
    root: Path | None = None

    @property
    def metric(self) -> str:
        return KINDS[self.kind]

    def split(self, name: str) -> list[Clip]:
        if self.root is None:
            raise InputError(f"task {self.name} has no folder")
        return read_manifest(self.root / f"{name}.jsonl")

    def label(self, clip: Clip) -> str:
        if self.label_key not in clip.labels:
            raise NotFound(f"clip {clip.id} has no label {self.label_key!r} (task {self.name})")
        return str(clip.labels[self.label_key])

    def tokens(self, clip: Clip) -> list[str]:
        """The CTC target of a clip: phones, or characters with '|' between words."""
        text = self.label(clip)
        if self.kind == "phones":
            return text.split()
        if self.kind == "chars":
            return list("|".join(text.upper().split()))
        raise InputError(f"task {self.name} is a {self.kind} task: no token sequence")

    def trials(self, split: str) -> list[tuple[bool, str, str]]:
        """A verification split's trials: (same speaker, clip id, clip id)."""
        if self.kind != "verify" or self.root is None:
            raise InputError(f"task {self.name} is a {self.kind} task: no trials")
        path = self.root / f"{split}_trials.txt"
        out = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 3 or parts[0] not in ("0", "1"):
                raise InputError(f"{path}:{lineno}: expected '<1|0> <clip id> <clip id>', got {line!r}")
            out.append((parts[0] == "1", parts[1], parts[2]))
        return out


def all_trials(
    clips: Sequence[Clip],
    label_key: str,
    group_key: str | None = None,
    seed: int = 0,
    limit: int = MAX_TRIALS,
) -> list[tuple[bool, str, str]]:
    """Every pair of ``clips`` as a trial (same ``label_key`` or not), pairs of one ``group_key``
    (crops of one recording) left out; a seeded sample of ``limit`` when there are more, keeping
    every same-speaker trial it can (they are the rare ones)."""
    i, j = np.triu_indices(len(clips), 1)
    if group_key is not None:
        groups = np.array([str(c.labels[group_key]) for c in clips])
        keep = groups[i] != groups[j]
        i, j = i[keep], j[keep]
    speakers = np.array([str(c.labels[label_key]) for c in clips])
    same = speakers[i] == speakers[j]
    rng = np.random.default_rng(seed)
    if len(i) > limit:
        pos, neg = np.flatnonzero(same), np.flatnonzero(~same)
        pos = rng.permutation(pos)[: limit // 2]
        neg = rng.permutation(neg)[: limit - len(pos)]
        chosen = np.sort(np.concatenate([pos, neg]))
        i, j, same = i[chosen], j[chosen], same[chosen]
    return [(bool(t), clips[a].id, clips[b].id) for t, a, b in zip(same, i, j, strict=True)]


def write_task(
    root: str | os.PathLike,
    name: str,
    kind: str,
    label_key: str,
    splits: dict[str, Sequence[Clip]],
    description: str = "",
    trials: dict[str, Sequence[tuple[bool, str, str]]] | None = None,
) -> Task:
    """Write a task folder; ``classes`` are collected from the splits in sorted order. A ``verify``
    task takes ``trials`` for dev and test (default: :func:`all_trials` of each split's clips)."""
    if kind not in KINDS:
        raise InputError(f"unknown task kind {kind!r}; choose from {sorted(KINDS)}")
    missing = [s for s in SPLITS if not splits.get(s)]
    if missing:
        raise InputError(f"task {name}: empty split(s) {missing}")
    if trials is not None and kind != "verify":
        raise InputError(f"task {name}: only a verify task has trials")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    classes = []
    if kind == "classify":
        classes = sorted({str(c.labels[label_key]) for s in SPLITS for c in splits[s]})
    for s in SPLITS:
        write_manifest(list(splits[s]), root / f"{s}.jsonl")
    if kind == "verify":
        for s in TRIAL_SPLITS:
            given = (trials or {}).get(s)
            listed = list(given) if given is not None else all_trials(splits[s], label_key)
            _write_trials(root / f"{s}_trials.txt", f"task {name}, {s}", {c.id for c in splits[s]}, listed)
    task = Task(name, kind, label_key, classes, description, root)
    meta = {k: v for k, v in asdict(task).items() if k != "root"} | {"metric": task.metric}
    (root / "task.json").write_text(json.dumps(meta, indent=2))
    return task


def _write_trials(path: Path, where: str, ids: set[str], trials: list[tuple[bool, str, str]]) -> None:
    unknown = [x for _, a, b in trials for x in (a, b) if x not in ids]
    if unknown:
        raise InputError(f"{where}: trials name clips not in the split, e.g. {unknown[:3]}")
    spaced = sorted({x for _, a, b in trials for x in (a, b) if len(x.split()) != 1})
    if spaced:
        raise InputError(f"{where}: a trial line cannot name clip ids with spaces, e.g. {spaced[:3]}")
    if not any(t for t, _, _ in trials) or all(t for t, _, _ in trials):
        raise InputError(f"{where}: trials need same-speaker and different-speaker pairs")
    path.write_text("".join(f"{int(t)} {a} {b}\n" for t, a, b in trials), encoding="utf-8")


def load_task(root: str | os.PathLike) -> Task:
    root = Path(root)
    meta_path = root / "task.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{root} is not a task folder (no task.json)")
    meta = json.loads(meta_path.read_text())
    meta.pop("metric", None)
    return Task(**meta, root=root)
