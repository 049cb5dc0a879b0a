"""Target, student and baseline side by side: the numbers, the command and the report merge."""

from __future__ import annotations

import json

import pytest

from speechmimic.cli import main
from speechmimic.evaluate import compare, evaluate
from speechmimic.ledger import Ledger
from speechmimic.recipes.demo import demo_corpus, demo_tasks
from speechmimic.targets import load_backend
from speechmimic.testing import CountingTarget


def test_recovered_share_and_ratio():
    assert compare({"target": 0.9, "student": 0.7, "baseline": 0.5}, "accuracy") == {
        "ratio": pytest.approx(0.7 / 0.9, abs=1e-4),
        "recovered": 0.5,
    }
    # Error rates: the same share on the 1 - error scale (student halfway from baseline to target).
    assert compare({"target": 0.2, "student": 0.5, "baseline": 0.8}, "per")["recovered"] == pytest.approx(0.5)
    # A student below the baseline recovers a negative share; equal target and baseline: undefined.
    assert compare({"target": 0.9, "student": 0.4, "baseline": 0.5}, "accuracy")["recovered"] < 0
    assert compare({"target": 0.5, "student": 0.4, "baseline": 0.5}, "accuracy")["recovered"] is None
    # a target below the baseline has no advantage to recover (Whisper on speakers)
    assert compare({"target": 0.2, "student": 0.4, "baseline": 0.6}, "accuracy")["recovered"] is None


def test_evaluate_command_prints_table_and_merges_report(tmp_path, tiny_student, capsys):
    student, _, _ = tiny_student
    _, heldout = demo_corpus()
    demo_tasks(heldout, tmp_path / "tasks")
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.json").write_text(json.dumps({"target": "resemblyzer?layers=1,2,3", "runs": []}))
    (report / "report.md").write_text("# extraction report\n")
    args = [
        "evaluate",
        "--target",
        "resemblyzer?layers=all",
        "--student",
        str(student),
        "--tasks",
        str(tmp_path / "tasks" / "keywords"),
        str(tmp_path / "tasks" / "verification"),
        "--out",
        str(tmp_path / "eval"),
        "--report",
        str(report),
        "--no-progress",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| keywords | accuracy |" in out and "recovered share" in out
    merged = json.loads((report / "report.json").read_text())
    assert merged["runs"] == [] and set(merged["probes"]) == {"keywords", "verification"}
    row = merged["probes"]["keywords"]
    assert {"target", "student", "baseline", "ratio", "recovered"} <= set(row)
    assert 0 <= row["student"] <= 1 and row["target"] > 0.3  # a real upstream on 10 keywords
    # Verification is an error rate: the target's EER below MFCC's (measured 0.23 vs 0.35), and the
    # share recovered is read on the 1 - EER scale.
    asv = merged["probes"]["verification"]
    assert asv["metric"] == "eer" and asv["target"] < asv["baseline"] - 0.05
    assert asv["recovered"] == pytest.approx(
        (asv["baseline"] - asv["student"]) / (asv["baseline"] - asv["target"]), abs=1e-3
    )
    assert "| verification | eer |" in out
    assert (tmp_path / "eval" / "probes.png").exists() and (tmp_path / "eval" / "layer_weights.png").exists()
    # Merging again replaces the section (same seed: same numbers), never duplicates it.
    assert main(args) == 0
    md = (report / "report.md").read_text()
    assert md.count("## Downstream probes") == 1 and md.startswith("# extraction report")
    assert json.loads((report / "report.json").read_text())["probes"] == merged["probes"]


def test_demo_tasks_never_share_speakers_or_clips(tmp_path):
    pool, heldout = demo_corpus()
    ks, sid, asv = demo_tasks(heldout, tmp_path)
    pool_ids = {c.id for c in pool}
    for task in (ks, asv):
        speakers = {s: {c.labels["speaker"] for c in task.split(s)} for s in ("train", "dev", "test")}
        assert not (speakers["train"] & speakers["test"]) and not (speakers["dev"] & speakers["test"])
    of = {c.id: c.labels["speaker"] for c in asv.split("test")}
    assert all(t == (of[a] == of[b]) for t, a, b in asv.trials("test"))
    for task in (ks, sid, asv):
        ids = [c.id for s in ("train", "dev", "test") for c in task.split(s)]
        assert len(ids) == len(set(ids)) and not (set(ids) & pool_ids)  # never a queried clip
    assert len(ks.classes) == 10 and len(sid.classes) == 24


def test_the_demo_recipe_writes_the_demo_probe_tasks(tmp_path, capsys):
    assert main(["recipe", "demo", "--out", str(tmp_path / "cli"), "--seed", "3", "--no-progress"]) == 0
    assert "wrote 3 task(s)" in capsys.readouterr().out
    expected = demo_tasks(demo_corpus()[1], tmp_path / "direct", seed=3)
    for task in expected:
        for split in ("train", "dev", "test"):
            written = (tmp_path / "cli" / task.name / f"{split}.jsonl").read_text()
            assert written == (task.root / f"{split}.jsonl").read_text()
    assert main(["recipe", "demo", "somewhere", "--out", str(tmp_path / "x")]) == 2
    assert "takes no ROOT" in capsys.readouterr().err


def test_evaluating_twice_asks_the_target_nothing_the_second_time(tmp_path, tiny_student):
    student, _, _ = tiny_student
    _, heldout = demo_corpus()
    keywords = demo_tasks(heldout, tmp_path / "tasks")[0]
    target = CountingTarget(load_backend("resemblyzer?layers=all"))
    ledger = Ledger(tmp_path / "eval_ledger")
    first = evaluate(target, student, [keywords], tmp_path / "first", ledger=ledger, progress=False)
    clips = sum(len(keywords.split(s)) for s in ("train", "dev", "test"))
    assert target.clips == clips and len(ledger) == clips  # every clip asked once, and recorded
    # A fresh output folder (no feature cache): the answers come from the ledger alone.
    again = evaluate(target, student, [keywords], tmp_path / "again", ledger=ledger, progress=False)
    assert target.clips == clips
    assert again["keywords"]["target"] == first["keywords"]["target"]
