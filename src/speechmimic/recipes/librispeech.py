"""LibriSpeech: character ASR, phone recognition and small speaker-ID tasks.

Given subset folders under the root (``train``, ``dev``, ``test`` options; several folders may be
joined with commas, e.g. ``train-clean-100,train-clean-360``):

``asr`` (kind ``chars``, label ``text``)
    The ``*.trans.txt`` transcripts, always written.
``pr`` (kind ``phones``, label ``phones``)
    With ``lexicon``: a CMUdict-style file of ``WORD  PH1 PH2 ...`` lines (``;;;`` comments;
    alternative pronunciations ``WORD(2)`` ignored, the first one is used; stress digits stripped,
    so ``AH0`` -> ``AH``). Words missing from it are an error listing some of them, unless
    ``oov="skip"``, which drops those utterances from ``pr`` (counted in its description). With
    ``espeak="<voice>"``: the lower-cased transcript phonemised by espeak-ng
    (:func:`speechmimic.recipes.espeak.phonemize`).

With ``speaker_split=True`` (for folders without transcripts, such as a 10-speaker subset) every
utterance under the root is pooled instead and speaker tasks alone are written: ``sid`` (label
``speaker``): each speaker's utterances are split on their own, ranked by a seeded hash, 60/20/20
(at least one each), so every speaker is in every split; and ``asv`` (kind ``verify``), where ten
speakers' identification is too easy to tell encoders apart: two seeded 3-s crops of each utterance
of those same splits, every pair of crops of two utterances a trial (crops of one utterance are none).
"""

from __future__ import annotations

import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from speechmimic.corpus import Clip, random_crops, scan
from speechmimic.errors import InputError
from speechmimic.recipes import espeak as espeak_ng
from speechmimic.recipes._common import require_dir, require_file, split_by_group
from speechmimic.tasks import SPLITS, Task, all_trials, write_task

OPTIONS = {
    "train": "training subset folder(s) under ROOT, comma-separated (default train-clean-100)",
    "dev": "dev subset folder(s) under ROOT (default dev-clean)",
    "test": "test subset folder(s) under ROOT (default test-clean)",
    "lexicon": "CMUdict-style lexicon ('WORD  PH1 PH2 ...'): adds phone task pr",
    "espeak": "espeak-ng voice (e.g. en-us) to phonemise transcripts with: adds phone task pr",
    "oov": "pr with a lexicon: 'error' on words it lacks (default) or 'skip' those utterances",
    "speaker_split": "pool everything under ROOT into tasks sid (each speaker split 60/20/20) and asv "
    "(default false)",
}

VERIFY_SECONDS = 3.0  # speaker verification on crops this long (asv)
_STRESS = re.compile(r"\d+$")
_VARIANT = re.compile(r"\(\d+\)$")


def build(
    root: str | os.PathLike,
    out: str | os.PathLike,
    train: str = "train-clean-100",
    dev: str = "dev-clean",
    test: str = "test-clean",
    lexicon: str | None = None,
    espeak: str | None = None,
    oov: str = "error",
    speaker_split: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> list[Task]:
    """Write ``out/asr`` (+ ``out/pr``), or ``out/sid`` with ``speaker_split``."""
    root = require_dir(root, "LibriSpeech root")
    out = Path(out)
    if oov not in ("error", "skip"):
        raise InputError(f"oov must be 'error' or 'skip', got {oov!r}")
    if lexicon is not None and espeak is not None:
        raise InputError("give lexicon or espeak for the phone task, not both")
    if speaker_split:
        if lexicon is not None or espeak is not None:
            raise InputError("speaker_split writes only the sid task: lexicon/espeak do not apply")
        clips = _scan(root, progress)
        splits = split_by_group(clips, lambda c: c.labels["speaker"], seed, what="speaker")
        description = (
            f"LibriSpeech speaker ID over {root.name}: each speaker 60/20/20 by seeded hash (seed {seed})."
        )
        sid = write_task(out / "sid", "sid", "classify", "speaker", splits, description)
        crops = {s: random_crops(splits[s], VERIFY_SECONDS, 2, seed) for s in SPLITS}
        speakers = {s: {c.labels["speaker"] for c in crops[s]} for s in SPLITS}
        if any(len(speakers[s]) < 2 for s in SPLITS):
            print(
                f"librispeech: task asv not written: it needs utterances of >= {VERIFY_SECONDS:g} s from "
                f"two speakers or more in every split (speakers with such utterances: "
                f"{', '.join(f'{s} {len(speakers[s])}' for s in SPLITS)})",
                file=sys.stderr,
            )
            return [sid]
        trials = {s: all_trials(crops[s], "speaker", "utterance", seed) for s in ("dev", "test")}
        return [
            sid,
            write_task(
                out / "asv",
                "asv",
                "verify",
                "speaker",
                crops,
                f"LibriSpeech speaker verification over {root.name}: two {VERIFY_SECONDS:g}-s crops per "
                f"utterance of the sid splits; trials: every pair of crops of two utterances.",
                trials,
            ),
        ]

    folders = {"train": train, "dev": dev, "test": test}
    splits = {
        s: [c for name in folders[s].split(",") for c in _scan(root / name.strip(), progress)] for s in SPLITS
    }
    for s in SPLITS:
        if missing := [c.id for c in splits[s] if "text" not in c.labels]:
            raise InputError(
                f"{root / folders[s]}: {len(missing)} utterance(s) without a transcript line "
                f"(e.g. {missing[0]}); for folders without *.trans.txt use speaker_split=True"
            )
    names = ", ".join(f"{s} = {folders[s]}" for s in SPLITS)
    tasks = [write_task(out / "asr", "asr", "chars", "text", splits, f"LibriSpeech characters; {names}.")]
    if lexicon is not None:
        tasks.append(_lexicon_task(Path(lexicon), splits, out, oov, names))
    elif espeak is not None:
        espeak_ng.check_voices([espeak])
        texts = [c.labels["text"].lower() for s in SPLITS for c in splits[s]]
        with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
            jobs = pool.map(espeak_ng.phonemize, texts, [espeak] * len(texts))
            phones = iter(list(tqdm(jobs, total=len(texts), desc="espeak-ng", disable=not progress)))
        for s in SPLITS:
            for clip in splits[s]:
                clip.labels["phones"] = next(phones)
        description = (
            f"LibriSpeech phones from espeak-ng ({espeak}, see speechmimic.recipes.espeak); {names}."
        )
        tasks.append(write_task(out / "pr", "pr", "phones", "phones", splits, description))
    return tasks


def _scan(folder: Path, progress: bool) -> list[Clip]:
    require_dir(folder, "LibriSpeech subset")
    clips = scan(folder, layout="librispeech", progress=progress).clips
    if not clips:
        raise InputError(
            f"{folder}: no <spk>/[<chapter>/]<spk>-<chapter>-<utt> audio found (LibriSpeech layout)"
        )
    return clips


def read_lexicon(path: str | os.PathLike) -> dict[str, list[str]]:
    """``WORD -> phones`` (first pronunciation, stress digits stripped) from a CMUdict-style file."""
    path = require_file(path, "pronunciation lexicon")
    lexicon: dict[str, list[str]] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip() or line.startswith(";;;"):
            continue
        word, *phones = line.split()
        if not phones:
            raise InputError(f"{path}:{lineno}: expected 'WORD  PH1 PH2 ...', got {line!r}")
        if _VARIANT.search(word):
            continue
        lexicon.setdefault(word.upper(), [_STRESS.sub("", p) for p in phones])
    if not lexicon:
        raise InputError(f"{path}: no 'WORD  PH1 PH2 ...' entries")
    return lexicon


def _lexicon_task(lexicon_path: Path, splits, out: Path, oov: str, names: str) -> Task:
    lexicon = read_lexicon(lexicon_path)
    missing: dict[str, int] = {}
    kept: dict[str, list[Clip]] = {}
    for s in SPLITS:
        kept[s] = []
        for clip in splits[s]:
            words = clip.labels["text"].upper().split()
            if lacking := [w for w in words if w not in lexicon]:
                for w in lacking:
                    missing[w] = missing.get(w, 0) + 1
                continue
            phones = " ".join(p for w in words for p in lexicon[w])
            kept[s].append(Clip(**{**clip.to_dict(), "labels": {**clip.labels, "phones": phones}}))
    dropped = sum(len(splits[s]) - len(kept[s]) for s in SPLITS)
    if missing and oov == "error":
        common = sorted(missing, key=lambda w: (-missing[w], w))[:10]
        raise InputError(
            f"{lexicon_path}: lacks {len(missing)} word(s) of the transcripts ({dropped} utterance(s)), "
            f"e.g. {', '.join(common)}; add them or pass oov='skip' to drop those utterances"
        )
    note = f" Dropped {dropped} utterance(s) with words missing from the lexicon." if dropped else ""
    description = f"LibriSpeech phones from lexicon {lexicon_path.name} (stress removed); {names}.{note}"
    return write_task(out / "pr", "pr", "phones", "phones", kept, description)
