"""The attack end to end: (stage 1) -> select -> query (through the ledger) -> distill, and held-out
fidelity.

Each step reads the artifacts of the one before and can run alone from the CLI; ``extract`` chains
them. Stage 1 is either a given checkpoint or pretrained here on the pool (cached, so a rerun skips
it); informed strategies read the stage-1 student's scores of the pool, computed here when not given.
Held-out fidelity is the evaluator's measurement, not the thief's: its target answers go to a
separate ledger that never counts against the attack's budget.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from speechmimic.corpus import Clip, write_manifest
from speechmimic.distill import DistillConfig, distill
from speechmimic.fidelity import evaluate_fidelity
from speechmimic.ledger import Ledger
from speechmimic.pretrain import PretrainConfig, pretrain, score_clips
from speechmimic.select import NEEDS, Budget, Scores, select
from speechmimic.student import WEIGHTS_NAME, Student
from speechmimic.targets import Target
from speechmimic.units import clips_fingerprint


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


def stage1_checkpoint(
    pool: list[Clip],
    out_dir: Path,
    stage1: str | Path | PretrainConfig | None,
    preset: str = "small",
    progress: bool = True,
) -> Path | None:
    """The stage-1 student a run starts from: the folder given, or one pretrained on ``pool`` into
    ``out_dir/stage1`` (skipped when already there), or None (from scratch)."""
    if stage1 is None:
        return None
    if isinstance(stage1, PretrainConfig):
        pretrain(pool, out_dir / "stage1", stage1, preset=preset, progress=progress)
        return out_dir / "stage1" / f"iter{stage1.iterations}"
    return Path(stage1)


def pool_scores(
    stage1_dir: Path, pool: list[Clip], out_dir: Path, seed: int = 0, progress: bool = True
) -> Scores:
    """The stage-1 student's scores of ``pool``, cached in ``out_dir`` under a name that hashes the
    clips and the student's weights."""
    h = hashlib.sha256(clips_fingerprint(pool).encode() + str(seed).encode())
    h.update((stage1_dir / WEIGHTS_NAME).read_bytes())
    path = out_dir / f"scores-{h.hexdigest()[:16]}.npz"
    if path.exists():
        return Scores.load(path)
    scores = score_clips(stage1_dir, pool, seed=seed, progress=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores.save(path)
    return scores


def extract(
    target: Target,
    pool: list[Clip],
    out_dir: str | Path,
    budget: Budget,
    strategy: str = "random",
    seed: int = 0,
    preset: str = "small",
    stage1: str | Path | PretrainConfig | None = None,
    scores: Scores | None = None,
    distill_cfg: DistillConfig | None = None,
    ledger_dir: str | Path | None = None,
    heldout: list[Clip] | None = None,
    eval_ledger_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Run one budgeted extraction; writes ``selected.jsonl``, the ledger, ``student/`` and
    ``result.json`` under ``out_dir`` and returns the result. Ledgers may be shared between runs
    (``ledger_dir``, ``eval_ledger_dir``): a clip already paid is never paid again.

    ``stage1``: a stage-1 checkpoint folder to start from, a :class:`PretrainConfig` to pretrain one
    on ``pool`` first (``out_dir/stage1``), or None to start from random weights. Strategies that
    need scores take ``scores``, or else the stage-1 student's scores of the pool.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    distill_cfg = distill_cfg or DistillConfig(seed=seed)
    timings = {}
    t = time.time()
    init = stage1_checkpoint(pool, out_dir, stage1, preset, progress)
    if scores is None and NEEDS.get(strategy) and init is not None:
        scores = pool_scores(init, pool, out_dir, seed, progress)
    timings["stage1"] = time.time() - t
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
        "stage1": str(init) if init else None,
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
