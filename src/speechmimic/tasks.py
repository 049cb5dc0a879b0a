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
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from speechmimic.corpus import Clip, read_manifest, write_manifest

KINDS = {"classify": "accuracy", "phones": "per", "chars": "wer"}
SPLITS = ("train", "dev", "test")


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
            raise ValueError(f"task {self.name} has no folder")
        return read_manifest(self.root / f"{name}.jsonl")

    def label(self, clip: Clip) -> str:
        if self.label_key not in clip.labels:
            raise KeyError(f"clip {clip.id} has no label {self.label_key!r} (task {self.name})")
        return str(clip.labels[self.label_key])

    def tokens(self, clip: Clip) -> list[str]:
        """The CTC target of a clip: phones, or characters with '|' between words."""
        text = self.label(clip)
        if self.kind == "phones":
            return text.split()
        if self.kind == "chars":
            return list("|".join(text.upper().split()))
        raise ValueError(f"task {self.name} is a {self.kind} task: no token sequence")


def write_task(
    root: str | os.PathLike,
    name: str,
    kind: str,
    label_key: str,
    splits: dict[str, Sequence[Clip]],
    description: str = "",
) -> Task:
    """Write a task folder; ``classes`` are collected from the splits in sorted order."""
    if kind not in KINDS:
        raise ValueError(f"unknown task kind {kind!r}; choose from {sorted(KINDS)}")
    missing = [s for s in SPLITS if not splits.get(s)]
    if missing:
        raise ValueError(f"task {name}: empty split(s) {missing}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    classes = []
    if kind == "classify":
        classes = sorted({str(c.labels[label_key]) for s in SPLITS for c in splits[s]})
    for s in SPLITS:
        write_manifest(list(splits[s]), root / f"{s}.jsonl")
    task = Task(name, kind, label_key, classes, description, root)
    meta = {k: v for k, v in asdict(task).items() if k != "root"} | {"metric": task.metric}
    (root / "task.json").write_text(json.dumps(meta, indent=2))
    return task


def load_task(root: str | os.PathLike) -> Task:
    root = Path(root)
    meta_path = root / "task.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{root} is not a task folder (no task.json)")
    meta = json.loads(meta_path.read_text())
    meta.pop("metric", None)
    return Task(**meta, root=root)
