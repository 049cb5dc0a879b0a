"""Speech Commands v0.01 (``<word>/<hash>_nohash_<n>.wav``, ``validation_list.txt``, ``testing_list.txt``).

Protocols:

``ks12`` (task ``ks12``, label ``keyword``)
    SUPERB keyword spotting: the 10 keywords keep their label, every other word is ``_unknown_``,
    and ``_silence_`` clips are 1-s crops cut from ``_background_noise_/*.wav`` (clips with an
    offset into those files; seeded). Each split gets ``ceil(silence_fraction * n)`` crops, ``n``
    being its number of word clips (TensorFlow's ``silence_percentage``; s3prl instead re-crops the
    six noise files at random on every epoch, which fixed seeded crops make reproducible). Splits:
    ``validation_list.txt`` is dev, ``testing_list.txt`` test, the rest train. With ``test_root``
    (SUPERB uses ``speech_commands_test_set_v0.01``, folders named after the 12 classes) that
    folder is the test split instead and no crops are added to it.
``words`` (task ``words``, label ``word``)
    One class per word folder (30 in v0.01). ``split="lists"`` uses the two lists as above;
    ``split="speaker"`` splits each word on its own 60/20/20 by speaker: speakers are ranked by a
    seeded hash and whole speakers go to test until it holds >= 20% of the word's clips, then to
    dev likewise, the rest to train. ``split="auto"`` (default) uses the lists unless some word
    would then have no clip in one of the splits -- as in small subsets, whose lists leave words
    without test clips -- and the speaker split for every word otherwise.

Files that do not decode or are silent are skipped (counted in the task description).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from speechmimic.audio import audio_info
from speechmimic.corpus import Clip, scan
from speechmimic.errors import InputError
from speechmimic.recipes._common import hash_key, require_dir, split_counts
from speechmimic.tasks import SPLITS, Task, write_task

KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
UNKNOWN = "_unknown_"
SILENCE = "_silence_"
KS12_CLASSES = (*KEYWORDS, UNKNOWN, SILENCE)
PROTOCOLS = ("ks12", "words")
SPLIT_RULES = ("auto", "lists", "speaker")
NOISE_DIR = "_background_noise_"

OPTIONS = {
    "protocol": "'ks12': SUPERB's 10 keywords + _unknown_ + _silence_; 'words': one class per word folder",
    "test_root": "ks12 only: separate test set folder (speech_commands_test_set_v0.01) used as test split",
    "silence_fraction": "ks12: _silence_ crops per split as a fraction of its word clips (default 0.1)",
    "split": "words only: 'lists' (validation/testing lists), 'speaker' (per word 60/20/20 by hashed "
    "speaker) or 'auto' (lists unless a word would lack a train/dev/test clip; default)",
}

_LIST_SPLIT = {"train": "train", "validation": "dev", "test": "test"}


def build(
    root: str | os.PathLike,
    out: str | os.PathLike,
    protocol: str = "ks12",
    test_root: str | None = None,
    silence_fraction: float = 0.1,
    split: str = "auto",
    seed: int = 0,
    progress: bool = True,
) -> list[Task]:
    """Write ``out/ks12`` or ``out/words``; see the module docstring for the protocols."""
    root = require_dir(root, "Speech Commands root")
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown Speech Commands protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    if split not in SPLIT_RULES:
        raise InputError(f"unknown split rule {split!r}; choose from {', '.join(SPLIT_RULES)}")
    if protocol == "words" and test_root is not None:
        raise InputError("test_root applies to protocol 'ks12' only (its folders are the 12 SUPERB classes)")
    if protocol == "ks12" and split != "auto":
        raise InputError("split applies to protocol 'words' only: ks12 follows the SUPERB lists")
    if silence_fraction < 0:
        raise InputError(f"silence_fraction must be >= 0, got {silence_fraction}")

    result = scan(root, layout="speech_commands", progress=progress)
    if not result.clips:
        raise InputError(f"{root}: no <word>/<hash>_nohash_<n>.wav clips found (Speech Commands layout)")
    skipped = [p for p, reason in result.skipped if NOISE_DIR not in Path(p).parts]
    note = f" Skipped {len(skipped)} unreadable or silent file(s)." if skipped else ""
    if protocol == "words":
        return [_words(result.clips, Path(out), split, seed, note)]
    return [_ks12(root, result.clips, Path(out), test_root, silence_fraction, seed, progress, note)]


def _list_splits(clips: list[Clip]) -> dict[str, list[Clip]]:
    splits: dict[str, list[Clip]] = {s: [] for s in SPLITS}
    for clip in clips:
        splits[_LIST_SPLIT[clip.labels["split"]]].append(clip)
    return splits


def _ks12(root, clips, out, test_root, silence_fraction, seed, progress, note) -> Task:
    for clip in clips:
        word = clip.labels["word"]
        clip.labels["keyword"] = word if word in KEYWORDS else UNKNOWN
    splits = _list_splits(clips)
    if test_root is not None:
        splits["test"] = _test_set(Path(test_root), progress)
    noise = _noise_files(root)
    for i, name in enumerate(SPLITS):
        if name == "test" and test_root is not None:
            continue
        count = math.ceil(silence_fraction * len(splits[name]))
        splits[name] += _silence_crops(noise, count, np.random.default_rng([seed, i]), name)
    test_from = f"the test set {test_root}" if test_root is not None else "testing_list.txt"
    description = (
        f"SUPERB keyword spotting on Speech Commands v0.01 ({root}): 10 keywords, {UNKNOWN} (all other "
        f"words) and {SILENCE} (seeded 1-s crops of {NOISE_DIR}, seed {seed}, {silence_fraction:g} x "
        f"split size); dev = validation_list.txt, test = {test_from}.{note}"
    )
    if missing := set(KS12_CLASSES) - {c.labels["keyword"] for s in SPLITS for c in splits[s]}:
        raise InputError(f"{root}: no clip of class(es) {sorted(missing)}: too few clips for SUPERB KS")
    return write_task(out / "ks12", "ks12", "classify", "keyword", splits, description)


def _noise_files(root: Path) -> list[tuple[Path, int, int]]:
    """(path, sampling rate, frames) of the background noise recordings that last at least 1 s."""
    folder = root / NOISE_DIR
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: missing; ks12 cuts its {SILENCE} clips from it (use protocol 'words' without it)"
        )
    files = []
    for path in sorted(folder.glob("*.wav")):
        sr, frames, _ = audio_info(path)
        if frames >= sr:
            files.append((path, sr, frames))
    if not files:
        raise InputError(f"{folder}: no noise recording of at least 1 s to cut {SILENCE} clips from")
    return files


def _silence_crops(noise, count: int, rng: np.random.Generator, split: str) -> list[Clip]:
    clips = []
    for k in range(count):
        path, sr, frames = noise[rng.integers(len(noise))]
        start = int(rng.integers(frames - sr + 1))
        labels = {"word": SILENCE, "keyword": SILENCE, "source": path.name}
        clips.append(Clip(f"{SILENCE}-{split}-{k:05d}", str(path), sr, sr, 1.0, start / sr, labels))
    return clips


def _test_set(test_root: Path, progress: bool) -> list[Clip]:
    require_dir(test_root, "Speech Commands test set (test_root)")
    result = scan(test_root, layout="plain", progress=progress)
    clips = [c for c in result.clips if "folder" in c.labels]
    if not clips:
        raise InputError(f"{test_root}: no clips in class folders (expected <class>/<file>.wav)")
    if unknown := {c.labels["folder"] for c in clips} - set(KS12_CLASSES):
        raise InputError(
            f"{test_root}: folder(s) {sorted(unknown)} are not SUPERB KS classes ({', '.join(KS12_CLASSES)})"
        )
    for clip in clips:
        folder = clip.labels.pop("folder")
        clip.labels.update(word=folder, keyword=folder)
    return clips


def _words(clips: list[Clip], out: Path, rule: str, seed: int, note: str) -> Task:
    splits = _list_splits(clips)
    if rule == "auto":
        words = {c.labels["word"] for c in clips}
        complete = all(words == {c.labels["word"] for c in splits[s]} for s in SPLITS)
        rule = "lists" if complete else "speaker"
    if rule == "speaker":
        splits = _speaker_splits(clips, seed)
        how = f"per word 60/20/20 by seeded speaker hash (seed {seed})"
    else:
        how = "dev = validation_list.txt, test = testing_list.txt"
    description = f"Speech Commands, one class per word; split: {how}.{note}"
    return write_task(out / "words", "words", "classify", "word", splits, description)


def _speaker_splits(clips: list[Clip], seed: int) -> dict[str, list[Clip]]:
    by_word: dict[str, dict[str, list[Clip]]] = {}
    for clip in clips:
        by_word.setdefault(clip.labels["word"], {}).setdefault(clip.labels["speaker"], []).append(clip)
    splits: dict[str, list[Clip]] = {s: [] for s in SPLITS}
    for word in sorted(by_word):
        speakers = by_word[word]
        n = sum(len(v) for v in speakers.values())
        try:
            _, n_dev, n_test = split_counts(n)
        except ValueError as e:
            raise InputError(f"word {word!r}: {e}") from e
        order = sorted(speakers, key=lambda s, w=word: hash_key(f"{w}/{s}", seed))
        taken = {"test": 0, "dev": 0}
        for spk in order:
            # Whole speakers, so no voice is shared between splits of the same word.
            if taken["test"] < n_test:
                dest = "test"
            elif taken["dev"] < n_dev:
                dest = "dev"
            else:
                dest = "train"
            taken[dest] = taken.get(dest, 0) + len(speakers[spk])
            splits[dest] += sorted(speakers[spk], key=lambda c: c.id)
        if "train" not in taken:
            raise InputError(f"word {word!r}: its {len(speakers)} speaker(s) cannot fill train, dev and test")
    return splits
