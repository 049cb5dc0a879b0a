"""Which ideas carry a speaker encoder's speaker information into its stolen copy? Each idea alone
against one baseline, and the ideas together, over seeds: an ablation at one query budget.

The thief, the pool, the held-out clips and the probes are the selection benchmark's
(``benchmarks/selection.py``: FSDD train takes + the LibriSpeech subset of ``../shared/data`` in
<= 4 s segments; probes on audio the attack never saw: 30 Speech Commands words, FSDD digits,
speaker ID on half-second crops of the 10 LibriSpeech speakers, speaker verification (1 - EER) on
3-s crops of them). The target is resemblyzer with its three layers (``--target whisper-base``: Whisper
base's encoder, its seven states; ``whisper-tiny``: tiny.en's five). Every variant queries the same
clips (random, ``--budget`` of the pool, drawn by the seed) from one shared ledger, so variants
differ only in how the answers are used:

    baseline          stage 2 from scratch, the `small` student, --steps steps
    stage 1           stage 2 from the seed's stage-1 student (masked prediction of units on the pool)
    utterance stats   + a loss on each clip's mean and std over frames (--stats-weight 1)
    augmented views   each paid answer reused for a noisy, gain-changed view of its clip (--augment 0.5)
    wide              the same parameters as 2 layers of 304 (`small-wide`)
    deep              ... as 6 layers of 192 (`small-deep`)
    2x steps          twice the steps on the same answers
    semi-supervised   + masked prediction of MFCC units on the clips not queried (--masked-weight 1;
                      "semi-supervised 0.1" at a tenth of that weight)
    mixing stage 1    stage 1 with WavLM's utterance mixing (--mix-prob 0.2, WavLM's share)
    data2vec stage 1  stage 1 regressing an EMA teacher's top layers, one iteration of the same
                      total steps as HuBERT's two
    all               utterance stats + augmented views + wide + 2x steps (stage 1 stays its own row)
    wide + 2x steps   the two that cost nothing alone
    everything        all + semi-supervised 0.1 + mixing stage 1 (stage 2 from it); data2vec is
                      the other stage-1 objective, so it stays its own row

Each run is scored by held-out fidelity (mean r2 over the three layers) and by the probes, as the
**recovered share** of the target's advantage over MFCC, mean ± std over seeds. Every run is cached
under ``--out`` (a rerun resumes); the table goes to ``ablation.md`` and every number to
``ablation.json``.

    python benchmarks/speaker_ablation.py       # 14 variants x 3 seeds at extract's 1000 steps
    python benchmarks/speaker_ablation.py --steps 200 --variants baseline wide deep "2x steps"

On 2 CPU cores, 21 runs (7 variants x 3 seeds, no stage 1) of 200 steps took 10 minutes; 1000 steps
take about five times that, and each stage-1 recipe (2 x 800 steps, or data2vec's 1 x 1600) runs
once per seed before them (about 4 minutes each); semi-supervised steps cost about twice the others.
The whole default table, from nothing, takes 3 to 4 hours.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from selection import (
    PROBES,
    WHISPER,
    _pct,
    add_shares,
    one_target_reference,
    probe_student,
    reference_table,
    thief_corpus,
)
from tqdm.auto import tqdm

from speechmimic.distill import DistillConfig
from speechmimic.experiment import Experiment, Grid
from speechmimic.pretrain import PretrainConfig
from speechmimic.report import mean_std

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("resemblyzer", *WHISPER)


@dataclass(frozen=True)
class Variant:
    preset: str = "small"
    stage1: bool = False
    steps_factor: int = 1
    distill: dict = field(default_factory=dict)  # DistillConfig fields over the baseline's
    pretrain: dict = field(default_factory=dict)  # PretrainConfig fields over stage 1's


VARIANTS = {
    "baseline": Variant(),
    "stage 1": Variant(stage1=True),
    "utterance stats": Variant(distill={"stats_weight": 1.0}),
    "augmented views": Variant(distill={"augment": 0.5}),
    "wide": Variant(preset="small-wide"),
    "deep": Variant(preset="small-deep"),
    "2x steps": Variant(steps_factor=2),
    "semi-supervised": Variant(distill={"masked_weight": 1.0}),
    "mixing stage 1": Variant(stage1=True, pretrain={"mix_prob": 0.2}),
    "data2vec stage 1": Variant(stage1=True, pretrain={"objective": "data2vec", "iterations": 1}),
    "semi-supervised 0.1": Variant(distill={"masked_weight": 0.1}),
    "all": Variant(preset="small-wide", steps_factor=2, distill={"stats_weight": 1.0, "augment": 0.5}),
    "wide + 2x steps": Variant(preset="small-wide", steps_factor=2),
    "everything": Variant(
        preset="small-wide",
        stage1=True,
        steps_factor=2,
        distill={"stats_weight": 1.0, "augment": 0.5, "masked_weight": 0.1},
        pretrain={"mix_prob": 0.2},
    ),
}


class SharedExperiment(Experiment):
    """An experiment whose ledgers (and stage 1, per preset and stage-1 recipe) are shared with the
    other variants': every variant trains on the very answers the baseline paid for."""

    def __init__(self, shared: Path, recipe: str, *args, **kw):
        super().__init__(*args, **kw)
        self.shared, self.recipe = shared, recipe

    def ledger_dir(self, target: str, part: str) -> Path:
        return self.shared / "ledgers" / target / part

    def stage1_dir(self, seed: int) -> Path:
        return self.shared / "stage1" / self.grid.preset / self.recipe / f"seed{seed}"


def run_cells(exps: dict[str, Experiment], pool, workers: int) -> dict[str, list[dict]]:
    """Every variant's records; the cells of all variants share the ``workers`` processes."""
    for exp in exps.values():
        exp.prepare()  # stage 1 and the answers, paid here once: the workers only read them
    jobs = [(name, cell) for name, exp in exps.items() for cell in exp.grid.cells(pool)]
    records = defaultdict(list)
    bar = tqdm(total=len(jobs), desc="extractions", unit="run")
    if workers <= 1:
        for name, cell in jobs:
            records[name].append(exps[name].run(cell))
            bar.update(1)
    else:
        with ProcessPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as ex:
            futures = {ex.submit(exps[name].run, cell): name for name, cell in jobs}
            for fut in as_completed(futures):
                records[futures[fut]].append(fut.result())
                bar.update(1)
    bar.close()
    return records


def slug(name: str) -> str:
    return "-".join(name.replace("+", " ").split())


def table(rows: dict[str, dict]) -> str:
    head = ["variant", "seeds", "held-out r2", *[f"{p} share" for p in PROBES]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in rows.items():
        cells = [name, str(len(row["seeds"])), mean_std(row["r2"])]
        cells += [mean_std(_pct(row[f"{p}_share"]), "{:.0f}%") for p in PROBES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="the shared data folder")
    ap.add_argument("--out", default="/tmp/speechmimic-bench-ablation", help="work folder (resumable)")
    ap.add_argument(
        "--target", default="resemblyzer", choices=TARGETS, help="the attacked encoder (default: resemblyzer)"
    )
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default: 0 1 2)")
    ap.add_argument("--budget", default="10%", help="what each run queries (default: 10%%)")
    for flag, typ, default, text in (
        ("--steps", int, 1000, "stage-2 steps of the baseline"),
        ("--batch-seconds", float, 12.0, "stage-2 batch cap"),
        ("--lr", float, 1e-3, "stage-2 peak learning rate"),
        ("--stage1-steps", int, 800, "stage-1 steps per iteration"),
        ("--stage1-iterations", int, 2, "stage-1 iterations (1 or 2)"),
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
    pool, heldout = thief_corpus(data, work, 0, seed=0)
    target = args.target
    spec, sets, reference, probed = one_target_reference(target, data, work)
    specs = {target: spec}
    print(reference_table(reference, list(reference)))
    measure = partial(probe_student, sets=sets, probed=probed)

    exps = {}
    for name in args.variants:
        v = VARIANTS[name]
        n = args.steps * v.steps_factor
        base = DistillConfig(
            n,
            args.lr,
            warmup=max(1, n // 10),
            batch_seconds=args.batch_seconds,
            checkpoint_every=max(50, n // 4),
        )
        # A recipe of fewer iterations gets their steps: every stage 1 costs the same.
        iterations = v.pretrain.get("iterations", args.stage1_iterations)
        n1 = args.stage1_steps * args.stage1_iterations // iterations
        stage1 = PretrainConfig(
            n1,
            warmup=max(1, n1 // 10),
            batch_seconds=24.0,
            **{"iterations": args.stage1_iterations, **v.pretrain},
        )
        grid = Grid(
            specs,
            [args.budget],
            ["random"],
            [v.stage1],
            args.seeds,
            preset=v.preset,
            distill=replace(base, **v.distill),
            pretrain=stage1 if v.stage1 else None,
        )
        root = work / "variants" / slug(name)
        recipe = "-".join(f"{k}={x}" for k, x in sorted(v.pretrain.items())) or "hubert"
        exps[name] = SharedExperiment(
            work, recipe, root, grid, pool, heldout, measure, probed, progress=False
        )
    records = run_cells(exps, pool, args.workers)
    rows = {}
    for name, exp in exps.items():
        (row,) = exp.summarise(records[name])
        add_shares([row], reference)
        rows[name] = row

    pool_s = sum(c.duration for c in pool)
    setup = (
        f"Target {spec}; pool {len(pool)} clips, {pool_s:.0f} s; {args.budget} queried "
        f"(random, the same clips for every variant of a seed); seeds {args.seeds}; baseline {args.steps} "
        f"stage-2 steps x {args.batch_seconds:g} s batches. Shares: of the target's advantage over MFCC "
        "on each probe (verification: on 1 - EER)."
    )
    text = "\n".join(
        [
            "# Speaker ablation",
            "",
            setup,
            "",
            reference_table(reference, list(reference)),
            "",
            table(rows),
            "",
        ]
    )
    name = "ablation" if target == "resemblyzer" else f"ablation-{target}"
    (work / f"{name}.md").write_text(text)
    summary = {"reference": reference, "rows": rows, "seconds": round(time.time() - t_start, 1)}
    (work / f"{name}.json").write_text(json.dumps(summary, indent=2))
    print(text)
    print(f"wrote {work / f'{name}.md'} and {work / f'{name}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
