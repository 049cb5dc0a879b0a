"""The attack end to end: (stage 1) -> score -> select -> query (through the ledger) -> distill, and
held-out fidelity. This module only chains; each step lives in its own module and runs alone from
the CLI on the artifacts of the one before.

Stage 1 is either a given checkpoint or pretrained here on the pool (cached, so a rerun skips it)
when something needs it: informed strategies read the stage-1 student's scores of the pool, computed
here when not given, and ``start="stage1"`` trains stage 2 from its trunk.
The run's budget goes with its request to the ledger, which refuses to pay for anything the
selection should never have chosen. Held-out fidelity is the evaluator's measurement, not the
thief's: its target answers go to a separate ledger that never counts against the attack's budget.
``result.json`` records the whole :class:`ExtractConfig`, so every result says exactly what
produced it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speechmimic import config, distributed
from speechmimic.budget import Budget
from speechmimic.config import option
from speechmimic.corpus import Clip, clips_fingerprint, write_manifest
from speechmimic.distill import DistillConfig, distill
from speechmimic.errors import InputError
from speechmimic.fidelity import heldout_fidelity
from speechmimic.ledger import BudgetExhausted, Ledger, query_clips
from speechmimic.pretrain import PretrainConfig, pretrain
from speechmimic.score import Scores, cached_scores
from speechmimic.select import STRATEGIES, select
from speechmimic.student import PRESET_HELP, PRESETS
from speechmimic.targets import Target

RESULT_NAME = "result.json"
START = ("stage1", "scratch")


@dataclass
class ExtractConfig:
    """Everything that decides one extraction's result, beside the target and the clips.

    ``seed`` seeds the selection and the scores; stage 1 and stage 2 have their own (the command
    line sets all three from ``--seed``). Stage 1 is ``init`` (a checkpoint), or ``stage1`` (pretrain
    one on the pool first, when needed), or neither. ``start`` says whether stage 2 trains from it or
    from random weights (the default: at 1000 steps stage 1 costs the copy's words and speakers).
    """

    budget: str = option(
        help="what may be queried: N clips, Ns/Nm/Nh of audio (e.g. 600s, 10m), or N% of the pool's seconds",
        metavar="B",
    )
    strategy: str = option("random", "clip selection strategy", choices=tuple(STRATEGIES))
    seed: int = option(0, "seed of the selection and the scores (on the command line: of both stages too)")
    preset: str = option("small", PRESET_HELP, choices=tuple(PRESETS))
    init: str | None = option(
        None,
        "stage-1 checkpoint (from 'speechmimic pretrain'): it scores the pool for informed strategies "
        "and, with --start stage1, the student starts from it (its architecture replaces the preset, its "
        "trunk weights are loaded, heads are new)",
        flag="--stage1",
        metavar="DIR",
    )
    scores: str | None = option(
        None,
        "per-clip uncertainty and embeddings from 'speechmimic score' (.npz) for informed strategies "
        "(default: the stage-1 student scores the pool)",
        metavar="FILE.npz",
    )
    start: str = option(
        "scratch",
        "what stage 2 trains from: 'scratch' (random weights; stage 1 then only scores the pool, and runs "
        "only for a strategy that needs scores) or 'stage1' (the stage-1 student's trunk, which costs the "
        "copy speaker information: benchmarks/README.md, speaker_ablation.py)",
        choices=START,
    )
    stage1: PretrainConfig | None = None
    distill: DistillConfig = option(factory=DistillConfig)

    def __post_init__(self):
        if self.init is not None and self.stage1 is not None:
            raise InputError("give a stage-1 checkpoint (init) or a stage-1 config to pretrain, not both")
        if self.start not in START:
            raise InputError(f"start {self.start!r}: choose from {START}")
        if self.strategy not in STRATEGIES:
            raise InputError(f"unknown strategy {self.strategy!r}; choose from {sorted(STRATEGIES)}")


def stage1_checkpoint(
    pool: list[Clip], out_dir: Path, cfg: ExtractConfig, progress: bool = True
) -> Path | None:
    """The run's stage-1 student: ``cfg.init``, or one pretrained on ``pool`` into ``out_dir/stage1``
    (skipped when already there), or None: none configured, or none needed (stage 2 starts from
    scratch and the strategy reads no scores)."""
    if cfg.init is not None:
        return Path(cfg.init)
    needed = cfg.start == "stage1" or (STRATEGIES[cfg.strategy].needs and cfg.scores is None)
    if cfg.stage1 is None or not needed:
        return None
    pretrain(pool, out_dir / "stage1", cfg.stage1, preset=cfg.preset, progress=progress)
    return out_dir / "stage1" / f"iter{cfg.stage1.iterations}"


def extract(
    target: Target,
    pool: list[Clip],
    out_dir: str | Path,
    cfg: ExtractConfig,
    heldout: list[Clip] | None = None,
    ledger_dir: str | Path | None = None,
    eval_ledger_dir: str | Path | None = None,
    progress: bool = True,
    store: str | None = None,
) -> dict:
    """Run one budgeted extraction; writes ``selected.jsonl``, the ledger, ``student/`` and
    ``result.json`` under ``out_dir`` and returns the result. Ledgers may be shared between runs
    (``ledger_dir``, ``eval_ledger_dir``): a clip already paid is never paid again, while the budget
    caps what this run uses. With ``heldout``, fidelity is measured on those clips. ``store``: how
    new ledgers store answers (see :class:`~speechmimic.ledger.Ledger`; default float16).

    Raises :class:`~speechmimic.ledger.BudgetExhausted` when the ledger refuses clips the
    selection chose (a strategy that overshot the budget).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    budget = Budget.parse(cfg.budget, pool_seconds=sum(c.duration for c in pool))
    timings = {}
    t = time.time()
    init = stage1_checkpoint(pool, out_dir, cfg, progress)
    scores = Scores.load(cfg.scores) if cfg.scores else None
    candidates = pool
    if scores is None and STRATEGIES[cfg.strategy].needs and init is not None:
        with distributed.main_first():  # under torchrun rank 0 scores; the others read its cache
            scores = cached_scores(init, pool, out_dir, cfg.seed, progress)
        scored = set(scores.ids)  # a clip that does not decode has no scores: it cannot be chosen
        candidates = [c for c in pool if c.id in scored]
    timings["stage1"] = time.time() - t
    t = time.time()
    chosen = select(candidates, budget, strategy=cfg.strategy, seed=cfg.seed, scores=scores)
    if not chosen:
        raise InputError(f"budget {budget} admits no clip of the pool")
    write_manifest(chosen, out_dir / "selected.jsonl")
    timings["select"] = time.time() - t

    t = time.time()
    ledger = Ledger(ledger_dir or out_dir / "ledger", store=store)
    # Under torchrun rank 0 pays; the others then find every answer in the ledger and pay nothing.
    with distributed.main_first():
        query_stats = query_clips(target, chosen, ledger, progress=progress, budget=budget)
    if query_stats["over_budget"]:
        raise BudgetExhausted(
            f"the ledger {ledger.root} refused {query_stats['over_budget']} of the {len(chosen)} selected "
            f"clips: they exceed the budget {budget} (strategy {cfg.strategy!r} overshot it)"
        )
    timings["query"] = time.time() - t

    t = time.time()
    paid = {c.id for c in chosen}
    unpaid = [c for c in pool if c.id not in paid] if cfg.distill.masked_weight else None
    student = distill(
        chosen,
        ledger,
        out_dir / "student",
        cfg.distill,
        preset=cfg.preset,
        init=init if cfg.start == "stage1" else None,
        progress=progress,
        unpaid=unpaid,
    )
    timings["distill"] = time.time() - t

    result = {
        "config": config.to_dict(cfg),
        "target": target.spec,
        "pool": {
            "clips": len(pool),
            "seconds": round(sum(c.duration for c in pool), 2),
            "fingerprint": clips_fingerprint(pool),
        },
        "stage1": str(init) if init else None,
        "budget": budget.to_dict(),
        "budget_seconds": budget.seconds,
        "queries": len(chosen),
        "queried_seconds": round(float(np.sum([c.duration for c in chosen])), 2),
        "query": query_stats,
        "student": {"path": str((out_dir / "student").resolve()), "params": student.num_params},
    }
    if heldout:
        t = time.time()
        eval_ledger = Ledger(eval_ledger_dir or out_dir / "eval_ledger", store=store)
        result["heldout"] = {"clips": len(heldout), "fingerprint": clips_fingerprint(heldout)}
        with distributed.main_first():
            result["fidelity"] = heldout_fidelity(student, target, heldout, eval_ledger, progress=progress)
        timings["fidelity"] = time.time() - t
    result["timings"] = {k: round(v, 1) for k, v in timings.items()}
    if distributed.is_main():
        (out_dir / RESULT_NAME).write_text(json.dumps(result, indent=2))
    distributed.barrier()
    return result
