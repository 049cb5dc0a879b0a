"""Fluent Speech Commands intent classification (SUPERB IC).

``data/{train,valid,test}_data.csv`` with columns ``path, speakerId, transcription, action,
object, location`` (plus a leading index column); paths are relative to the dataset root. Task
``ic`` (label ``intent`` = ``"action|object|location"``, 31 classes on the full set); the clips
also carry ``action``, ``object``, ``location``, ``speaker`` and ``text``.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from tqdm import tqdm

from speechmimic.corpus import Clip
from speechmimic.errors import InputError
from speechmimic.recipes._common import clip_from_file, require_dir, require_file
from speechmimic.tasks import Task, write_task

OPTIONS: dict[str, str] = {}

_FILES = {"train": "train_data.csv", "dev": "valid_data.csv", "test": "test_data.csv"}
_COLUMNS = ("path", "speakerId", "transcription", "action", "object", "location")


def build(root: str | os.PathLike, out: str | os.PathLike, progress: bool = True) -> list[Task]:
    """Write ``out/ic`` from the three official CSV splits."""
    root = require_dir(root, "Fluent Speech Commands root")
    splits = {name: _read(root, name, progress) for name in _FILES}
    description = "Fluent Speech Commands intent (action|object|location), official train/valid/test CSVs."
    return [write_task(Path(out) / "ic", "ic", "classify", "intent", splits, description)]


def _read(root: Path, split: str, progress: bool) -> list[Clip]:
    path = require_file(root / "data" / _FILES[split], f"Fluent Speech Commands {split} list")
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if rows and (missing := [c for c in _COLUMNS if c not in rows[0]]):
        raise InputError(f"{path}: missing column(s) {missing}; expected {', '.join(_COLUMNS)}")
    clips = []
    for lineno, row in enumerate(tqdm(rows, desc=f"fluent {split}", disable=not progress), 2):
        action, obj, location = row["action"], row["object"], row["location"]
        labels = {
            "intent": f"{action}|{obj}|{location}",
            "action": action,
            "object": obj,
            "location": location,
            "speaker": row["speakerId"],
            "text": row["transcription"],
        }
        clip_id = f"{row['speakerId']}-{Path(row['path']).stem}"
        clips.append(clip_from_file(root / row["path"], clip_id, labels, f"{path}:{lineno}"))
    return clips
