"""The demo's promise, checked in full: a real extraction of resemblyzer in minutes on a CPU."""

from __future__ import annotations

import json
import time

import pytest
import torch

from speechmimic import load_upstream
from speechmimic.demo import run_demo


@pytest.mark.slow
def test_demo_meets_its_promise(tmp_path):
    t0 = time.time()
    report = run_demo(tmp_path / "d", progress=False)
    elapsed = time.time() - t0
    assert elapsed <= 600, f"demo took {elapsed:.0f} s"
    saved = json.loads((tmp_path / "d" / "report.json").read_text())
    assert saved["target"].startswith("resemblyzer")
    assert {"params", "path"} <= set(saved["student"]) and saved["timings"]
    (small, full) = sorted(saved["runs"], key=lambda r: r["queried_seconds"])
    for run in saved["runs"]:
        assert {"budget_seconds", "queries", "queried_seconds", "fidelity"} <= set(run)
        for f in run["fidelity"].values():
            assert {"cosine", "l1", "r2", "constant_cosine"} <= set(f)

    def mean_r2(run):
        return sum(f["r2"] for f in run["fidelity"].values()) / len(run["fidelity"])

    assert mean_r2(full) >= 0.25, full["fidelity"]
    assert mean_r2(full) > mean_r2(small)
    assert (tmp_path / "d" / "report.md").exists() and (tmp_path / "d" / saved["plot"]).exists()
    upstream = load_upstream(saved["student"]["path"])
    states = upstream([torch.zeros(16000).uniform_(-0.1, 0.1)])["hidden_states"]
    assert [s.shape[-1] for s in states[-3:]] == [256, 256, 256]
    assert report["runs"][0]["fidelity"] == saved["runs"][0]["fidelity"]
    # Probes on held-out clips only: target, student and MFCC side by side, in json and markdown.
    assert set(saved["probes"]) == {"keywords", "speakers", "verification"}
    for row in saved["probes"].values():
        assert {"target", "student", "baseline", "ratio", "recovered"} <= set(row)
    for name in ("keywords", "speakers"):
        assert saved["probes"][name]["target"] > 0.5  # a real pretrained target on 10 words / 24 voices
    asv = saved["probes"]["verification"]
    assert asv["metric"] == "eer" and asv["target"] < asv["baseline"]  # an EER: lower is better
    assert "## Downstream probes" in (tmp_path / "d" / "report.md").read_text()
