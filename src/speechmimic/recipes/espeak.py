"""Offline phoneme-labelled speech: espeak-ng phonemisation and a synthetic ``pr_espeak`` corpus.

Phones are espeak-ng's ASCII phoneme mnemonics (``espeak-ng -x``), asked for with ``--sep=|``
rather than ``_``: espeak's pause phonemes start with ``_`` (``_:``, ``_!``) and sometimes stick to
the next phone without a separator (``_:n``), which ``_`` would make ambiguous. Normalisation
(:func:`normalise`), applied the same way everywhere:

- words are split on spaces and phones on ``|``; word boundaries are not kept;
- stress and modifier marks ``'`` (primary), ``,`` (secondary), ``%`` (unstressed), ``=`` and
  ``;`` (palatal modifier, which espeak prints as a separate token) are dropped;
- pause phonemes (a leading ``_`` with ``:``/``!``/``^``/``;``) and language switches like
  ``(fr)`` are dropped.

Inventory over the built-in word list and the 7 default accents (other phones can appear for
names and foreign words): consonants ``p b t d k g f v T D s z S Z h m n N l r w j tS dZ``, the
flap ``t#`` and ``t2``, dental ``t[``, linking ``r-``, ``w#``, syllabic ``@L``; vowels ``@ @- @2
@5 3 3: a a# aa A: A@ aI aI2 aI3 aI@ aU e@ E eI i i: i@ i@3 I I# I2 IR 0 O2 O: O@ o@ OI oU u: U U@
V VR``. Accents differ (``0`` vs ``A:``, ``3:`` vs ``3``), so a task's phone set is whatever its
data holds.

:func:`build` synthesises a corpus: sentences of 4-12 words drawn (seeded) from a built-in list of
~400 common words, spoken by many voices (accent ``+`` variant, e.g. ``en-gb-scotland+m3``) with
seeded speed (``-s``) and pitch (``-p``). Audio and phones come from one espeak-ng call
(``-x -w``) on exactly the same text and voice, so they always agree; the audio is resampled to
16 kHz FLAC. ``split="voice"`` (default) gives train, dev and test disjoint sets of voices, so dev
and test voices are unseen in training; ``split="utterance"`` shares voices across splits. The
build is resumable: an utterance whose FLAC and JSON sidecar exist and match the plan is skipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from speechmimic.audio import SAMPLE_RATE, decode_audio, resample, validate_waveform
from speechmimic.corpus import Clip
from speechmimic.errors import InputError
from speechmimic.recipes._common import split_counts
from speechmimic.tasks import SPLITS, Task, write_task

SEPARATOR = "|"
ACCENTS = ("en-us", "en-gb", "en-gb-x-rp", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029")
VARIANTS = (*(f"m{i}" for i in range(1, 8)), *(f"f{i}" for i in range(1, 6)), "croak", "klatt", "klatt2")
DEFAULT_VOICES = tuple(f"{a}+{v}" for a in ACCENTS for v in VARIANTS)
SPLIT_RULES = ("voice", "utterance")

OPTIONS = {
    "n_utterances": "number of sentences to synthesise (default 1000)",
    "voices": "comma-separated espeak-ng voices 'accent[+variant]' (default: 7 accents x 15 variants)",
    "split": "'voice': dev/test voices unseen in train (default); 'utterance': voices shared",
    "speed": "min,max words per minute, uniform per utterance (default 130,210)",
    "pitch": "min,max espeak pitch 0-99, uniform per utterance (default 30,70)",
    "workers": "parallel espeak-ng processes (default: up to 4)",
}

WORDS = """
a about after again air all also always and animal another answer any are around as ask at away back
be because been before began begin being below best better between big bird black blue boat body book
both boy bring brown build but by call came can car carry cat change child children city close cold
color come could country cut dark day did different do does dog done door down draw during each early
earth eat end enough even evening every eye face fall family far farm fast father feel feet few field
find fire first fish five floor follow food for form found four free friend from full game gave get
girl give go gold good got great green grow had half hand happy hard has have he head hear heart heavy
help her here high hill him his hold home horse hot hour house how hundred idea if important in into
is island it just keep kind king know land large last late laugh learn leave left less let letter life
light like line list little live long look love low made make man many map may me mean men might mile
milk mind minute miss money month moon more morning most mother mountain move much music must my name
near need never new next night no north not nothing now number of off often old on once one only open
or other our out over own page paper part people picture place plant play point poor power pull put
question quick quiet rain ran read ready real red remember rest right river road rock room round run
said same saw say school sea second see seem sentence set seven she ship short should show side simple
since sing sister sit six sleep slow small snow so some song soon sound south space speak spring stand
star start still stone stop story street strong study such summer sun sure table take talk tell ten
than that the their them then there these they thing think this those thought three through time to
today together told too took top toward town tree true try turn two under until up upon us use very
voice walk wall want warm was watch water way we week well went were west what wheel when where which
while white who whole why wide will wind window winter with without woman wood word work world would
write year yellow yes you young your
""".split()

_LANG_SWITCH = re.compile(r"\([a-z]{2,3}(?:-[a-z0-9-]+)?\)", re.IGNORECASE)
_PAUSE = re.compile(r"^(?:_[:!^;_]*)+")
_MARKS = str.maketrans("", "", "',%=;")


def espeak_path() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise FileNotFoundError("espeak-ng not found on PATH (Debian/Ubuntu: apt-get install espeak-ng)")
    return exe


def _espeak(args: Sequence[str], text: str) -> str:
    # Text goes through stdin so that words starting with '-' are never read as options.
    proc = subprocess.run([espeak_path(), *args], input=text, capture_output=True, text=True)
    if proc.returncode != 0:
        raise InputError(f"espeak-ng {' '.join(args)} failed: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def normalise(mnemonics: str) -> list[str]:
    """Phone tokens from ``espeak-ng -x --sep=|`` output (see the module docstring)."""
    phones = []
    for word in mnemonics.split():
        for token in _LANG_SWITCH.sub("", word).split(SEPARATOR):
            token = _PAUSE.sub("", token).translate(_MARKS)
            if token:
                phones.append(token)
    return phones


def phonemize(text: str, voice: str = "en-us") -> str:
    """Space-separated espeak-ng phones of ``text`` spoken by ``voice``, e.g. ``"h @ l oU"``."""
    return " ".join(
        normalise(_espeak(["-q", "-x", f"--sep={SEPARATOR}", "-v", voice], text.replace("\n", " ")))
    )


@lru_cache(maxsize=1)
def variants() -> frozenset[str]:
    """Names usable after ``+`` in a voice (the files of ``espeak-ng --voices=variant``)."""
    return frozenset(re.findall(r"!v/(\S+)", _espeak(["--voices=variant"], "")))


def check_voices(voices: Sequence[str]) -> None:
    """Raise ValueError for a voice espeak-ng lacks (it silently ignores unknown variants)."""
    for voice in voices:
        _, plus, variant = voice.partition("+")
        if plus and variant not in variants():
            raise InputError(
                f"unknown espeak-ng variant {variant!r} in voice {voice!r} (see espeak-ng --voices=variant)"
            )
    for accent in dict.fromkeys(v.partition("+")[0] for v in voices):
        _espeak(["-q", "-x", "-v", accent], "a")


def _range(value, name: str, lo: int, hi: int) -> tuple[int, int]:
    if isinstance(value, str):
        value = value.split(",")
    try:
        a, b = (int(v) for v in value)
    except (TypeError, ValueError) as e:
        raise InputError(f"{name} must be two integers 'min,max', got {value!r}") from e
    if not lo <= a <= b <= hi:
        raise InputError(f"{name} must satisfy {lo} <= min <= max <= {hi}, got {a},{b}")
    return a, b


def _plan(n: int, voices: list[str], split: str, speed, pitch, seed: int) -> list[dict]:
    """What to say, with which voice, speed and pitch, in which split: one dict per utterance."""
    rng = np.random.default_rng(seed)
    counts = split_counts(n, (0.8, 0.1, 0.1))
    shuffled = [voices[i] for i in rng.permutation(len(voices))]
    if split == "voice":
        sizes = split_counts(len(shuffled), (0.8, 0.1, 0.1))
        bounds = np.cumsum((0, *sizes))
        pools = {s: shuffled[bounds[i] : bounds[i + 1]] for i, s in enumerate(SPLITS)}
    else:
        pools = dict.fromkeys(SPLITS, shuffled)
    plan = []
    for s, count in zip(SPLITS, counts, strict=True):
        for j in range(count):
            i = len(plan)
            # Per-utterance generator: an utterance's text does not depend on how many are asked for.
            r = np.random.default_rng([seed, i])
            words = r.choice(WORDS, size=int(r.integers(4, 13)))
            plan.append(
                {
                    "id": f"espeak-{i:06d}",
                    "split": s,
                    "text": " ".join(words),
                    "voice": pools[s][j % len(pools[s])],
                    "speed": int(r.integers(speed[0], speed[1] + 1)),
                    "pitch": int(r.integers(pitch[0], pitch[1] + 1)),
                }
            )
    return plan


def _synthesise(item: dict, audio_dir: Path) -> Clip:
    flac, meta_path = audio_dir / f"{item['id']}.flac", audio_dir / f"{item['id']}.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
    if not (meta and flac.exists() and all(meta.get(k) == v for k, v in item.items())):
        tmp_wav, tmp_flac = audio_dir / f".{item['id']}.wav", audio_dir / f".{item['id']}.tmp.flac"
        args = ["-x", f"--sep={SEPARATOR}", "-w", str(tmp_wav), "-v", item["voice"]]
        args += ["-s", str(item["speed"]), "-p", str(item["pitch"])]
        mnemonics = _espeak(args, item["text"])
        wav, sr = decode_audio(tmp_wav)
        tmp_wav.unlink()
        wav = validate_waveform(resample(wav, sr, SAMPLE_RATE), tmp_wav)
        sf.write(tmp_flac, wav, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        os.replace(tmp_flac, flac)
        # Raw mnemonics, so that a resumed corpus is normalised by the current rules.
        meta = {**item, "mnemonics": mnemonics, "num_samples": len(wav)}
        # The sidecar is written last: its presence marks the utterance as done.
        meta_path.with_suffix(".json.tmp").write_text(json.dumps(meta))
        os.replace(meta_path.with_suffix(".json.tmp"), meta_path)
    phones = normalise(meta["mnemonics"])
    if not phones:
        raise InputError(f"{meta_path}: espeak-ng gave no phones for {item['text']!r} ({item['voice']})")
    n = int(meta["num_samples"])
    labels = {"phones": " ".join(phones)} | {k: meta[k] for k in ("text", "voice", "speed", "pitch")}
    return Clip(item["id"], str(flac), SAMPLE_RATE, n, n / SAMPLE_RATE, 0.0, labels)


def build(
    out: str | os.PathLike,
    n_utterances: int = 1000,
    seed: int = 0,
    voices: Sequence[str] | str | None = None,
    split: str = "voice",
    speed: Sequence[int] | str = (130, 210),
    pitch: Sequence[int] | str = (30, 70),
    workers: int | None = None,
    progress: bool = True,
) -> list[Task]:
    """Synthesise (or complete) ``out/pr_espeak`` with its audio in ``out/pr_espeak/audio``."""
    if split not in SPLIT_RULES:
        raise InputError(f"unknown split rule {split!r}; choose from {', '.join(SPLIT_RULES)}")
    if n_utterances < 3:
        raise InputError(f"n_utterances must be >= 3 (train, dev and test), got {n_utterances}")
    if isinstance(voices, str):
        voices = [v.strip() for v in voices.split(",") if v.strip()]
    voices = list(dict.fromkeys(voices or DEFAULT_VOICES))
    if split == "voice" and len(voices) < 3:
        raise InputError(f"split='voice' needs at least 3 voices (one per split), got {len(voices)}")
    check_voices(voices)
    speed, pitch = _range(speed, "speed", 80, 450), _range(pitch, "pitch", 0, 99)
    plan = _plan(n_utterances, voices, split, speed, pitch, seed)

    task_dir = Path(out) / "pr_espeak"
    audio_dir = task_dir / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        jobs = pool.map(_synthesise, plan, [audio_dir] * len(plan))
        clips = list(tqdm(jobs, total=len(plan), desc="espeak-ng", unit="utt", disable=not progress))
    splits = {s: [c for c, item in zip(clips, plan, strict=True) if item["split"] == s] for s in SPLITS}
    description = (
        f"espeak-ng synthetic speech, {n_utterances} sentences over {len(voices)} voices (seed {seed}), "
        f"speed {speed[0]}-{speed[1]} wpm, pitch {pitch[0]}-{pitch[1]}; phones from the same call; "
        f"split by {split}" + (" (dev/test voices unseen in train)." if split == "voice" else ".")
    )
    return [write_task(task_dir, "pr_espeak", "phones", "phones", splits, description)]
