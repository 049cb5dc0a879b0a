"""VoxCeleb1 speaker identification (SUPERB SID) and verification (SUPERB ASV) over ``wav/``.

Each line of ``iden_split.txt`` is ``<set> <speaker>/<video>/<utt>.wav`` with set 1 = train,
2 = dev, 3 = test; paths are relative to ``wav/``. Task ``sid`` (label ``speaker``, 1251 classes on
the full set). A listed file that is missing or unreadable is an error naming the line.

With a trial list (``trials_file``, VoxCeleb's ``veri_test.txt`` / ``veri_test2.txt``: lines
``<1|0> <path> <path>``), also task ``asv`` (kind ``verify``): test = the listed trials over the files
they name; the other speakers of ``iden_split.txt`` are the rest, as in the official protocol: their
set-1 files the train (background) split, their set-2 files the dev split, whose trials are seeded
pairs of them (pairs from one video left out).
"""

from __future__ import annotations

import os
from pathlib import Path

from tqdm import tqdm

from speechmimic.corpus import Clip
from speechmimic.errors import InputError
from speechmimic.recipes._common import clip_from_file, require_dir, require_file
from speechmimic.tasks import Task, all_trials, write_task

OPTIONS = {
    "split_file": "identification split list (default: ROOT/iden_split.txt)",
    "wav_dir": "folder the listed paths are relative to (default: ROOT/wav)",
    "trials_file": "verification trial list ('<1|0> <path> <path>', e.g. veri_test2.txt): adds task asv",
}

_SETS = {"1": "train", "2": "dev", "3": "test"}


def build(
    root: str | os.PathLike,
    out: str | os.PathLike,
    split_file: str | None = None,
    wav_dir: str | None = None,
    trials_file: str | None = None,
    progress: bool = True,
    seed: int = 0,
) -> list[Task]:
    """Write ``out/sid`` from the official identification split (and ``out/asv`` from a trial list)."""
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
            raise InputError(
                f"{split_path}:{lineno}: expected '<1|2|3> <speaker>/<video>/<utt>.wav', got {line!r}"
            )
        speaker, video, _ = rel.parts
        labels = {"speaker": speaker, "video": video}
        clip_id = rel.with_suffix("").as_posix().replace("/", "-")
        splits[_SETS[parts[0]]].append(
            clip_from_file(wav_root / rel, clip_id, labels, f"{split_path}:{lineno}")
        )
    description = f"VoxCeleb1 speaker identification, splits from {split_path.name} (1 train, 2 dev, 3 test)."
    tasks = [write_task(Path(out) / "sid", "sid", "classify", "speaker", splits, description)]
    if trials_file is not None:
        tasks.append(
            _verification(require_file(trials_file, "VoxCeleb1 trial list"), wav_root, splits, out, seed)
        )
    return tasks


def _verification(path: Path, wav_root: Path, sid: dict[str, list[Clip]], out, seed: int) -> Task:
    trials, test = [], {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3 or parts[0] not in ("0", "1") or any(len(Path(p).parts) != 3 for p in parts[1:]):
            raise InputError(
                f"{path}:{lineno}: expected '<1|0> <speaker>/<video>/<utt>.wav' twice, got {line!r}"
            )
        for rel in parts[1:]:
            if rel not in test:
                speaker, video, _ = Path(rel).parts
                clip_id = Path(rel).with_suffix("").as_posix().replace("/", "-")
                labels = {"speaker": speaker, "video": video}
                test[rel] = clip_from_file(wav_root / rel, clip_id, labels, f"{path}:{lineno}")
        trials.append((parts[0] == "1", test[parts[1]].id, test[parts[2]].id))
    tested = {c.labels["speaker"] for c in test.values()}
    rest = {s: [c for c in sid[s] if c.labels["speaker"] not in tested] for s in ("train", "dev")}
    splits = {"train": rest["train"], "dev": rest["dev"], "test": list(test.values())}
    dev_trials = all_trials(rest["dev"], "speaker", "video", seed)
    description = (
        f"VoxCeleb1 speaker verification: test trials from {path.name} ({len(tested)} speakers); "
        f"train (background) and dev from the other speakers' iden_split sets 1 and 2."
    )
    return write_task(
        Path(out) / "asv",
        "asv",
        "verify",
        "speaker",
        splits,
        description,
        {"dev": dev_trials, "test": trials},
    )
