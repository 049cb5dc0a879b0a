"""VoxCeleb1 speaker identification (SUPERB SID): ``iden_split.txt`` over ``wav/``.

Each line of ``iden_split.txt`` is ``<set> <speaker>/<video>/<utt>.wav`` with set 1 = train,
2 = dev, 3 = test; paths are relative to ``wav/``. Task ``sid`` (label ``speaker``, 1251 classes on
the full set). A listed file that is missing or unreadable is an error naming the line.
"""

from __future__ import annotations

import os
from pathlib import Path

from tqdm import tqdm

from speechmimic.corpus import Clip
from speechmimic.recipes._common import clip_from_file, require_dir, require_file
from speechmimic.tasks import Task, write_task

OPTIONS = {
    "split_file": "identification split list (default: ROOT/iden_split.txt)",
    "wav_dir": "folder the listed paths are relative to (default: ROOT/wav)",
}

_SETS = {"1": "train", "2": "dev", "3": "test"}


def build(
    root: str | os.PathLike,
    out: str | os.PathLike,
    split_file: str | None = None,
    wav_dir: str | None = None,
    progress: bool = True,
) -> list[Task]:
    """Write ``out/sid`` from the official identification split."""
    root = require_dir(root, "VoxCeleb1 root")
    split_path = require_file(split_file or root / "iden_split.txt", "VoxCeleb1 identification split list")
    wav_root = require_dir(wav_dir or root / "wav", "VoxCeleb1 wav folder")
    splits: dict[str, list[Clip]] = {"train": [], "dev": [], "test": []}
    lines = split_path.read_text(encoding="utf-8").splitlines()
    for lineno, line in enumerate(tqdm(lines, desc="voxceleb1", unit="file", disable=not progress), 1):
        if not line.strip():
            continue
        parts = line.split()
        rel = Path(parts[1]) if len(parts) == 2 else None
        if parts[0] not in _SETS or rel is None or len(rel.parts) != 3:
            raise ValueError(
                f"{split_path}:{lineno}: expected '<1|2|3> <speaker>/<video>/<utt>.wav', got {line!r}"
            )
        speaker, video, _ = rel.parts
        labels = {"speaker": speaker, "video": video}
        clip_id = rel.with_suffix("").as_posix().replace("/", "-")
        splits[_SETS[parts[0]]].append(
            clip_from_file(wav_root / rel, clip_id, labels, f"{split_path}:{lineno}")
        )
    description = f"VoxCeleb1 speaker identification, splits from {split_path.name} (1 train, 2 dev, 3 test)."
    return [write_task(Path(out) / "sid", "sid", "classify", "speaker", splits, description)]
