#!/usr/bin/env python3
"""Generate the small synthetic labelled speech corpus shipped with speechmimic.

The corpus is synthesised locally with two rule/unit-based TTS engines, so the
package demo needs no downloads:

* espeak-ng (formant synthesis; many accents x voice variants), and
* flite (CMU diphone / clustergen voices kal, kal16, awb, rms, slt).

Each *speaker* is one fixed voice configuration (engine + voice + variant +
base pitch + base rate).  Per speaker the generator writes

* keyword clips: 10 command words, each spoken ``--keyword-takes`` times with a
  small random rate/pitch jitter (``labels.kind == "keyword"``), and
* sentence clips: ``--sentences`` pseudo-random sentences of roughly 2-5 s built
  from a fixed list of a few hundred common English words written below
  (``labels.kind == "sentence"``).

Audio is resampled to 16 kHz mono (soxr), trimmed of leading/trailing silence
(keeping ~50 ms), peak-normalised to a random level in ``--peak-range`` and
written as 16-bit FLAC.  About 15 % of each speaker's clips of each kind are
labelled ``split == "heldout"``, the rest ``"pool"``.

Everything is driven by ``--seed``; the same seed and the same engine versions
give byte-identical output.  Requires the ``espeak-ng`` and ``flite`` programs
on PATH (Debian packages ``espeak-ng`` and ``flite``).

Example::

    python scripts/make_demo_corpus.py --seed 0 --out src/speechmimic/data/demo_corpus
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SR = 16000
# multiplier on the base rate for keyword clips (espeak: words/min; flite: duration stretch)
KEYWORD_RATE = {"espeak-ng": 0.9, "flite": 1.3}
KEYWORDS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]

# Speaker table: (name, engine, voice, base pitch, base rate).
#  espeak-ng: voice is "<language>+<variant>", pitch is -p (0-99), rate is -s (words/min).
#  flite:     pitch is int_f0_target_mean (Hz), rate is duration_stretch (>1 = slower).
SPEAKERS: list[tuple[str, str, str, float, float]] = [
    ("es-en-us-m1", "espeak-ng", "en-us+m1", 45, 165),
    ("es-en-us-f2", "espeak-ng", "en-us+f2", 60, 160),
    ("es-en-gb-rp-m3", "espeak-ng", "en-gb-x-rp+m3", 40, 155),
    ("es-en-gb-rp-f1", "espeak-ng", "en-gb-x-rp+f1", 55, 170),
    ("es-en-scot-m2", "espeak-ng", "en-gb-scotland+m2", 35, 150),
    ("es-en-scot-f3", "espeak-ng", "en-gb-scotland+f3", 65, 160),
    ("es-en-029-m4", "espeak-ng", "en-029+m4", 50, 160),
    ("es-en-029-f4", "espeak-ng", "en-029+f4", 55, 150),
    ("es-en-lanc-m5", "espeak-ng", "en-gb-x-gbclan+m5", 45, 170),
    ("es-en-wmid-m6", "espeak-ng", "en-gb-x-gbcwmd+m6", 30, 155),
    ("es-en-nyc-m7", "espeak-ng", "en-us-nyc+m7", 50, 175),
    ("es-en-gb-f5", "espeak-ng", "en+f5", 70, 155),
    ("es-en-us-klatt", "espeak-ng", "en-us+klatt", 50, 160),
    ("es-en-gb-klatt3", "espeak-ng", "en+klatt3", 40, 150),
    ("es-en-us-croak", "espeak-ng", "en-us+croak", 40, 150),
    ("es-en-gb-grandma", "espeak-ng", "en+grandma", 60, 145),
    ("es-en-rp-edward", "espeak-ng", "en-gb-x-rp+edward", 45, 160),
    ("es-en-us-belinda", "espeak-ng", "en-us+belinda", 60, 165),
    ("fl-kal", "flite", "kal", 100, 1.00),
    ("fl-kal16", "flite", "kal16", 120, 0.95),
    ("fl-awb", "flite", "awb", 110, 1.00),
    ("fl-rms", "flite", "rms", 95, 1.05),
    ("fl-slt", "flite", "slt", 175, 1.00),
    ("fl-slt-low", "flite", "slt", 145, 1.10),
]

# A few hundred common English words, grouped by part of speech so that the
# generator can produce roughly grammatical sentences with broad phonetic coverage.
DETS = "the a this that my your his her our their every one some each".split()
ADJS = (
    "big small old new good bad long short high low hot cold warm cool dark light "
    "quick slow happy sad green red blue yellow black white brown young early late "
    "strong weak soft hard loud quiet rich poor clean dirty busy empty full heavy "
    "bright sharp smooth rough sweet bitter fresh tired brave calm strange simple"
).split()
NOUNS = (
    "man woman child boy girl friend teacher doctor farmer driver king queen dog cat "
    "horse bird fish cow house home school church garden kitchen window door table "
    "chair bed floor wall road street river lake sea ship boat train car bus plane "
    "city town village country world water fire stone tree flower grass field "
    "mountain hill forest morning evening night day week year hour minute letter "
    "book paper story song music picture money bread milk cheese apple egg cup "
    "plate knife box bag coat hat shoe ring key clock phone bottle market shop bank "
    "office station bridge island beach sky sun moon star rain snow wind cloud voice"
).split()
VERBS_PAST = (
    "saw found took gave made left brought kept held sold bought built carried "
    "opened closed painted cleaned watched washed moved pushed pulled lifted dropped "
    "wanted needed liked loved missed called followed visited answered checked "
    "fixed filled covered counted reached remembered forgot"
).split()
VERBS_INTR = (
    "ran walked slept laughed smiled waited stayed arrived returned jumped danced "
    "sang shouted worked played listened travelled fell rose stopped started"
).split()
PREPS = "in on under over near behind beside across through into from with without after before".split()
ADVS = (
    "quickly slowly quietly loudly carefully happily suddenly finally often never "
    "always again together alone outside inside today yesterday tomorrow soon"
).split()
NAMES = "John Mary Peter Susan David Anna Tom Kate James Lucy Robert Helen Paul Emma".split()
CONJ = "and but so because while".split()


def _np(rng: np.random.Generator, with_adj: float = 0.5) -> str:
    words = [str(rng.choice(DETS))]
    if rng.random() < with_adj:
        words.append(str(rng.choice(ADJS)))
    words.append(str(rng.choice(NOUNS)))
    return " ".join(words)


def _subject(rng: np.random.Generator) -> str:
    return str(rng.choice(NAMES)) if rng.random() < 0.3 else _np(rng)


def _clause(rng: np.random.Generator) -> str:
    r = rng.random()
    if r < 0.45:
        parts = [_subject(rng), str(rng.choice(VERBS_PAST)), _np(rng)]
    elif r < 0.75:
        parts = [_subject(rng), str(rng.choice(VERBS_INTR)), str(rng.choice(PREPS)), _np(rng)]
    else:
        parts = [_subject(rng), str(rng.choice(VERBS_PAST)), _np(rng), str(rng.choice(PREPS)), _np(rng)]
    if rng.random() < 0.3:
        parts.append(str(rng.choice(ADVS)))
    return " ".join(parts)


def make_sentence(rng: np.random.Generator, long: bool) -> str:
    text = _clause(rng)
    if long:
        text += " " + str(rng.choice(CONJ)) + " " + _clause(rng)
    text = text[0].upper() + text[1:]
    return text + "."


@dataclass
class Clip:
    id: str
    speaker: str
    engine: str
    kind: str
    content: str
    audio: np.ndarray


def synth(engine: str, voice: str, text: str, pitch: float, rate: float, tmp: Path) -> np.ndarray:
    """Run one TTS call and return float mono audio at 16 kHz."""
    wav = tmp / "out.wav"
    if engine == "espeak-ng":
        cmd = [
            "espeak-ng",
            "-v",
            voice,
            "-p",
            str(int(round(pitch))),
            "-s",
            str(int(round(rate))),
            "-w",
            str(wav),
            text,
        ]
    else:
        cmd = [
            "flite",
            "-voice",
            voice,
            "-t",
            text,
            "-o",
            str(wav),
            "--setf",
            f"int_f0_target_mean={pitch:.1f}",
            "--setf",
            f"duration_stretch={rate:.3f}",
        ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    x, sr = sf.read(wav, dtype="float64", always_2d=True)
    x = x.mean(axis=1)
    if sr != SR:
        x = soxr.resample(x, sr, SR, quality="HQ")
    return x


def trim(x: np.ndarray, keep_s: float = 0.05, rel_db: float = -40.0) -> np.ndarray:
    """Trim leading/trailing frames more than ``rel_db`` below the loudest 10 ms frame."""
    hop = SR // 100
    n = len(x) // hop
    if n == 0:
        return x
    rms = np.sqrt(np.mean(x[: n * hop].reshape(n, hop) ** 2, axis=1) + 1e-20)
    active = np.flatnonzero(20 * np.log10(rms / rms.max()) > rel_db)
    keep = int(keep_s * SR)
    a = max(0, active[0] * hop - keep)
    b = min(len(x), (active[-1] + 1) * hop + keep)
    return x[a:b]


def finish(x: np.ndarray, peak: float) -> np.ndarray:
    x = trim(x)
    return x * (peak / np.max(np.abs(x)))


def make_speaker(idx: int, spec: tuple, args: argparse.Namespace) -> list[Clip]:
    name, engine, voice, pitch0, rate0 = spec
    rng = np.random.default_rng([args.seed, idx])
    clips: list[Clip] = []
    lo, hi = args.peak_range
    flite = engine == "flite"

    def jitter(scale: float) -> tuple[float, float]:
        # pitch: +-4 espeak units or +-5 %; rate: +-8 %
        p = pitch0 * (1 + rng.uniform(-0.05, 0.05)) if flite else pitch0 + rng.uniform(-4, 4)
        r = rate0 * (1 + rng.uniform(-0.08, 0.08) * scale)
        return p, r

    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        for word in KEYWORDS:
            for k in range(args.keyword_takes):
                p, r = jitter(1.0)
                # Isolated (citation-form) words are spoken a little slower; the flite
                # diphone voices otherwise produce very short words ("on" ~0.13 s).
                r = r * KEYWORD_RATE[engine]
                for _attempt in range(10):
                    x = trim(synth(engine, voice, word, p, r, tmp))
                    if len(x) >= args.keyword_min * SR:
                        break
                    r = r * 1.15 if flite else r / 1.15  # slower and retry
                else:
                    raise RuntimeError(f"keyword {word!r} too short for {name}")
                clips.append(
                    Clip(
                        f"{name}-kw-{word}-{k}", name, engine, "keyword", word, finish(x, rng.uniform(lo, hi))
                    )
                )
        for k in range(args.sentences):
            long = k % 2 == 1
            for _attempt in range(50):
                text = make_sentence(rng, long)
                p, r = jitter(0.5)
                x = trim(synth(engine, voice, text, p, r, tmp))
                dur = len(x) / SR
                if args.sentence_min <= dur <= args.sentence_max:
                    break
                long = dur < args.sentence_min  # too short -> two clauses, too long -> one
            else:
                raise RuntimeError(f"could not make a sentence of the right length for {name}")
            clips.append(Clip(f"{name}-s{k}", name, engine, "sentence", text, finish(x, rng.uniform(lo, hi))))

    # Stratified held-out split, at least one clip of each kind. Held-out clips are never queried:
    # they measure fidelity and are the probes' data, so keywords get a larger share.
    split = {c.id: "pool" for c in clips}
    for kind in ("keyword", "sentence"):
        ids = [c.id for c in clips if c.kind == kind]
        frac = args.heldout_keyword_frac if kind == "keyword" else args.heldout_frac
        n_held = max(1, int(round(frac * len(ids))))
        if kind == "keyword":
            # distinct words in the held-out set, one random take of each
            words = rng.choice(KEYWORDS, size=min(n_held, len(KEYWORDS)), replace=False)
            for w in words:
                split[f"{name}-kw-{w}-{int(rng.integers(args.keyword_takes))}"] = "heldout"
        else:
            for i in rng.choice(len(ids), size=n_held, replace=False):
                split[ids[int(i)]] = "heldout"
    for c in clips:
        c.split = split[c.id]  # type: ignore[attr-defined]
    return clips


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Output: <out>/audio/*.flac, <out>/manifest.jsonl, <out>/README.md. "
        "An existing output folder is replaced, but only if it is empty or holds a manifest.jsonl.",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=Path("src/speechmimic/data/demo_corpus"),
        help="output folder (default: %(default)s)",
    )
    ap.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    ap.add_argument("--sentences", type=int, default=3, help="sentences per speaker (default: %(default)s)")
    ap.add_argument(
        "--keyword-takes",
        type=int,
        default=2,
        help="takes of each of the 10 keywords per speaker (default: %(default)s)",
    )
    ap.add_argument(
        "--keyword-min",
        type=float,
        default=0.3,
        help="minimum keyword duration in s after trimming; shorter takes are "
        "re-synthesised more slowly (default: %(default)s)",
    )
    ap.add_argument(
        "--sentence-min",
        type=float,
        default=2.0,
        help="minimum sentence duration in s after trimming (default: %(default)s)",
    )
    ap.add_argument(
        "--sentence-max",
        type=float,
        default=5.0,
        help="maximum sentence duration in s after trimming (default: %(default)s)",
    )
    ap.add_argument(
        "--peak-range",
        type=float,
        nargs=2,
        default=(0.2, 0.5),
        metavar=("LO", "HI"),
        help="peak level range for random normalisation (default: 0.2 0.5)",
    )
    ap.add_argument(
        "--heldout-frac",
        type=float,
        default=0.34,
        help="fraction of each speaker's sentences in the heldout split (default: %(default)s)",
    )
    ap.add_argument(
        "--heldout-keyword-frac",
        type=float,
        default=0.5,
        help="fraction of each speaker's keyword clips in the heldout split, one take per word "
        "(default: %(default)s: every word once)",
    )
    ap.add_argument(
        "--speakers",
        type=int,
        default=len(SPEAKERS),
        help=f"use the first N of the {len(SPEAKERS)} built-in speakers (default: all)",
    )
    ap.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="parallel synthesis workers; does not affect output (default: CPU count)",
    )
    args = ap.parse_args(argv)

    for tool in ("espeak-ng", "flite"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} not found on PATH")

    specs = SPEAKERS[: args.speakers]
    with ThreadPoolExecutor(max_workers=args.jobs) as ex:
        per_spk = list(ex.map(lambda a: make_speaker(a[0], a[1], args), enumerate(specs)))

    out: Path = args.out
    if out.exists():
        if any(out.iterdir()) and not (out / "manifest.jsonl").exists():
            ap.error(f"{out} exists and does not look like a corpus folder; refusing to delete it")
        shutil.rmtree(out)
    (out / "audio").mkdir(parents=True)
    rows = []
    for clips in per_spk:
        for c in clips:
            rel = f"audio/{c.id}.flac"
            pcm = np.clip(np.round(c.audio * 32767), -32768, 32767).astype(np.int16)
            sf.write(out / rel, pcm, SR, subtype="PCM_16", format="FLAC", compression_level=1.0)
            labels = {"speaker": c.speaker, "engine": c.engine, "kind": c.kind}
            labels["keyword" if c.kind == "keyword" else "text"] = c.content
            labels["split"] = c.split  # type: ignore[attr-defined]
            rows.append(
                {
                    "id": c.id,
                    "path": rel,
                    "sampling_rate": SR,
                    "num_samples": int(len(pcm)),
                    "duration": len(pcm) / SR,
                    "offset": 0.0,
                    "labels": labels,
                }
            )
    with open(out / "manifest.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=False) + "\n")

    write_readme(out, args, specs, rows, regen_command(ap, args))
    total = sum(r["duration"] for r in rows)
    print(f"wrote {len(rows)} clips, {len(specs)} speakers, {total / 60:.2f} min to {out}", file=sys.stderr)
    return 0


def regen_command(ap: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The command line that reproduces this corpus (non-default options spelled out)."""
    parts = ["python scripts/make_demo_corpus.py", f"--seed {args.seed}", f"--out {args.out}"]
    for act in ap._actions:
        if act.dest in ("help", "seed", "out", "jobs"):
            continue
        val = getattr(args, act.dest)
        default = act.default
        if isinstance(val, (list, tuple)):
            val, default = tuple(val), tuple(default)
        if val != default:
            v = " ".join(map(str, val)) if isinstance(val, tuple) else str(val)
            parts.append(f"{act.option_strings[-1]} {v}")
    return " ".join(parts)


def _version(cmd: list[str], pattern: str) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
    except OSError:
        return "unknown"
    m = re.search(pattern, r.stdout + r.stderr)
    return m.group(1) if m else "unknown"


def write_readme(out: Path, args: argparse.Namespace, specs: list, rows: list[dict], cmd: str) -> None:
    n_kw = sum(r["labels"]["kind"] == "keyword" for r in rows)
    n_s = len(rows) - n_kw
    n_held = sum(r["labels"]["split"] == "heldout" for r in rows)
    mins = sum(r["duration"] for r in rows) / 60
    kw_min = sum(r["duration"] for r in rows if r["labels"]["kind"] == "keyword") / 60
    n_es = sum(s[1] == "espeak-ng" for s in specs)
    es_version = _version(["espeak-ng", "--version"], r"text-to-speech:\s*(\S+)")
    fl_version = _version(["flite", "--version"], r"flite-(\S+)")
    s_range = f"{args.sentence_min:g}-{args.sentence_max:g}"
    split_doc = (
        f"`pool` (query/training) or `heldout` (never queried: fidelity and probes; "
        f"~{args.heldout_keyword_frac:.0%} of each speaker's keyword clips, distinct words, one take each, "
        f"and ~{args.heldout_frac:.0%} of its sentences)"
    )
    spk_lines = "\n".join(
        f"| `{n}` | {e} | `{v}` | {p:g} {'(-p)' if e == 'espeak-ng' else 'Hz'} | "
        f"{r:g} {'wpm (-s)' if e == 'espeak-ng' else '(duration_stretch)'} |"
        for n, e, v, p, r in specs
    )
    text = f"""# speechmimic demo corpus

A small, fully synthetic, labelled English speech corpus that ships inside the
`speechmimic` package so that `speechmimic demo` works offline after `pip install`.
It is used as query audio for the speaker-encoder extraction demo (clips are sent
to the target, a student learns its frame-level outputs, `heldout` clips measure
fidelity) and for small SUPERB-style probes (keyword spotting, speaker ID).

**It is synthetic speech.** Speakers are TTS voice configurations, not people;
results on it say nothing definitive about natural speech.

## Counts

| | |
|---|---|
| speakers | {len(specs)} ({n_es} espeak-ng, {len(specs) - n_es} flite) |
| clips | {len(rows)} ({n_kw} keyword, {n_s} sentence) |
| split | {len(rows) - n_held} `pool`, {n_held} `heldout` |
| audio | {mins:.2f} min ({kw_min:.2f} min keywords, {mins - kw_min:.2f} min sentences) |
| format | 16 kHz, mono, 16-bit FLAC |

Per speaker: 10 keywords ({", ".join(KEYWORDS)}) x {args.keyword_takes} takes
with small random rate/pitch jitter, plus {args.sentences} sentences ({s_range} s)
generated from a fixed list of a few hundred common English words (alternating one- and
two-clause sentences).

## How it was made

```
{cmd}
```

Generated with espeak-ng {es_version} and flite {fl_version}. Output is byte-identical for a given seed and
engine versions; other engine versions will give slightly different audio. Keywords are
synthesised a little slower than the speaker's base rate (citation form), and re-synthesised
slower still if shorter than {args.keyword_min:g} s after trimming.

Size: 16 kHz 16-bit FLAC of this material costs ~16-17 kB/s, so the sentence count per
speaker is kept small to hold the folder near 8 MB; regenerate with more `--sentences`
for a larger local corpus.

Processing per clip: synthesise (espeak-ng 22.05 kHz, flite 8 or 16 kHz) ->
resample to 16 kHz with soxr (HQ) -> trim leading/trailing silence (frames more
than 40 dB below the loudest 10 ms frame; 50 ms kept on each side) -> peak-normalise
to a uniform random level in [{args.peak_range[0]}, {args.peak_range[1]}] -> 16-bit FLAC.
Note that `fl-kal` is an 8 kHz voice, so its audio has no energy above 4 kHz.

### Speakers

| speaker | engine | voice | base pitch | base rate |
|---|---|---|---|---|
{spk_lines}

## Licences

* **espeak-ng** (https://github.com/espeak-ng/espeak-ng) is GPL-3.0-or-later. The
  licence covers the program and its data; audio it produces is program output and
  is not covered by the program licence.
* **flite** (http://cmuflite.org) and its voices (kal, kal16, awb, rms, slt) are
  under a BSD-style CMU licence permitting free use and redistribution.
* The sentence word list and generator are part of speechmimic (Apache-2.0).

## Label schema (`manifest.jsonl`, one JSON object per line)

| key | type | meaning |
|---|---|---|
| `id` | str | unique; `<speaker>-kw-<word>-<take>` or `<speaker>-s<k>` |
| `path` | str | FLAC path relative to this folder (`audio/<id>.flac`) |
| `sampling_rate` | int | 16000 |
| `num_samples` | int | samples in the file |
| `duration` | float | seconds, exactly `num_samples / 16000` |
| `offset` | float | always 0.0 (whole file) |
| `labels.speaker` | str | speaker (voice configuration) name, see table above |
| `labels.engine` | str | `espeak-ng` or `flite` |
| `labels.kind` | str | `keyword` or `sentence` |
| `labels.keyword` | str | keyword clips only: the word |
| `labels.text` | str | sentence clips only: the sentence text as synthesised |
| `labels.split` | str | {split_doc} |
"""
    (out / "README.md").write_text(text)


if __name__ == "__main__":
    sys.exit(main())
