"""Which clips should a thief pay for, and does stage 1 help? Every selection strategy, with and
without stage-1 pre-training, at several query budgets, over several seeds, against two targets.

The thief's unlabelled corpus: the FSDD train split (take index >= 5) and the LibriSpeech subset of
``../shared/data``, cut into segments of at most 4 s (optionally enlarged with espeak-ng speech);
10% of it, split by source file, is held out for fidelity and never queried. Speech Commands is never
in the corpus: it is a probe, with the FSDD test split (digits) and half-second crops of the LibriSpeech
speakers (speaker identity, where MFCC is not at its ceiling).

Per seed, stage 1 (``speechmimic pretrain``) runs once on the pool and scores its clips (uncertainty,
embeddings). Per (target, seed, budget, strategy, stage 1 or not) one extraction runs with the same
training compute (steps x batch seconds) whatever the budget; at 100% every strategy picks the whole
pool, so that point is run once and shared. Each run is scored by held-out fidelity (mean r2 over
the returned layers) and by linear probes (ridge on mean+std pooled features, 5-fold CV) reported as
the **recovered share** = (student - MFCC) / (target - MFCC), the student scored on its predictions of
the target's layers and each upstream on its best state.

Every step caches its result under ``--out``: a rerun resumes where it stopped.

    python benchmarks/selection.py     # 228 extractions after 3 stage-1 runs: ~2.5 h on 2 CPU cores
    python benchmarks/selection.py --seeds 0 --targets resemblyzer --budgets 5 10     # a slice
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from speechmimic.corpus import Clip, read_manifest, scan, write_manifest
from speechmimic.distill import DistillConfig
from speechmimic.evaluate import compare
from speechmimic.extract import extract, query_clips
from speechmimic.fidelity import mean_r2
from speechmimic.ledger import Ledger
from speechmimic.pretrain import PretrainConfig, checkpoint_accuracy, pretrain, score_clips
from speechmimic.probe.pooled import cv_by_state, pooled_features, split_accuracy
from speechmimic.select import STRATEGIES, Budget, Scores
from speechmimic.student import build_student
from speechmimic.targets import load_target
from speechmimic.upstream import load_upstream

ROOT = Path(__file__).resolve().parents[1]
SEGMENT_SECONDS = 4.0
HELDOUT_SHARE = 0.10
CROPS_PER_UTTERANCE = 5
CROP_SECONDS = 0.5
PROBES = ("words", "digits", "speakers")
TARGETS = ("resemblyzer", "tiny-hubert")


# -- data ---------------------------------------------------------------------------------------------


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
    # Hold out whole source files, so no held-out second was ever queried, not even a neighbour segment.
    by_file: dict[str, list[Clip]] = defaultdict(list)
    for c in clips:
        by_file[c.path].append(c)
    files = sorted(by_file)
    random.Random(seed).shuffle(files)
    total, held, held_files = sum(c.duration for c in clips), 0.0, set()
    for f in files:
        if held >= HELDOUT_SHARE * total:
            break
        held_files.add(f)
        held += sum(c.duration for c in by_file[f])
    pool = [c for c in clips if c.path not in held_files]
    heldout = [c for c in clips if c.path in held_files]
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(pool, out / "pool.jsonl")
    write_manifest(heldout, out / "heldout.jsonl")
    return pool, heldout


@dataclass
class ProbeSet:
    name: str
    clips: list[Clip]
    labels: list[str]
    groups: list[str] | None  # clips of one group never straddle a fold


_WAVES: dict[str, list[np.ndarray]] = {}


def waves(ps: ProbeSet) -> list[np.ndarray]:
    """The probe set's waveforms, decoded once per process."""
    if ps.name not in _WAVES:
        _WAVES[ps.name] = [c.load() for c in ps.clips]
    return _WAVES[ps.name]


def probe_sets(data: Path, seed: int) -> dict[str, ProbeSet]:
    """Speech Commands (30 words; never in the thief's corpus), FSDD test split (digits) and
    half-second crops of the 10 LibriSpeech speakers (speaker identity)."""
    words = _scan(data / "speech_commands_subset", layout="speech_commands")
    digits = [c for c in _scan(data / "fsdd" / "recordings", layout="fsdd") if c.labels["index"] < 5]
    rng = random.Random(seed)
    crops = []
    for utt in _scan(data / "librispeech_test_other_subset", layout="librispeech"):
        n = int(CROP_SECONDS * utt.sampling_rate)
        for k in range(CROPS_PER_UTTERANCE):
            start = rng.randrange(0, utt.num_samples - n + 1)
            crops.append(
                Clip(
                    f"{utt.id}#{k}",
                    utt.path,
                    utt.sampling_rate,
                    n,
                    CROP_SECONDS,
                    utt.offset + start / utt.sampling_rate,
                    {**utt.labels, "utterance": utt.id},
                )
            )
    return {
        "words": ProbeSet(
            "words", words, [c.labels["word"] for c in words], [c.labels["speaker"] for c in words]
        ),
        "digits": ProbeSet("digits", digits, [str(c.labels["digit"]) for c in digits], None),
        "speakers": ProbeSet(
            "speakers", crops, [c.labels["speaker"] for c in crops], [c.labels["utterance"] for c in crops]
        ),
    }


def probe_scores(upstream_or_spec, sets: dict[str, ProbeSet], cache: Path | None, keep=None) -> dict:
    """Per probe task, the 5-fold CV accuracy of each hidden state (``keep`` filters state names)."""
    if cache is not None and cache.exists():
        return json.loads(cache.read_text())
    upstream = load_upstream(upstream_or_spec) if isinstance(upstream_or_spec, str) else upstream_or_spec
    out = {}
    for name, ps in sets.items():
        feats = pooled_features(upstream, waves(ps), progress=False)
        feats = {k: v for k, v in feats.items() if keep is None or keep(k)}
        out[name] = cv_by_state(feats, ps.labels, groups=ps.groups)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(out, indent=2))
    return out


# -- targets ------------------------------------------------------------------------------------------


def target_spec(name: str, work: Path) -> str:
    if name == "resemblyzer":
        return "resemblyzer?layers=all"
    if name == "tiny-hubert":
        path = work / "targets" / "tiny-hubert"
        if not (path / "config.json").exists():
            import transformers

            torch.manual_seed(0)
            cfg = transformers.HubertConfig(
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=128,
                conv_dim=(64,) * 7,
                conv_kernel=(10, 3, 3, 3, 3, 2, 2),
                conv_stride=(5, 2, 2, 2, 2, 2, 2),
                num_conv_pos_embeddings=16,
                num_conv_pos_embedding_groups=4,
            )
            transformers.HubertModel(cfg).save_pretrained(path)
        return f"hf:{path}?layers=all"
    raise ValueError(f"unknown target {name!r}; choose from {TARGETS}")


def pay_everything(spec: str, pool: list[Clip], heldout: list[Clip], work: Path, name: str) -> None:
    """Query the whole pool and held-out set once, so parallel runs only read the ledgers.

    Runs still train on the clips they selected only; the pool ledger is a cache of answers the
    thief would pay for when selected, the held-out ledger is the evaluator's.
    """
    target = load_target(spec)
    query_clips(target, pool, Ledger(work / "ledgers" / name / "pool"), progress=True)
    query_clips(target, heldout, Ledger(work / "ledgers" / name / "heldout"), progress=True)


# -- stage 1 ------------------------------------------------------------------------------------------


def stage1(pool, heldout, sets_digits, work: Path, cfg: PretrainConfig) -> dict:
    """Pretrain on the pool, score its clips, and measure what stage 1 learned (cached)."""
    out = work / "stage1" / f"seed{cfg.seed}"
    done = out / "stage1.json"
    if done.exists():
        return json.loads(done.read_text())
    pretrain(pool, out, cfg, progress=True)
    last = out / f"iter{cfg.iterations}"
    scores_path = out / "scores.npz"
    if not scores_path.exists():
        score_clips(last, pool, seed=cfg.seed).save(scores_path)
    report = {"dir": str(last), "scores": str(scores_path), "iterations": {}}
    train_d, test_d = sets_digits
    for it in range(1, cfg.iterations + 1):
        acc = checkpoint_accuracy(out / f"iter{it}", heldout, seed=cfg.seed, progress=False)
        report["iterations"][it] = {
            "masked": acc,
            "digits_official": digit_probe_official(load_upstream(str(out / f"iter{it}")), train_d, test_d),
        }
    done.write_text(json.dumps(report, indent=2))
    return report


def digit_probe_official(upstream, train: ProbeSet, test: ProbeSet) -> dict:
    """FSDD's usual split (train take >= 5, test take < 5): the state is chosen by 5-fold CV on the
    training part, then scored once on the test part."""
    tr = pooled_features(upstream, waves(train), progress=False)
    te = pooled_features(upstream, waves(test), progress=False)
    cv = cv_by_state(tr, train.labels)
    best = max(cv, key=cv.get)
    return {
        "state": best,
        "cv": cv,
        "test": round(split_accuracy(tr[best], train.labels, te[best], test.labels), 4),
    }


# -- one extraction -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    target: str
    spec: str
    seed: int
    budget: float  # percent of the pool's seconds
    strategy: str
    stage1: bool
    steps: int
    batch_seconds: float
    warmup: int
    lr: float
    probes: tuple[str, ...]  # the probe tasks on which the target beats MFCC (the others mean nothing)

    @property
    def name(self) -> str:
        init = "stage1" if self.stage1 else "scratch"
        return f"{self.target}/b{self.budget:g}/{self.strategy}-{init}-s{self.seed}"


_TARGETS: dict = {}


def _worker_init() -> None:
    torch.set_num_threads(1)  # two one-thread runs side by side beat one two-thread run on 2 cores


def run_job(job: Job, work: Path, sets: dict[str, ProbeSet]) -> dict:
    run_dir = work / "runs" / job.name
    done = run_dir / "bench.json"
    if done.exists():
        cached = json.loads(done.read_text())
        if cached["job"] == json.loads(json.dumps(asdict(job))):  # as JSON stores it: tuples are lists
            return cached
    t0 = time.time()
    pool = read_manifest(work / "corpus" / "pool.jsonl")
    heldout = read_manifest(work / "corpus" / "heldout.jsonl")
    s1 = json.loads((work / "stage1" / f"seed{job.seed}" / "stage1.json").read_text())
    if job.spec not in _TARGETS:
        _TARGETS[job.spec] = load_target(job.spec)
    result = extract(
        _TARGETS[job.spec],
        pool,
        run_dir,
        Budget(seconds=job.budget / 100 * sum(c.duration for c in pool)),
        strategy=job.strategy,
        seed=job.seed,
        stage1=s1["dir"] if job.stage1 else None,
        scores=Scores.load(s1["scores"]),
        distill_cfg=DistillConfig(
            steps=job.steps,
            batch_seconds=job.batch_seconds,
            warmup=job.warmup,
            lr=job.lr,
            seed=job.seed,
            checkpoint_every=max(50, job.steps // 4),
        ),
        ledger_dir=work / "ledgers" / job.target / "pool",
        heldout=heldout,
        eval_ledger_dir=work / "ledgers" / job.target / "heldout",
        progress=False,
    )
    probes = probe_scores(
        result["student"]["path"],
        {k: v for k, v in sets.items() if k in job.probes},
        None,
        keep=lambda s: s.startswith("pred."),
    )
    out = {
        "job": asdict(job),
        "queries": result["queries"],
        "queried_seconds": result["queried_seconds"],
        "fidelity": result["fidelity"],
        "r2": round(mean_r2(result["fidelity"]), 4),
        "probes": probes,
        "seconds": round(time.time() - t0, 1),
    }
    done.write_text(json.dumps(out, indent=2))
    return out


# -- tables and plot ----------------------------------------------------------------------------------


def _std(values: list[float]) -> float:
    """Sample standard deviation over seeds (0 for one seed)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _ms(values: list[float], fmt: str = "{:.3f}") -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(np.mean(values))} ± {fmt.format(_std(values))}"


def _pct(shares: list[float | None]) -> list[float]:
    return [100 * s for s in shares if s is not None]


def _best(scores: dict[str, float]) -> float:
    return max(scores.values())


def summarise(results: list[dict], reference: dict) -> dict:
    """Group runs into configurations: mean and std over seeds of r2 and each probe's recovered share."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        j = r["job"]
        groups[(j["target"], j["budget"], j["strategy"], j["stage1"])].append(r)
    rows = []
    for (target, budget, strategy, s1), runs in sorted(
        groups.items(), key=lambda kv: (TARGETS.index(kv[0][0]), kv[0][1], kv[0][3], kv[0][2])
    ):
        row = {
            "target": target,
            "budget": budget,
            "strategy": "all" if budget >= 100 else strategy,
            "stage1": s1,
            "seeds": sorted(r["job"]["seed"] for r in runs),
            "queried_seconds": [r["queried_seconds"] for r in runs],
            "queries": [r["queries"] for r in runs],
            "r2": [r["r2"] for r in runs],
        }
        for probe in PROBES:
            t = _best(reference[target][probe])
            m = _best(reference["mfcc"][probe])
            # Not probed where the target is no better than MFCC: a share of nothing means nothing.
            accs = [_best(r["probes"][probe]) for r in runs if probe in r["probes"]]
            row[f"{probe}_acc"] = accs
            row[f"{probe}_share"] = [
                compare({"target": t, "student": a, "baseline": m}, "accuracy")["recovered"] for a in accs
            ]
        rows.append(row)
    return {"rows": rows}


def reference_table(reference: dict, columns: list[str]) -> str:
    """Probe accuracy of each reference upstream (its best state)."""
    lines = [
        "| probe (5-fold CV, best state) | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for probe in PROBES:
        lines.append(
            f"| {probe} | " + " | ".join(f"{_best(reference[c][probe]):.3f}" for c in columns) + " |"
        )
    return "\n".join(lines)


def grid_table(rows: list[dict], target: str) -> str:
    lines = [
        "| budget | strategy | stage 1 | seeds | queried s | held-out r2 | words share | digits share "
        "| speakers share |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["target"] != target:
            continue
        shares = " | ".join(_ms(_pct(r[f"{p}_share"]), "{:.0f}%") for p in PROBES)
        lines.append(
            f"| {r['budget']:g}% | {r['strategy']} | {'yes' if r['stage1'] else 'no'} | {len(r['seeds'])} | "
            f"{np.mean(r['queried_seconds']):.0f} | {_ms(r['r2'])} | {shares} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], targets: list[str], strategies: list[str], path: Path) -> Path:
    """Held-out r2 against queried seconds, one line per strategy; a panel per (target, stage 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        2, len(targets), figsize=(6 * len(targets), 8), squeeze=False, sharex=True, sharey="col"
    )
    colours = dict(zip(strategies, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for col, target in enumerate(targets):
        for row, s1 in enumerate((True, False)):
            ax = axes[row][col]
            mine = [r for r in rows if r["target"] == target and r["stage1"] == s1]
            full = [r for r in mine if r["budget"] >= 100]
            for strategy in strategies:
                pts = sorted([r for r in mine if r["strategy"] == strategy] + full, key=lambda r: r["budget"])
                if not pts:
                    continue
                ax.errorbar(
                    [np.mean(r["queried_seconds"]) for r in pts],
                    [np.mean(r["r2"]) for r in pts],
                    yerr=[_std(r["r2"]) for r in pts],
                    marker="o",
                    ms=4,
                    capsize=2,
                    color=colours[strategy],
                    label=strategy,
                )
            ax.set_xscale("log")
            ax.set_title(f"{target}, {'from stage 1' if s1 else 'from scratch'}", fontsize=10)
            ax.set(xlabel="queried audio (s)", ylabel="held-out r2 (mean over returned layers)")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    fig.suptitle("Held-out fidelity against queried seconds (mean ± std over seeds)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
        if not mine:
            continue
        at10 = [r for r in mine if r["budget"] == 10]
        s1 = [x for r in at10 if r["stage1"] for x in r["r2"]]
        sc = [x for r in at10 if not r["stage1"] for x in r["r2"]]
        if s1 and sc:
            out.append(
                f"{target} 10%: r2 with stage 1 {np.mean(s1):.3f} vs scratch {np.mean(sc):.3f} "
                f"(all strategies and seeds)"
            )
        for s1_flag in (True, False):
            at5 = {r["strategy"]: r for r in mine if r["budget"] == 5 and r["stage1"] == s1_flag}
            if "random" not in at5:
                continue
            rnd = at5["random"]
            beat = [
                f"{s} {np.mean(r['r2']):.3f}"
                for s, r in at5.items()
                if s != "random"
                and np.mean(r["r2"]) - np.mean(rnd["r2"]) > max(_std(r["r2"]), _std(rnd["r2"]))
            ]
            out.append(
                f"{target} 5% ({'stage 1' if s1_flag else 'scratch'}): random {_ms(rnd['r2'])}; "
                f"informed strategies ahead by more than a seed std: {', '.join(beat) or 'none'}"
            )
        if at10 and any(s is not None for s in at10[0]["words_share"]):
            best = max(at10, key=lambda r: np.mean(_pct(r["words_share"])))
            out.append(
                f"{target} 10%: best words share {_ms(_pct(best['words_share']), '{:.0f}%')} "
                f"({best['strategy']}, {'stage 1' if best['stage1'] else 'scratch'}); its speakers share "
                f"{_ms(_pct(best['speakers_share']), '{:.0f}%')}"
            )
    return out


# -- main ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="the shared data folder")
    ap.add_argument("--out", default="/tmp/speechmimic-bench-selection", help="work folder (resumable)")
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS, help="targets to attack")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default: 0 1 2)")
    ap.add_argument(
        "--budgets", nargs="+", type=float, default=[5, 10, 25, 100], help="percent of the pool's seconds"
    )
    ap.add_argument(
        "--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES), help="strategies"
    )
    ap.add_argument(
        "--steps", type=int, default=200, help="stage-2 steps per run, every budget (default: 200)"
    )
    ap.add_argument("--batch-seconds", type=float, default=12.0, help="stage-2 batch cap (default: 12)")
    ap.add_argument("--lr", type=float, default=1e-3, help="stage-2 peak learning rate (default: 1e-3)")
    ap.add_argument(
        "--stage1-steps", type=int, default=800, help="stage-1 steps per iteration (default: 800)"
    )
    ap.add_argument("--stage1-iterations", type=int, default=2, choices=(1, 2), help="stage-1 iterations")
    ap.add_argument("--synthetic", type=int, default=0, help="espeak-ng utterances added to the corpus")
    ap.add_argument("--workers", type=int, default=2, help="extractions run side by side, 1 thread each")
    args = ap.parse_args(argv)

    data, work = Path(args.data), Path(args.out)
    if not data.is_dir():
        print(
            f"{data} is absent: this benchmark needs the shared real-speech subsets (shared/data/README.md)"
        )
        return 1
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    pool, heldout = thief_corpus(data, work, args.synthetic, seed=0)
    pool_s = sum(c.duration for c in pool)
    print(
        f"thief corpus: pool {len(pool)} clips {pool_s:.0f} s; held out {len(heldout)} clips "
        f"{sum(c.duration for c in heldout):.0f} s"
    )
    sets = probe_sets(data, seed=0)
    train_clips = [c for c in _scan(data / "fsdd" / "recordings", layout="fsdd") if c.labels["index"] >= 5]
    digits_train = ProbeSet("digits_train", train_clips, [str(c.labels["digit"]) for c in train_clips], None)

    # Stage 1, once per seed (two threads: nothing else runs yet).
    stage1_reports = {}
    for seed in args.seeds:
        cfg = PretrainConfig(
            steps=args.stage1_steps,
            batch_seconds=24.0,
            warmup=max(1, args.stage1_steps // 10),
            iterations=args.stage1_iterations,
            seed=seed,
        )
        stage1_reports[seed] = stage1(pool, heldout, (digits_train, sets["digits"]), work, cfg)
        stage1_reports[seed]["probes"] = probe_scores(
            stage1_reports[seed]["dir"], sets, work / "probes" / f"stage1-seed{seed}.json"
        )

    # What no learning gives: MFCC, and a student with random weights (wide random features already
    # beat 39-d MFCC under a linear probe, so a share over MFCC is read against this row too).
    random_student = work / "random_student"
    if not (random_student / "config.json").exists():
        torch.manual_seed(0)
        build_student("small").save(random_student)
    official = {
        "mfcc": digit_probe_official(load_upstream("mfcc"), digits_train, sets["digits"]),
        "random student": digit_probe_official(
            load_upstream(str(random_student)), digits_train, sets["digits"]
        ),
    }
    reference = {
        "mfcc": probe_scores("mfcc", sets, work / "probes" / "mfcc.json"),
        "random student": probe_scores(str(random_student), sets, work / "probes" / "random_student.json"),
    }
    specs = {name: target_spec(name, work) for name in args.targets}
    for name, spec in specs.items():
        pay_everything(spec, pool, heldout, work, name)
        reference[name] = probe_scores(spec, sets, work / "probes" / f"{name}.json")
    print(reference_table(reference, list(reference)))

    probed = {
        name: tuple(p for p in PROBES if _best(reference[name][p]) > _best(reference["mfcc"][p]))
        for name in specs
    }
    jobs = []
    for name, spec in specs.items():
        for budget in sorted(args.budgets):
            for seed in args.seeds:
                for s1 in (True, False):
                    for strategy in args.strategies if budget < 100 else ["random"]:
                        jobs.append(
                            Job(
                                name,
                                spec,
                                seed,
                                budget,
                                strategy,
                                s1,
                                args.steps,
                                args.batch_seconds,
                                max(1, args.steps // 10),
                                args.lr,
                                probed[name],
                            )
                        )
    print(f"{len(jobs)} extractions ({args.workers} at a time)")
    results = []
    with ProcessPoolExecutor(args.workers, initializer=_worker_init) as ex:
        futures = {ex.submit(run_job, job, work, sets): job for job in jobs}
        bar = tqdm(total=len(jobs), desc="extractions", unit="run")
        for fut in as_completed(futures):
            r = fut.result()
            results.append(r)
            bar.update(1)
            bar.set_postfix_str(f"{futures[fut].name} r2 {r['r2']:.3f}", refresh=False)
        bar.close()

    summary = summarise(results, reference)
    rows = summary["rows"]
    png = plot(rows, list(specs), args.strategies, work / "selection.png")
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
        reference_table(
            {**reference, **{f"stage 1 (seed {k})": v["probes"] for k, v in stage1_reports.items()}},
            ["mfcc", "random student", *[f"stage 1 (seed {k})" for k in stage1_reports], *specs],
        ),
        "",
    ]
    for name in specs:
        lines += [f"## {name}", "", grid_table(rows, name), ""]
    lines += [
        "## Verdicts",
        "",
        *[f"- {v}" for v in verdicts(rows, {})],
        "",
        f"![r2 vs queried seconds]({png.name})",
    ]
    text = "\n".join(lines) + "\n"
    (work / "selection.md").write_text(text)
    (work / "selection.json").write_text(
        json.dumps(
            {
                "stage1": stage1_reports,
                "digits_official": official,
                "reference": reference,
                **summary,
                "runs": results,
                "seconds": round(time.time() - t_start, 1),
            },
            indent=2,
        )
    )
    print(text)
    print(f"wrote {work / 'selection.md'}, {work / 'selection.json'} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
