"""Which clips should a thief pay for, and does stage 1 help? Every selection strategy, with and
without stage-1 pre-training, at several query budgets, over several seeds, against two targets.

The thief's unlabelled corpus: the FSDD train split (take index >= 5) and the LibriSpeech subset of
``../shared/data``, cut into segments of at most 4 s (optionally enlarged with espeak-ng speech);
10% of it, split by source file, is held out for fidelity and never queried. Speech Commands is never
in the corpus: it is a probe, with the FSDD test split (digits), half-second crops of the LibriSpeech
speakers (speaker identity, where MFCC is not at its ceiling) and speaker verification on 3-s crops
of them (cosine scoring of every cross-utterance pair, scored as 1 - EER).

The grid runs on :mod:`speechmimic.experiment`: per seed, stage 1 runs once on the pool and scores
its clips; per (target, seed, budget, strategy, stage 1 or not) one extraction runs with the same
training compute (steps x batch seconds) whatever the budget; at 100% every strategy picks the whole
pool, so that point is run once and shared. Each run is scored by held-out fidelity (mean r2 over
the returned layers) and by linear probes (ridge on mean+std pooled features, 5-fold CV) reported as
the **recovered share** = (student - MFCC) / (target - MFCC), the student scored on its predictions of
the target's layers and each upstream on its best state. Every step is cached under ``--out``: a
rerun resumes where it stopped.

    python benchmarks/selection.py     # 228 extractions after 3 stage-1 runs: ~2.5 h on 2 CPU cores
    python benchmarks/selection.py --seeds 0 --targets resemblyzer --budgets 5 10     # a slice
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from speechmimic.corpus import Clip, hold_out_by_source, random_crops, read_manifest, scan, write_manifest
from speechmimic.distill import DistillConfig
from speechmimic.evaluate import compare
from speechmimic.experiment import Cell, Experiment, Grid
from speechmimic.pretrain import PretrainConfig
from speechmimic.probe.pooled import ProbeSet, split_scores, state_scores
from speechmimic.report import grid_table, mean_std, plot_grid, std
from speechmimic.score import checkpoint_accuracy
from speechmimic.select import STRATEGIES
from speechmimic.student import build_student
from speechmimic.testing import tiny_hf_model
from speechmimic.upstream import load_upstream

ROOT = Path(__file__).resolve().parents[1]
SEGMENT_SECONDS = 4.0
HELDOUT_SHARE = 0.10
CROPS_PER_UTTERANCE = 5
CROP_SECONDS = 0.5
VERIFY_SECONDS = 3.0  # speaker-verification trials: 2 crops per utterance, every cross-utterance pair
PROBES = ("words", "digits", "speakers", "verification")  # verification scores 1 - EER
TARGETS = ("resemblyzer", "tiny-hubert")


def _scan(root: Path, **kw) -> list[Clip]:
    result = scan(root, progress=False, **kw)
    for path, reason in result.skipped:
        print(f"skipped {path}: {reason}")
    return result.clips


def thief_corpus(data: Path, work: Path, synthetic: int, seed: int) -> tuple[list[Clip], list[Clip]]:
    """(pool, held-out) manifests of the thief's audio, written once under ``work/corpus``."""
    out = work / "corpus"
    if (out / "pool.jsonl").exists() and (out / "heldout.jsonl").exists():
        return read_manifest(out / "pool.jsonl"), read_manifest(out / "heldout.jsonl")
    fsdd = _scan(data / "fsdd" / "recordings", layout="fsdd")
    clips = [c for c in fsdd if c.labels["index"] >= 5]
    clips += _scan(data / "librispeech_test_other_subset", max_segment_seconds=SEGMENT_SECONDS)
    if synthetic:
        from speechmimic.recipes import espeak

        (task,) = espeak.build(work / "synthetic", n_utterances=synthetic, seed=seed, progress=True)
        for split in ("train", "dev", "test"):
            clips += [c for c in task.split(split) if c.duration <= SEGMENT_SECONDS]
    # Whole source files held out: no held-out second was ever queried, not even a neighbour segment.
    pool, heldout = hold_out_by_source(clips, HELDOUT_SHARE, seed)
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(pool, out / "pool.jsonl")
    write_manifest(heldout, out / "heldout.jsonl")
    return pool, heldout


def probe_sets(data: Path, seed: int) -> dict[str, ProbeSet]:
    """Speech Commands (30 words; never in the thief's corpus), FSDD test split (digits) and
    half-second crops of the 10 LibriSpeech speakers (speaker identity) and 3-s crops of them as
    speaker-verification trials."""
    words = _scan(data / "speech_commands_subset", layout="speech_commands")
    digits = [c for c in _scan(data / "fsdd" / "recordings", layout="fsdd") if c.labels["index"] < 5]
    utterances = _scan(data / "librispeech_test_other_subset", layout="librispeech")
    crops = random_crops(utterances, CROP_SECONDS, CROPS_PER_UTTERANCE, seed)
    trials = random_crops(utterances, VERIFY_SECONDS, 2, seed)
    return {
        "words": labelled("words", words, "word", "speaker"),
        "digits": labelled("digits", digits, "digit"),
        "speakers": labelled("speakers", crops, "speaker", "utterance"),
        "verification": labelled("verification", trials, "speaker", "utterance", task="verify"),
    }


def labelled(
    name: str, clips: list[Clip], label: str, group: str | None = None, task: str = "classify"
) -> ProbeSet:
    groups = [c.labels[group] for c in clips] if group else None
    return ProbeSet(name, clips, [str(c.labels[label]) for c in clips], groups, task)


def probe_scores(upstream, sets: dict[str, ProbeSet], cache: Path) -> dict:
    """:func:`state_scores` of a reference upstream, cached in ``cache``."""
    scores = json.loads(cache.read_text()) if cache.exists() else {}
    missing = {k: v for k, v in sets.items() if k not in scores}  # sets added since the cache was made
    if missing:
        scores.update(state_scores(upstream, missing))
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(scores, indent=2))
    return scores


def probe_student(cell: Cell, result: dict, sets: dict[str, ProbeSet], probed: dict) -> dict:
    """Each run's measure: probes of the student's predictions, where the target beats MFCC."""
    mine = {k: v for k, v in sets.items() if k in probed[cell.target]}
    upstream = load_upstream(result["student"]["path"])
    return state_scores(upstream, mine, keep=lambda s: s.startswith("pred."))


WHISPER = {"whisper-base": "whisper:base?layers=all", "whisper-tiny": "whisper:tiny.en?layers=all"}


def target_spec(name: str, work: Path) -> str:
    if name == "resemblyzer":
        return "resemblyzer?layers=all"
    if name in WHISPER:
        return WHISPER[name]
    path = work / "targets" / "tiny-hubert"
    if not (path / "config.json").exists():
        tiny_hf_model(path, "hubert", width=64, heads=4)
    return f"hf:{path}?layers=all"


def one_target_reference(target: str, data: Path, work: Path) -> tuple[str, dict, dict, dict]:
    """(spec, probe sets, reference scores of MFCC and ``target``, probes where the target beats
    MFCC) for a benchmark against one target; the target's probe answers are paid into
    ``work/ledgers/<target>/probes``."""
    sets = probe_sets(data, seed=0)
    spec = target_spec(target, work)
    upstreams = {
        "mfcc": load_upstream("mfcc"),
        target: load_upstream(spec, ledger=work / "ledgers" / target / "probes"),
    }
    reference = {
        name: probe_scores(upstream, sets, work / "probes" / f"{name}.json")
        for name, upstream in upstreams.items()
    }
    probed = {target: [p for p in PROBES if _best(reference[target][p]) > _best(reference["mfcc"][p])]}
    return spec, sets, reference, probed


def stage1_report(exp: Experiment, seed: int, heldout, digits: tuple[ProbeSet, ProbeSet], sets) -> dict:
    """What stage 1 learned: held-out masked accuracy and digit probes per iteration (cached)."""
    done = exp.stage1_dir(seed) / "stage1.json"
    if done.exists():
        return json.loads(done.read_text())
    last, _ = exp.stage1(seed)
    report = {"dir": str(last), "iterations": {}}
    for it in range(1, exp.grid.pretrain.iterations + 1):
        directory = exp.stage1_dir(seed) / f"iter{it}"
        report["iterations"][it] = {
            "masked": checkpoint_accuracy(directory, heldout, seed=seed, progress=False),
            "digits_official": split_scores(load_upstream(str(directory)), *digits),
        }
    report["probes"] = state_scores(load_upstream(str(last)), sets)
    done.write_text(json.dumps(report, indent=2))
    return report


def _best(scores: dict[str, float]) -> float:
    return max(scores.values())


def _pct(shares: list[float | None]) -> list[float]:
    return [100 * s for s in shares if s is not None]


def add_shares(rows: list[dict], reference: dict) -> None:
    """Each row's probe accuracies (best state) and shares of the target's advantage over MFCC."""
    for row in rows:
        for probe in PROBES:
            t, m = _best(reference[row["target"]][probe]), _best(reference["mfcc"][probe])
            accs = [_best(ms[probe]) for ms in row["measures"] if probe in ms]
            row[f"{probe}_acc"] = accs
            shares = [compare({"target": t, "student": a, "baseline": m}, "accuracy") for a in accs]
            row[f"{probe}_share"] = [s["recovered"] for s in shares]


def reference_table(reference: dict, columns: list[str]) -> str:
    """Probe accuracy of each reference upstream (its best state)."""
    lines = [
        "| probe (5-fold CV accuracy, verification 1 - EER; best state) | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for probe in PROBES:
        lines.append(
            f"| {probe} | " + " | ".join(f"{_best(reference[c][probe]):.3f}" for c in columns) + " |"
        )
    return "\n".join(lines)


def verdicts(rows: list[dict], stage1_reports: dict) -> list[str]:
    """The issue's acceptance questions, answered from the numbers."""
    out = []
    for seed, rep in sorted(stage1_reports.items()):
        for it, r in rep["iterations"].items():
            m, d = r["masked"], r["digits_official"]
            out.append(
                f"stage 1 seed {seed} iter {it}: held-out masked accuracy {m['accuracy']:.3f} vs "
                f"most-frequent unit {m['majority']:.3f}; FSDD digits (official split) {d['test']:.3f} "
                f"on {d['state']}"
            )
    for target in TARGETS:
        mine = [r for r in rows if r["target"] == target]
        at10 = [r for r in mine if r["budget"] == "10%"]
        s1 = [x for r in at10 if r["stage1"] for x in r["r2"]]
        sc = [x for r in at10 if not r["stage1"] for x in r["r2"]]
        if s1 and sc:
            out.append(
                f"{target} 10%: r2 with stage 1 {np.mean(s1):.3f} vs scratch {np.mean(sc):.3f} "
                "(all strategies and seeds)"
            )
        for s1_flag in (True, False):
            at5 = {r["strategy"]: r for r in mine if r["budget"] == "5%" and r["stage1"] == s1_flag}
            if (rnd := at5.get("random")) is None:
                continue
            beat = [
                f"{s} {np.mean(r['r2']):.3f}"
                for s, r in at5.items()
                if s != "random" and np.mean(r["r2"]) - np.mean(rnd["r2"]) > max(std(r["r2"]), std(rnd["r2"]))
            ]
            out.append(
                f"{target} 5% ({'stage 1' if s1_flag else 'scratch'}): random {mean_std(rnd['r2'])}; "
                f"informed strategies ahead by more than a seed std: {', '.join(beat) or 'none'}"
            )
        if at10 and any(s is not None for s in at10[0]["words_share"]):
            best = max(at10, key=lambda r: np.mean(_pct(r["words_share"])))
            out.append(
                f"{target} 10%: best words share {mean_std(_pct(best['words_share']), '{:.0f}%')} "
                f"({best['strategy']}, {'stage 1' if best['stage1'] else 'scratch'}); its speakers share "
                f"{mean_std(_pct(best['speakers_share']), '{:.0f}%')}"
            )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="the shared data folder")
    ap.add_argument("--out", default="/tmp/speechmimic-bench-selection", help="work folder (resumable)")
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS, help="targets to attack")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default: 0 1 2)")
    ap.add_argument("--budgets", nargs="+", type=float, default=[5, 10, 25, 100], help="percents of the pool")
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    for flag, typ, default, text in (
        ("--steps", int, 200, "stage-2 steps per run, every budget"),
        ("--batch-seconds", float, 12.0, "stage-2 batch cap"),
        ("--lr", float, 1e-3, "stage-2 peak learning rate"),
        ("--stage1-steps", int, 800, "stage-1 steps per iteration"),
        ("--stage1-iterations", int, 2, "stage-1 iterations (1 or 2)"),
        ("--synthetic", int, 0, "espeak-ng utterances added to the corpus"),
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
    pool, heldout = thief_corpus(data, work, args.synthetic, seed=0)
    pool_s = sum(c.duration for c in pool)
    held_s = sum(c.duration for c in heldout)
    print(
        f"thief corpus: pool {len(pool)} clips {pool_s:.0f} s; held out {len(heldout)} clips {held_s:.0f} s"
    )
    sets = probe_sets(data, seed=0)
    train_clips = [c for c in _scan(data / "fsdd" / "recordings", layout="fsdd") if c.labels["index"] >= 5]
    digits = (labelled("digits_train", train_clips, "digit"), sets["digits"])
    specs = {name: target_spec(name, work) for name in args.targets}
    n, n1 = args.steps, args.stage1_steps
    distill = DistillConfig(
        n, args.lr, warmup=max(1, n // 10), batch_seconds=args.batch_seconds, checkpoint_every=max(50, n // 4)
    )
    stage1 = PretrainConfig(
        n1, warmup=max(1, n1 // 10), batch_seconds=24.0, iterations=args.stage1_iterations
    )
    budgets = [f"{b:g}%" for b in sorted(args.budgets)]
    grid = Grid(specs, budgets, args.strategies, [True, False], args.seeds, distill=distill, pretrain=stage1)
    # Stage 1 once per seed (two threads: nothing else runs yet), and what it learned.
    prep = Experiment(work, grid, pool, heldout)
    stage1_reports = {seed: stage1_report(prep, seed, heldout, digits, sets) for seed in args.seeds}

    # What no learning gives: MFCC, and a student with random weights (wide random features already
    # beat 39-d MFCC under a linear probe, so a share over MFCC is read against this row too).
    random_student = work / "random_student"
    if not (random_student / "config.json").exists():
        torch.manual_seed(0)
        build_student("small").save(random_student)
    plain = {"mfcc": load_upstream("mfcc"), "random student": load_upstream(str(random_student))}
    official = {name: split_scores(upstream, *digits) for name, upstream in plain.items()}
    ledgers = {name: work / "ledgers" / name / "probes" for name in specs}
    upstreams = {**plain, **{name: load_upstream(spec, ledger=ledgers[name]) for name, spec in specs.items()}}
    reference = {
        name: probe_scores(upstream, sets, work / "probes" / f"{name.replace(' ', '_')}.json")
        for name, upstream in upstreams.items()
    }
    print(reference_table(reference, list(reference)))

    probed = {
        name: [p for p in PROBES if _best(reference[name][p]) > _best(reference["mfcc"][p])] for name in specs
    }
    measure = partial(probe_student, sets=sets, probed=probed)
    exp = Experiment(work, grid, pool, heldout, measure=measure, measure_id=probed)
    print(f"{len(grid.cells(pool))} extractions ({args.workers} at a time)")
    records = exp.run_all(workers=args.workers)
    rows = exp.summarise(records)
    add_shares(rows, reference)
    png = plot_grid(rows, work / "selection.png", args.strategies)
    shares = {
        f"{p} share": partial(lambda r, p: mean_std(_pct(r[f"{p}_share"]), "{:.0f}%"), p=p) for p in PROBES
    }
    stage1_refs = {f"stage 1 (seed {k})": v["probes"] for k, v in stage1_reports.items()}
    lines = [
        "# Selection benchmark",
        "",
        f"Pool {len(pool)} clips / {pool_s:.0f} s (FSDD train takes + LibriSpeech subset in <= 4 s segments"
        + (f" + {args.synthetic} espeak-ng utterances" if args.synthetic else "")
        + f"); held-out {len(heldout)} clips; seeds {args.seeds}; stage 2: {args.steps} steps x "
        f"{args.batch_seconds:g} s batches at every budget; stage 1: {args.stage1_iterations} x "
        f"{args.stage1_steps} steps.",
        "",
        "## Stage 1",
        "",
        *[f"- {v}" for v in verdicts([], stage1_reports)],
        *[f"- {k} on FSDD digits (official split, same probe): {v['test']:.3f}" for k, v in official.items()],
        "",
        "## Probe references",
        "",
        reference_table({**reference, **stage1_refs}, ["mfcc", "random student", *stage1_refs, *specs]),
        "",
    ]
    for name in specs:
        lines += [f"## {name}", "", grid_table([r for r in rows if r["target"] == name], shares), ""]
    lines += [
        "## Verdicts",
        "",
        *[f"- {v}" for v in verdicts(rows, {})],
        "",
        f"![r2 vs queried seconds]({png.name})",
    ]
    text = "\n".join(lines) + "\n"
    (work / "selection.md").write_text(text)
    summary = {"stage1": stage1_reports, "digits_official": official, "reference": reference, "rows": rows}
    summary.update(runs=records, seconds=round(time.time() - t_start, 1))
    (work / "selection.json").write_text(json.dumps(summary, indent=2))
    print(text)
    print(f"wrote {work / 'selection.md'}, {work / 'selection.json'} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
