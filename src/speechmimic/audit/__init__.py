"""``speechmimic audit``: what a query budget leaks, what each defence costs honest users, and who
gets caught, for one target (see :mod:`speechmimic.audit.grid` and :mod:`speechmimic.audit.report`)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

from speechmimic import config
from speechmimic.audit.grid import ATTACKERS, CALIBRATION, Audit, AuditConfig
from speechmimic.audit.report import summarise, write
from speechmimic.audit.suites import Suite, load_suite
from speechmimic.defences import load_target


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


def run_audit(out: str | Path, cfg: AuditConfig, progress: bool = True) -> dict:
    """Run (or resume) the audit under ``out`` and write ``report.md``, ``report.json`` and plots.
    ``cfg.defences`` empty: :func:`default_defences`; ``none`` is always added."""
    t0 = time.time()
    suite = load_suite(cfg.corpus, cfg.seed)
    encoder = load_target(cfg.target)
    defences = cfg.defences or default_defences(suite)
    cfg = replace(cfg, defences={"none": "", **defences})  # every defence is read against no defence
    result = Audit(encoder, suite, out, cfg, progress).run()
    summary = summarise(result, cfg)
    summary["config"] = config.to_dict(cfg)
    summary["setup"] = {
        "pool_clips": len(suite.pool),
        "pool_seconds": round(sum(c.duration for c in suite.pool), 1),
        "attackers": {a: vars(ATTACKERS[a]) for a in cfg.attackers},
        "seconds": round(time.time() - t0, 1),  # this run (cells read back cost nothing)
        "thief_seconds": round(sum(c["seconds"] for c in result["cells"]), 1),  # all thieves, when run
    }
    paths = write(summary, out, f"Extraction-risk audit of {cfg.target} on {cfg.corpus}")
    (Path(out) / "report.json").write_text(json.dumps(summary, indent=2))
    summary["paths"] = {k: str(v) for k, v in paths.items()}
    return summary


__all__ = ["ATTACKERS", "Audit", "AuditConfig", "default_defences", "run_audit"]
