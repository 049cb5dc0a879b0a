"""Stage 2 end to end: select -> query (through the ledger) -> distill, and held-out fidelity.

Each step reads the artifacts of the one before and can run alone from the CLI; ``extract`` chains
them. Held-out fidelity is the evaluator's measurement, not the thief's: its target answers go to a
separate ledger that never counts against the attack's budget.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from speechmimic.corpus import Clip, write_manifest
from speechmimic.distill import DistillConfig, distill
from speechmimic.fidelity import evaluate_fidelity
from speechmimic.ledger import Ledger
from speechmimic.select import Budget, Scores, select
from speechmimic.student import Student
from speechmimic.targets import Target


def query_clips(
    target: Target, clips: list[Clip], ledger: Ledger, batch_size: int = 8, progress: bool = True
) -> dict:
    """Pay for the target's answers to ``clips`` (already paid ones are reused)."""
    loader = ((c.id, lambda c=c: c.load(min_samples=target.min_samples)) for c in clips)
    return ledger.query(target, loader, batch_size=batch_size, progress=progress, total=len(clips))


def heldout_fidelity(
    student: Student, target: Target, heldout: list[Clip], eval_ledger: Ledger, progress: bool = True
) -> dict:
    """Fidelity on clips the attack never queried; ``mean_target`` is the student's stored mean
    of the queried frames (its heads' de-standardisation means)."""
    query_clips(target, heldout, eval_ledger, progress=progress)
    mean_target = {name: head.mean.numpy() for name, head in student.heads.items()}
    pairs = ((c.load(min_samples=target.min_samples), eval_ledger.get_clip(c.id)) for c in heldout)
    return evaluate_fidelity(student, pairs, mean_target, total=len(heldout), progress=progress)


def extract(
    target: Target,
    pool: list[Clip],
    out_dir: str | Path,
    budget: Budget,
    strategy: str = "random",
    seed: int = 0,
    preset: str = "small",
    init: str | Path | None = None,
    scores: Scores | None = None,
    distill_cfg: DistillConfig | None = None,
    ledger_dir: str | Path | None = None,
    heldout: list[Clip] | None = None,
    eval_ledger_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Run one budgeted extraction; writes ``selected.jsonl``, the ledger, ``student/`` and
    ``result.json`` under ``out_dir`` and returns the result. Ledgers may be shared between runs
    (``ledger_dir``, ``eval_ledger_dir``): a clip already paid is never paid again."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    distill_cfg = distill_cfg or DistillConfig(seed=seed)
    timings = {}
    t = time.time()
    chosen = select(pool, budget, strategy=strategy, seed=seed, scores=scores)
    if not chosen:
        raise ValueError(f"budget {budget} admits no clip of the pool")
    write_manifest(chosen, out_dir / "selected.jsonl")
    timings["select"] = time.time() - t

    t = time.time()
    ledger = Ledger(ledger_dir or out_dir / "ledger")
    query_stats = query_clips(target, chosen, ledger, progress=progress)
    timings["query"] = time.time() - t

    t = time.time()
    student = distill(
        chosen, ledger, out_dir / "student", distill_cfg, preset=preset, init=init, progress=progress
    )
    timings["distill"] = time.time() - t

    result = {
        "target": target.spec,
        "strategy": strategy,
        "stage1": init and str(init),
        "seed": seed,
        "budget": {"clips": budget.clips, "seconds": budget.seconds},
        "budget_seconds": budget.seconds,
        "queries": len(chosen),
        "queried_seconds": round(float(np.sum([c.duration for c in chosen])), 2),
        "query": query_stats,
        "student": {"path": str((out_dir / "student").resolve()), "params": student.num_params},
    }
    if heldout:
        t = time.time()
        eval_ledger = Ledger(eval_ledger_dir or out_dir / "eval_ledger")
        result["fidelity"] = heldout_fidelity(student, target, heldout, eval_ledger, progress=progress)
        timings["fidelity"] = time.time() - t
    result["timings"] = {k: round(v, 1) for k, v in timings.items()}
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result
