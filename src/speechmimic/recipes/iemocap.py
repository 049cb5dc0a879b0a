"""IEMOCAP emotion recognition (SUPERB ER): 4 classes, leave-one-session-out.

Reads ``Session{1..5}/dialog/EmoEvaluation/<dialog>.txt`` summary lines
``[start - end]<TAB><utt><TAB><emotion><TAB>[v, a, d]`` and the audio
``Session{n}/sentences/wav/<dialog>/<utt>.wav``. Kept: ``neu``, ``hap``, ``ang``, ``sad``, with
``exc`` merged into ``hap``; other labels (fru, sur, xxx, ...) are dropped. Tasks
``er_fold1`` .. ``er_fold5`` (label ``emotion``): fold k tests on Session k; of the other four
sessions' clips a seeded 10% (at least one) is dev and the rest train. Clips also carry
``session`` and ``speaker`` (e.g. ``Ses01F``, from the utterance id's last part).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from tqdm import tqdm

from speechmimic.corpus import Clip
from speechmimic.errors import InputError
from speechmimic.recipes._common import clip_from_file, require_dir
from speechmimic.tasks import Task, write_task

OPTIONS = {"dev_fraction": "share of the training sessions' clips held out as dev (default 0.1)"}

SESSIONS = (1, 2, 3, 4, 5)
EMOTIONS = {"neu": "neu", "hap": "hap", "exc": "hap", "ang": "ang", "sad": "sad"}
_LINE = re.compile(r"^\[\s*[\d.]+\s*-\s*[\d.]+\s*\]\t(\S+)\t(\S+)\t")


def build(
    root: str | os.PathLike,
    out: str | os.PathLike,
    dev_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> list[Task]:
    """Write ``out/er_fold1`` .. ``out/er_fold5``."""
    root = require_dir(root, "IEMOCAP root")
    if not 0 < dev_fraction < 1:
        raise InputError(f"dev_fraction must be in (0, 1), got {dev_fraction}")
    by_session = {n: _session(root, n, progress) for n in SESSIONS}
    tasks = []
    for k in SESSIONS:
        rest = sorted((c for n in SESSIONS if n != k for c in by_session[n]), key=lambda c: c.id)
        order = np.random.default_rng([seed, k]).permutation(len(rest))
        n_dev = max(1, round(dev_fraction * len(rest)))
        dev = sorted((rest[i] for i in order[:n_dev]), key=lambda c: c.id)
        train = sorted((rest[i] for i in order[n_dev:]), key=lambda c: c.id)
        description = (
            f"IEMOCAP 4-class emotion (neu, hap+exc, ang, sad), fold {k}: test Session{k}; "
            f"dev a seeded {dev_fraction:g} of the other sessions (seed {seed})."
        )
        splits = {"train": train, "dev": dev, "test": by_session[k]}
        tasks.append(
            write_task(Path(out) / f"er_fold{k}", f"er_fold{k}", "classify", "emotion", splits, description)
        )
    return tasks


def _session(root: Path, n: int, progress: bool) -> list[Clip]:
    session = require_dir(root / f"Session{n}", f"IEMOCAP session {n}")
    evaluations = sorted((session / "dialog" / "EmoEvaluation").glob("*.txt"))
    if not evaluations:
        raise FileNotFoundError(f"{session}/dialog/EmoEvaluation: no <dialog>.txt label files")
    clips = []
    for path in tqdm(evaluations, desc=f"iemocap Session{n}", unit="dialog", disable=not progress):
        dialog = path.stem
        for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            m = _LINE.match(line)
            if not m or m.group(2) not in EMOTIONS:
                continue
            utt = m.group(1)
            labels = {
                "emotion": EMOTIONS[m.group(2)],
                "session": n,
                "speaker": utt[:5] + utt.rsplit("_", 1)[-1][:1],
            }
            wav = session / "sentences" / "wav" / dialog / f"{utt}.wav"
            clips.append(clip_from_file(wav, utt, labels, f"{path}:{lineno}"))
    if not clips:
        raise InputError(f"{session}: no neu/hap/exc/ang/sad utterance in its EmoEvaluation files")
    return sorted(clips, key=lambda c: c.id)
