"""Target, student and a plain-feature baseline probed side by side on the same tasks and splits.

What was stolen is read off the **recovered share** = (student - baseline) / (target - baseline):
plain MFCC already solves some tasks, so only the share of the target's advantage over it says how
much of the target the thief got. ``ratio`` is student / target on a higher-is-better scale
(accuracy, or 1 - error rate for PER/WER).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from speechmimic.ledger import Ledger
from speechmimic.probe import ProbeConfig, probe
from speechmimic.targets import Target
from speechmimic.tasks import Task
from speechmimic.upstream import TargetUpstream

UPSTREAMS = ("target", "student", "baseline")


def _higher_is_better(metric: str, value: float) -> float:
    return value if metric == "accuracy" else 1.0 - value


def compare(scores: dict[str, float], metric: str) -> dict[str, float | None]:
    """ratio and recovered share from the three test scores of one task; no share where the target
    does not beat the baseline (there is no advantage to recover: Whisper on speakers, for one)."""
    t, s, b = (_higher_is_better(metric, scores[k]) for k in UPSTREAMS)
    return {
        "ratio": round(s / t, 4) if t else None,
        "recovered": round((s - b) / (t - b), 4) if t - b > 1e-9 else None,
    }


def evaluate(
    target: str | Target,
    student: str | Path,
    tasks: list[Task],
    out_dir: str | Path,
    baseline: str = "mfcc",
    cfg: ProbeConfig | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    ledger: Ledger | str | os.PathLike | None = None,
) -> dict:
    """Probe the three upstreams on every task; returns ``{task: {target, student, baseline, ratio,
    recovered, metric, layer_weights}}`` and writes ``probes.json`` into ``out_dir``.

    The target (a spec or a :class:`~speechmimic.targets.Target`) answers through the evaluation
    ``ledger`` (default ``out_dir/eval_ledger``): a clip it already answered, for fidelity or an
    earlier evaluation, is never asked again.
    """
    cfg = cfg or ProbeConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir) if cache_dir else out_dir / "feature_cache"
    ledger = ledger if isinstance(ledger, Ledger) else Ledger(ledger or out_dir / "eval_ledger")
    upstreams = {
        "target": TargetUpstream(target, ledger, cfg.device),
        "student": str(student),
        "baseline": baseline,
    }
    results = {}
    for task in tasks:
        runs = {
            role: probe(
                spec,
                task,
                out_dir=out_dir / task.name / role,
                cfg=cfg,
                cache_dir=cache_dir,
                progress=progress,
            )
            for role, spec in upstreams.items()
        }
        metric = runs["target"]["metric"]
        scores = {role: float(r["test"]) for role, r in runs.items()}
        results[task.name] = {
            "metric": metric,
            **scores,
            **compare(scores, metric),
            "chance": runs["target"].get("baselines"),
            "layer_weights": {role: r["layer_weights"] for role, r in runs.items()},
        }
    (out_dir / "probes.json").write_text(json.dumps(results, indent=2))
    return results
