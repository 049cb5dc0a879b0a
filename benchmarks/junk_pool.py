"""Does informed selection earn its keep on a thief's corpus as it really is? Every strategy at a
small budget of a pool that is half junk: room tone, noise, music, near-duplicates and long files.

The speech is the selection benchmark's pool (``benchmarks/selection.py``: FSDD train takes + the
LibriSpeech subset of ``../shared/data`` in <= 4 s segments; the held-out clips, probes and target
are its too). Beside it, written once under ``--out/junk`` as 16-bit WAV files and seeded, junk
worth about as many seconds as the speech, each kind in proportion to the speech seconds:

    room tone       0.15   pink noise at -66..-54 dBFS with mains hum and the odd click: what a
                           recorder hears when nobody speaks (loud enough that ``scan`` keeps it)
    noise           0.15   white, pink or brown noise, or hum with its harmonics, at -30..-10 dBFS
    music           0.15   synthesised: chords of harmonic tones on a beat, with a kick drum
    near-duplicate  0.20   pool speech again, twice over: gain +-4 dB, noise at 30-40 dB SNR, shifted
    long file       0.30   files of 120 s of room tone, noise or music with pool speech spliced into
                           15% of it, scanned into 4-s segments like the rest

The held-out clips stay speech: they are what the target's honest users send. Informed strategies
rank by the scores of a stage-1 student trained on this pool (per seed); every run trains from
scratch (the selection benchmark found stage 1 costs speaker share), with the same steps whatever the
strategy. Each row: what share of the queried seconds was junk, held-out r2 and the recovered
probe shares (mean ± std over seeds); the verdict asks whether the best informed strategy beats
random by more than 3 seed-std (the larger of the two) on r2 and on each probe.

    python benchmarks/junk_pool.py           # 6 strategies x 3 seeds at 5%, after 3 stage-1 runs

Stage 1 here only ranks clips, so it is short by default (1 x 400 steps, against the selection
benchmark's 2 x 800): on 2 CPU cores the whole benchmark then takes about half an hour.
    python benchmarks/junk_pool.py --strategies random diversity --seeds 0

Every step is cached under ``--out``: a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import soundfile as sf
from selection import (
    PROBES,
    SEGMENT_SECONDS,
    _pct,
    _scan,
    add_shares,
    one_target_reference,
    probe_student,
    reference_table,
    thief_corpus,
)

from speechmimic.audio import SAMPLE_RATE
from speechmimic.corpus import Clip, read_manifest, write_manifest
from speechmimic.distill import DistillConfig
from speechmimic.experiment import Cell, Experiment, Grid
from speechmimic.pretrain import PretrainConfig
from speechmimic.report import mean_std, std
from speechmimic.select import STRATEGIES

ROOT = Path(__file__).resolve().parents[1]
TARGET = "resemblyzer"
# Each kind of junk, as a share of the speech seconds.
JUNK = {"room tone": 0.15, "noise": 0.15, "music": 0.15, "near-duplicate": 0.20, "long file": 0.30}
LONG_FILE_SECONDS = 120.0
LONG_FILE_SPEECH = 0.15


def _db(rng: np.random.Generator, low: float, high: float) -> float:
    return 10 ** (rng.uniform(low, high) / 20)


def _rms_to(x: np.ndarray, level: float) -> np.ndarray:
    return (x * (level / max(float(np.sqrt(np.mean(x**2))), 1e-12))).astype(np.float32)


def _coloured(rng: np.random.Generator, n: int, colour: str) -> np.ndarray:
    white = rng.standard_normal(n)
    if colour == "white":
        return white
    if colour == "brown":
        x = np.cumsum(white)
        return x - np.convolve(x, np.ones(4001) / 4001, mode="same")  # no drift out of range
    spec = np.fft.rfft(white)  # pink: 1/f power
    spec /= np.sqrt(np.maximum(np.arange(len(spec)), 1))
    return np.fft.irfft(spec, n)


def _hum(rng: np.random.Generator, n: int) -> np.ndarray:
    t = np.arange(n) / SAMPLE_RATE
    f0 = rng.choice([50.0, 60.0])
    return sum(
        rng.uniform(0.2, 1) / k * np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6.3)) for k in (1, 2, 3, 5)
    )


def room_tone(rng: np.random.Generator, n: int) -> np.ndarray:
    x = _rms_to(_coloured(rng, n, "pink"), _db(rng, -66, -54)) + _rms_to(_hum(rng, n), _db(rng, -75, -65))
    for at in rng.integers(0, n, rng.poisson(n / SAMPLE_RATE / 3)):  # the odd click
        x[at : at + 40] += _db(rng, -40, -30) * np.exp(-np.arange(len(x[at : at + 40])) / 8)
    return x.astype(np.float32)


def noise(rng: np.random.Generator, n: int) -> np.ndarray:
    kind = rng.choice(["white", "pink", "brown", "hum"])
    x = _hum(rng, n) if kind == "hum" else _coloured(rng, n, kind)
    return _rms_to(x, _db(rng, -30, -10))


def music(rng: np.random.Generator, n: int) -> np.ndarray:
    t = np.arange(n) / SAMPLE_RATE
    beat = 60 / rng.uniform(70, 160)
    root = rng.uniform(110, 262)
    scale = root * 2 ** (np.array([0, 2, 4, 7, 9, 12, 14, 16]) / 12)  # a major pentatonic, two octaves
    x = np.zeros(n)
    start = 0.0
    while start < n / SAMPLE_RATE:
        length = beat * rng.choice([0.5, 1, 2])
        on = (t >= start) & (t < start + length)
        local = t[on] - start
        env = np.minimum(local / 0.01, 1) * np.exp(-local / (0.6 * length))
        for f in rng.choice(scale, rng.integers(1, 4), replace=False):  # a note or a chord
            x[on] += env * sum(np.sin(2 * np.pi * f * k * local) / k for k in range(1, 7))
        kick = np.exp(-local / 0.05) * np.sin(2 * np.pi * 60 * local * np.exp(-local / 0.1))
        x[on] += 2 * kick
        start += length
    return _rms_to(x, _db(rng, -24, -12))


def near_duplicate(rng: np.random.Generator, wav: np.ndarray) -> np.ndarray:
    shift = np.zeros(rng.integers(0, int(0.04 * SAMPLE_RATE)), np.float32)
    x = np.concatenate([shift, wav]) * _db(rng, -4, 4)
    level = float(np.sqrt(np.mean(x**2))) / _db(rng, 30, 40)
    return (x + _rms_to(rng.standard_normal(len(x)), level)).astype(np.float32)


def long_file(rng: np.random.Generator, speech: list[Clip]) -> np.ndarray:
    n = int(LONG_FILE_SECONDS * SAMPLE_RATE)
    bed = [room_tone, noise, music][rng.integers(3)](rng, n)
    if bed.std() > 0.01:  # speech over loud noise or music: the bed drops under it
        bed *= 0.3
    filled = 0
    while filled < LONG_FILE_SPEECH * n:
        wav = speech[rng.integers(len(speech))].load()
        at = int(rng.integers(0, n - len(wav)))
        bed[at : at + len(wav)] += wav
        filled += len(wav)
    return bed


def write_junk(speech: list[Clip], out: Path, seed: int) -> None:
    """The junk WAV files of the module docstring under ``out/<kind>/`` (written once; a file that
    exists is kept, so an interrupted run resumes)."""
    seconds = sum(c.duration for c in speech)
    for kind, share in JUNK.items():
        folder = out / kind.replace(" ", "-")
        folder.mkdir(parents=True, exist_ok=True)
        done, i = 0.0, 0
        while done < share * seconds:
            # Each file's randomness is its own (seeded by kind and index): a resumed run writes
            # the same files as an unbroken one.
            r = np.random.default_rng([seed, list(JUNK).index(kind), i])
            if kind == "near-duplicate":
                src = speech[int(r.integers(len(speech)))]
                wavs = [near_duplicate(r, src.load()) for _ in range(2)]
            elif kind == "long file":
                wavs = [long_file(r, speech)]
            else:
                make = {"room tone": room_tone, "noise": noise, "music": music}[kind]
                wavs = [make(r, int(r.uniform(1.0, SEGMENT_SECONDS) * SAMPLE_RATE))]
            for j, wav in enumerate(wavs):
                path = folder / f"{i:05d}-{j}.wav"
                if not path.exists():
                    tmp = path.with_suffix(".tmp")
                    sf.write(tmp, np.clip(wav, -1, 1), SAMPLE_RATE, subtype="PCM_16", format="WAV")
                    tmp.replace(path)
                done += len(wav) / SAMPLE_RATE
            i += 1


def junk_kind(clip: Clip, junk: Path) -> str:
    """``speech`` or the kind of junk a clip of the pool is (from its folder under ``junk``)."""
    path = Path(clip.path).resolve()
    if not path.is_relative_to(junk.resolve()):
        return "speech"
    folder = path.relative_to(junk.resolve()).parts[0]
    return {k.replace(" ", "-"): k for k in JUNK}[folder]


def junk_corpus(data: Path, work: Path, seed: int) -> tuple[list[Clip], list[Clip]]:
    """(pool, held-out): the selection benchmark's speech pool with the junk added (held-out: speech)."""
    manifest = work / "corpus" / "junk_pool.jsonl"
    speech, heldout = thief_corpus(data, work, 0, seed=0)
    if manifest.exists():
        return read_manifest(manifest), heldout
    print(f"writing junk beside {len(speech)} speech clips ({sum(c.duration for c in speech):.0f} s)")
    write_junk(speech, work / "junk", seed)
    junk = _scan(work / "junk", max_segment_seconds=SEGMENT_SECONDS)
    pool = speech + junk
    write_manifest(pool, manifest)
    return pool, heldout


def junk_share(exp: Experiment, record: dict, kinds: dict[str, str]) -> float:
    """The share of a run's queried seconds that was junk."""
    chosen = read_manifest(exp.run_dir(Cell(**record["cell"])) / "selected.jsonl")
    total = sum(c.duration for c in chosen)
    return sum(c.duration for c in chosen if kinds[c.id] != "speech") / total


def verdict(rows: dict[str, dict]) -> list[str]:
    """Whether the strategy with the best held-out r2 beats random by more than 3 seed-std (the
    larger of the two), on r2 and on each probe."""
    if "random" not in rows or len(rows) < 2:
        return ["(random and at least one other strategy are needed for a verdict)"]
    best = max((s for s in rows if s != "random"), key=lambda s: np.mean(rows[s]["r2"]))
    out, wins = [], []
    for key, label in [("r2", "held-out r2"), *[(f"{p}_share", f"{p} share") for p in PROBES]]:
        mine, rnd = rows[best][key], rows["random"][key]
        if key != "r2":
            mine, rnd = _pct(mine), _pct(rnd)
        if not mine or not rnd:
            continue
        gap, bar = np.mean(mine) - np.mean(rnd), 3 * max(std(mine), std(rnd))
        fmt = "{:.3f}" if key == "r2" else "{:.0f}%"
        beats = gap > bar
        wins += [label] if beats else []
        out.append(
            f"{label}: {best} {mean_std(mine, fmt)} vs random {mean_std(rnd, fmt)}: gap {fmt.format(gap)}, "
            f"3 seed-std {fmt.format(bar)}: {'beats random' if beats else 'not by 3 seed-std'}"
        )
    out.append(
        f"{best} (the best held-out r2 of the other strategies) beats random by 3 seed-std on: "
        + (", ".join(wins) or "nothing")
    )
    return out


def table(rows: dict[str, dict]) -> str:
    head = ["strategy", "seeds", "junk share of queried s", "held-out r2", *[f"{p} share" for p in PROBES]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in rows.items():
        cells = [name, str(len(row["seeds"])), mean_std(_pct(row["junk"]), "{:.0f}%"), mean_std(row["r2"])]
        cells += [mean_std(_pct(row[f"{p}_share"]), "{:.0f}%") for p in PROBES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="the shared data folder")
    ap.add_argument("--out", default="/tmp/speechmimic-bench-junk", help="work folder (resumable)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default: 0 1 2)")
    ap.add_argument("--budget", default="5%", help="what each run queries (default: 5%%)")
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    for flag, typ, default, text in (
        ("--steps", int, 200, "stage-2 steps per run"),
        ("--batch-seconds", float, 12.0, "stage-2 batch cap"),
        ("--lr", float, 1e-3, "stage-2 peak learning rate"),
        ("--stage1-steps", int, 400, "stage-1 steps per iteration"),
        ("--stage1-iterations", int, 1, "stage-1 iterations (1 or 2)"),
        ("--workers", int, 2, "extractions run side by side, 1 thread each"),
    ):
        ap.add_argument(flag, type=typ, default=default, help=f"{text} (default: {default:g})")
    args = ap.parse_args(argv)

    data, work = Path(args.data), Path(args.out)
    if not data.is_dir():
        print(f"{data} is absent: this benchmark needs the real speech in shared/data (see its README)")
        return 1
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    pool, heldout = junk_corpus(data, work, seed=0)
    kinds = {c.id: junk_kind(c, work / "junk") for c in pool}
    composition = {
        k: sum(c.duration for c in pool if kinds[c.id] == k) for k in ["speech", *JUNK] if k in kinds.values()
    }
    pool_s = sum(composition.values())
    print("pool: " + ", ".join(f"{k} {s:.0f} s ({100 * s / pool_s:.0f}%)" for k, s in composition.items()))

    spec, sets, reference, probed = one_target_reference(TARGET, data, work)
    n, n1 = args.steps, args.stage1_steps
    grid = Grid(
        {TARGET: spec},
        [args.budget],
        args.strategies,
        [False],
        args.seeds,
        distill=DistillConfig(
            n,
            args.lr,
            warmup=max(1, n // 10),
            batch_seconds=args.batch_seconds,
            checkpoint_every=max(50, n // 4),
        ),
        pretrain=PretrainConfig(
            n1, warmup=max(1, n1 // 10), batch_seconds=24.0, iterations=args.stage1_iterations
        ),
    )
    measure = partial(probe_student, sets=sets, probed=probed)
    exp = Experiment(work, grid, pool, heldout, measure=measure, measure_id=probed)
    records = exp.run_all(workers=args.workers)
    rows = {}
    for row in exp.summarise(records):
        mine = [r for r in records if r["cell"]["strategy"] == row["strategy"]]
        row["junk"] = [junk_share(exp, r, kinds) for r in sorted(mine, key=lambda r: r["cell"]["seed"])]
        rows[row["strategy"]] = row
    add_shares(list(rows.values()), reference)
    rows = {s: rows[s] for s in args.strategies if s in rows}

    setup = (
        f"Target {TARGET} (three layers); pool {len(pool)} clips, {pool_s:.0f} s: "
        + ", ".join(f"{k} {100 * s / pool_s:.0f}%" for k, s in composition.items())
        + f"; {args.budget} queried; seeds {args.seeds}; every run from scratch, {args.steps} stage-2 "
        f"steps x {args.batch_seconds:g} s batches; informed strategies rank by a stage-1 student "
        f"({args.stage1_iterations} x {args.stage1_steps} steps) of this pool. Shares: of the target's "
        "advantage over MFCC on each probe (verification: on 1 - EER)."
    )
    lines = ["# Selection on a junk-laden pool", "", setup, "", reference_table(reference, list(reference))]
    lines += ["", table(rows), "", "## Verdict", "", *[f"- {v}" for v in verdict(rows)], ""]
    text = "\n".join(lines)
    (work / "junk_pool.md").write_text(text)
    summary = {"composition_seconds": composition, "reference": reference, "rows": rows, "runs": records}
    summary["seconds"] = round(time.time() - t_start, 1)
    (work / "junk_pool.json").write_text(json.dumps(summary, indent=2))
    print(text)
    print(f"wrote {work / 'junk_pool.md'} and {work / 'junk_pool.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
