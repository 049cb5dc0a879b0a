"""``speechmimic audit``: what a query budget leaks, what each defence costs honest users, and who
gets caught, for one target (see :mod:`speechmimic.audit.grid` and :mod:`speechmimic.audit.report`)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from speechmimic.audit.grid import ATTACKERS, CALIBRATION, Audit, AuditConfig
from speechmimic.audit.report import summarise, write
from speechmimic.audit.suites import Suite, load_suite
from speechmimic.defences import load_target

DEFAULT_TARGET = "resemblyzer?layers=all"
DEFAULT_BUDGETS = ("10%", "40%")
DEFAULT_ATTACKERS = ("naive", "sybils")


def default_defences(suite: Suite) -> dict[str, str]:
    """The CPU-sized grid's defences: none, noise, a per-key rotation, B4B, PRADA refusing flagged keys,
    and a quota as large as the largest honest application's traffic."""
    largest_app = max(sum(c.duration for c in ps.clips) for ps in suite.benign.values())
    defences = {
        "none": "",
        "noise": "noise?snr=10",
        "transform": "transform?kind=rotate&seed=1",
        "b4b": f"b4b?planes=8&sets=20&lambda=0.001&alpha=1&beta=0.4&calibration={CALIBRATION}",
        "prada": "prada?threshold=0.85&min_queries=20&action=refuse",
        "quota": f"quota?seconds={math.ceil(largest_app)}",
    }
    return defences


def run_audit(
    out: str | Path,
    target: str = DEFAULT_TARGET,
    corpus: str = "demo",
    budgets: tuple[str, ...] = DEFAULT_BUDGETS,
    defences: dict[str, str] | None = None,
    attackers: tuple[str, ...] = DEFAULT_ATTACKERS,
    steps: int = 100,
    seed: int = 0,
    preset: str = "small",
    streams: int = 8,
    progress: bool = True,
    http: bool = False,
    secret: str | None = None,
    proof: bool = False,
) -> dict:
    """Run (or resume) the audit under ``out`` and write ``report.md``, ``report.json`` and plots."""
    t0 = time.time()
    suite = load_suite(corpus, seed)
    encoder = load_target(target)
    defences = defences or default_defences(suite)
    if "none" not in defences:
        defences = {"none": "", **defences}  # every defence is read against no defence
    cfg = AuditConfig(
        list(budgets), defences, list(attackers), steps, seed, preset, streams, secret=secret, proof=proof
    )
    audit = Audit(encoder, suite, out, cfg, progress, http)
    result = audit.run()
    summary = summarise(result, cfg)
    summary["setup"] = {
        "target": target, "corpus": corpus, "pool_clips": len(suite.pool),
        "pool_seconds": round(sum(c.duration for c in suite.pool), 1), "budgets": list(budgets),
        "defences": defences, "attackers": {a: vars(ATTACKERS[a]) for a in attackers},
        "steps": steps, "seed": seed, "preset": preset, "benign_streams_per_app": streams, "http": http,
        "secret": secret,
        "seconds": round(time.time() - t0, 1),  # this run (cells read back cost nothing)
        "thief_seconds": round(sum(c["seconds"] for c in result["cells"]), 1),  # all thieves, when run
    }  # fmt: skip
    paths = write(summary, out, f"Extraction-risk audit of {target} on {corpus}")
    (Path(out) / "report.json").write_text(json.dumps(summary, indent=2))
    summary["paths"] = {k: str(v) for k, v in paths.items()}
    return summary


__all__ = ["ATTACKERS", "Audit", "AuditConfig", "default_defences", "run_audit"]
