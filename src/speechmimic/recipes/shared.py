"""One-call tasks for the small real-speech subsets kept beside the project (``../shared/data``).

``root`` is that data folder, holding:

- ``fsdd/recordings`` -> ``digits`` (10 digits; test = take index 0-4, 300 clips) and
  ``fsdd_sid`` (6 speakers), see :mod:`speechmimic.recipes.fsdd`;
- ``speech_commands_subset`` (30 words x 10) -> ``words`` (30 classes; its lists leave some words
  without a test clip, so the per-word speaker split applies), see
  :mod:`speechmimic.recipes.speech_commands`;
- ``librispeech_test_other_subset`` (10 speakers x 10, no transcripts) -> ``sid`` (10 speakers,
  each split 60/20/20) and ``asv`` (speaker verification on 3-s crops), see
  :mod:`speechmimic.recipes.librispeech`.
"""

from __future__ import annotations

import os
from pathlib import Path

from speechmimic.recipes import fsdd as _fsdd
from speechmimic.recipes import librispeech as _librispeech
from speechmimic.recipes import speech_commands as _speech_commands
from speechmimic.recipes._common import require_dir
from speechmimic.tasks import Task

OPTIONS: dict[str, str] = {}

FSDD = "fsdd/recordings"
SPEECH_COMMANDS = "speech_commands_subset"
LIBRISPEECH = "librispeech_test_other_subset"


def _subset(root: str | os.PathLike, name: str) -> Path:
    return require_dir(Path(root) / name, f"shared data subset {name}")


def fsdd(root: str | os.PathLike, out: str | os.PathLike, progress: bool = True) -> list[Task]:
    return _fsdd.build(_subset(root, FSDD), out, sid=True, progress=progress)


def speech_commands_subset(
    root: str | os.PathLike, out: str | os.PathLike, seed: int = 0, progress: bool = True
) -> list[Task]:
    return _speech_commands.build(
        _subset(root, SPEECH_COMMANDS), out, protocol="words", seed=seed, progress=progress
    )


def librispeech_subset(
    root: str | os.PathLike, out: str | os.PathLike, seed: int = 0, progress: bool = True
) -> list[Task]:
    return _librispeech.build(
        _subset(root, LIBRISPEECH), out, speaker_split=True, seed=seed, progress=progress
    )


def build(
    root: str | os.PathLike, out: str | os.PathLike, seed: int = 0, progress: bool = True
) -> list[Task]:
    """All five tasks under ``out``: ``digits``, ``fsdd_sid``, ``words``, ``sid``, ``asv``."""
    require_dir(root, "shared data folder")
    return [
        *fsdd(root, out, progress),
        *speech_commands_subset(root, out, seed, progress),
        *librispeech_subset(root, out, seed, progress),
    ]
