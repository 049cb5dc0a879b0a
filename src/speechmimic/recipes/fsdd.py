"""Free Spoken Digit Dataset: ``{digit}_{speaker}_{index}.wav`` anywhere under the root.

Task ``digits`` (label ``digit``, 10 classes): the usual split puts takes with index 0-4 in test;
index 5-9 is dev and the rest (10-49) train, so every speaker appears in every split. With
``sid=True`` also task ``fsdd_sid`` (label ``speaker``; 6 speakers in the release) on the same
per-speaker split by take index. Unreadable or silent files are skipped (counted in the
description).
"""

from __future__ import annotations

import os
from pathlib import Path

from speechmimic.corpus import scan
from speechmimic.errors import InputError
from speechmimic.recipes._common import require_dir
from speechmimic.tasks import SPLITS, Task, write_task

OPTIONS = {"sid": "also write the speaker-identification task fsdd_sid (default false)"}


def _split(index: int) -> str:
    return "test" if index < 5 else "dev" if index < 10 else "train"


def build(
    root: str | os.PathLike, out: str | os.PathLike, sid: bool = False, progress: bool = True
) -> list[Task]:
    """Write ``out/digits`` (and ``out/fsdd_sid``)."""
    root = require_dir(root, "FSDD root (or its recordings/ folder)")
    result = scan(root, layout="fsdd", progress=progress)
    if not result.clips:
        raise InputError(f"{root}: no {{digit}}_{{speaker}}_{{index}}.wav files found (FSDD layout)")
    splits = {s: [] for s in SPLITS}
    for clip in result.clips:
        clip.labels["split"] = _split(clip.labels["index"])
        splits[clip.labels["split"]].append(clip)
    note = f" Skipped {len(result.skipped)} unreadable or silent file(s)." if result.skipped else ""
    rule = "test = take index 0-4, dev = 5-9, train = the rest"
    out = Path(out)
    tasks = [write_task(out / "digits", "digits", "classify", "digit", splits, f"FSDD digits; {rule}.{note}")]
    if sid:
        description = f"FSDD speaker identification; {rule} (every speaker in every split).{note}"
        tasks.append(write_task(out / "fsdd_sid", "fsdd_sid", "classify", "speaker", splits, description))
    return tasks
