"""The chain end to end (stage 1 -> select -> query -> distill -> fidelity) on real transformers code
paths and on the real pretrained resemblyzer; the run's budget guarded by its ledger."""

from __future__ import annotations

import json

import pytest
import torch

from speechmimic import config
from speechmimic.cli import main
from speechmimic.corpus import read_manifest, write_manifest
from speechmimic.distill import DistillConfig
from speechmimic.extract import ExtractConfig, extract
from speechmimic.fidelity import heldout_fidelity, mean_r2
from speechmimic.ledger import BudgetExhausted, Ledger
from speechmimic.select import STRATEGIES, Strategy
from speechmimic.student import Student, build_student
from speechmimic.targets import load_backend
from speechmimic.testing import CountingTarget


@pytest.mark.parametrize("kind", ["hubert", "wavlm"])
def test_extract_tiny_hf_target_gets_closer(kind, tmp_path, speech_clips, tiny_hf):
    pool, heldout = speech_clips
    target = load_backend(f"hf:{tiny_hf[kind]}?layers=1,2")
    cfg = ExtractConfig(
        budget="100%", preset="tiny", distill=DistillConfig(steps=60, lr=2e-3, warmup=10, batch_seconds=20)
    )
    result = extract(target, pool, tmp_path / "run", cfg, heldout=heldout, progress=False)
    # The thief inferred width and frame rate from the answers alone.
    student, saved = Student.load(result["student"]["path"])
    heads = {h.name: h for h in student.cfg.targets}
    assert set(heads) == {"hidden_1", "hidden_2"}
    assert all(h.dim == 32 and h.rate == pytest.approx(50.0, abs=1.0) for h in heads.values())
    assert saved["target"] == target.spec
    # ... and really got closer than the same student untrained.
    untrained = build_student("tiny", list(heads.values()))
    untrained.load_state_dict(
        {k: v for k, v in student.state_dict().items() if k.endswith(("mean", "std"))}, strict=False
    )
    before = heldout_fidelity(untrained, target, heldout, Ledger(tmp_path / "run" / "eval_ledger"), False)
    after = result["fidelity"]
    assert mean_r2(after) > mean_r2(before) + 0.1, (before, after)
    assert all(after[k]["cosine"] > before[k]["cosine"] for k in after)


def test_resemblyzer_heads_adapt_to_100hz(tmp_path, speech_clips):
    pool, heldout = speech_clips
    target = load_backend("resemblyzer?layers=all")
    cfg = ExtractConfig(
        budget="100%", preset="tiny", distill=DistillConfig(steps=80, lr=2e-3, warmup=10, batch_seconds=20)
    )
    result = extract(target, pool, tmp_path / "run", cfg, heldout=heldout, progress=False)
    student, _ = Student.load(result["student"]["path"])
    assert [(h.name, h.dim, h.rate) for h in student.cfg.targets] == [
        ("lstm1", 256, 100.0),
        ("lstm2", 256, 100.0),
        ("lstm3", 256, 100.0),
    ]
    assert all(h.ratio == 2 for h in student.heads.values())  # student runs at 50 Hz
    for name, f in result["fidelity"].items():
        assert f["r2"] > 0.05, (name, f)
        assert f["frames"] > 0
    # result.json says exactly what produced it.
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert config.from_dict(ExtractConfig, saved["config"]) == cfg
    assert saved["pool"]["clips"] == len(pool) and saved["heldout"]["clips"] == len(heldout)


def test_a_selection_that_overshoots_the_budget_is_refused_by_the_ledger(tmp_path, speech_clips, monkeypatch):
    pool, _ = speech_clips
    # A strategy that ignores the budget: it returns every clip.
    rogue = Strategy("rogue", lambda clips, scores, budget, rng: list(range(len(clips))), "every clip")
    monkeypatch.setitem(STRATEGIES, "rogue", rogue)
    target = CountingTarget(load_backend("resemblyzer?layers=2"))
    cfg = ExtractConfig(budget="5", strategy="rogue", preset="tiny", distill=DistillConfig(steps=1))
    with pytest.raises(BudgetExhausted, match=r"refused \d+ of the \d+ selected clips"):
        extract(target, pool, tmp_path / "run", cfg, progress=False)
    ledger = Ledger(tmp_path / "run" / "ledger")
    assert len(read_manifest(tmp_path / "run" / "selected.jsonl")) == len(pool)
    assert ledger.spent_clips == 5 and target.clips == 5  # paid up to the budget, not one clip more
    assert not (tmp_path / "run" / "student").exists()


def test_extract_command_pretrains_stage1_for_an_informed_strategy(tmp_path, speech_clips, capsys):
    pool, _ = speech_clips
    manifest = tmp_path / "pool.jsonl"
    write_manifest(pool, manifest)
    common = ["--target", "resemblyzer?layers=2", "--manifest", str(manifest), "--budget", "6"]
    common += ["--preset", "tiny", "--steps", "0", "--no-progress"]
    out = tmp_path / "x"
    cmd = ["extract", *common, "--strategy", "hybrid", "--stage1-steps", "3", "--start", "stage1"]
    cmd += ["--out", str(out)]
    assert main(cmd) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["stage1"] == str(out / "stage1" / "iter1")
    assert result["config"]["stage1"]["steps"] == 3 and result["config"]["distill"]["steps"] == 0
    # Asked to, stage 2 starts from the stage-1 trunk (no stage-2 step was taken here) ...
    stage1, _ = Student.load(out / "stage1" / "iter1")
    student, _ = Student.load(out / "student")
    own = student.state_dict()
    for k, v in stage1.state_dict().items():
        assert torch.equal(own[k], v), k
    # ... and the informed strategy ranked by the stage-1 student's scores of the pool.
    chosen = read_manifest(out / "selected.jsonl")
    assert len(chosen) == 6 and all(c.labels["selection"]["score"] > 0 for c in chosen)
    # The result's config is a config file that reproduces the run.
    capsys.readouterr()
    assert (
        main(
            [
                "extract",
                *common[:4],
                "--out",
                str(out),
                "--config",
                str(out / "result.json"),
                "--print-config",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out) == result["config"]
    # A rerun finds stage 1 and the scores done.
    weights = out / "stage1" / "iter1" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert main(cmd) == 0
    assert weights.stat().st_mtime_ns == before

    scratch = tmp_path / "scratch"
    assert main(["extract", *common, "--from-scratch", "--out", str(scratch)]) == 0
    assert json.loads((scratch / "result.json").read_text())["stage1"] is None
    assert not (scratch / "stage1").exists()
    capsys.readouterr()
    bare = ["extract", *common, "--from-scratch", "--strategy", "diversity", "--out", str(tmp_path / "b")]
    assert main(bare) == 2
    assert "needs per-clip embeddings" in capsys.readouterr().err


def test_stage1_can_score_the_pool_while_stage2_starts_from_scratch(tmp_path, speech_clips):
    pool, _ = speech_clips
    manifest = tmp_path / "pool.jsonl"
    write_manifest(pool, manifest)
    common = ["extract", "--target", "resemblyzer?layers=2", "--manifest", str(manifest), "--budget", "6"]
    common += ["--preset", "tiny", "--steps", "0", "--stage1-steps", "3", "--no-progress"]  # start: default
    informed = tmp_path / "informed"
    assert main([*common, "--strategy", "hybrid", "--out", str(informed)]) == 0
    result = json.loads((informed / "result.json").read_text())
    assert result["stage1"] == str(informed / "stage1" / "iter1") and result["config"]["start"] == "scratch"
    chosen = read_manifest(informed / "selected.jsonl")
    assert len(chosen) == 6 and all(c.labels["selection"]["score"] > 0 for c in chosen)  # stage 1 ranked them
    # A strategy that reads no scores does not need stage 1 at all: none is trained.
    plain = tmp_path / "plain"
    assert main([*common, "--strategy", "random", "--out", str(plain)]) == 0
    assert json.loads((plain / "result.json").read_text())["stage1"] is None
    assert not (plain / "stage1").exists()
    # Both students start from the same random trunk (no stage-2 step was taken), not stage 1's.
    stage1 = Student.load(informed / "stage1" / "iter1")[0].state_dict()
    informed_trunk = Student.load(informed / "student")[0].state_dict()
    plain_trunk = Student.load(plain / "student")[0].state_dict()
    matrices = [k for k, v in stage1.items() if v.dim() > 1]
    assert matrices and all(torch.equal(informed_trunk[k], plain_trunk[k]) for k in stage1)
    assert not any(torch.equal(informed_trunk[k], stage1[k]) for k in matrices)


def test_extract_config_file_and_print_config(tmp_path, speech_clips, capsys):
    pool, _ = speech_clips
    manifest = tmp_path / "pool.jsonl"
    write_manifest(pool[:6], manifest)
    base = [
        "extract",
        "--target",
        "resemblyzer?layers=2",
        "--manifest",
        str(manifest),
        "--out",
        str(tmp_path),
    ]
    assert main([*base, "--budget", "4", "--seed", "3", "--lr", "0.01", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["budget"] == "4" and printed["distill"]["lr"] == 0.01
    assert printed["seed"] == printed["distill"]["seed"] == printed["stage1"]["seed"] == 3  # --seed: all
    (tmp_path / "cfg.json").write_text(json.dumps(printed))
    # Flags given beside the file win; the rest comes from the file.
    assert main([*base, "--config", str(tmp_path / "cfg.json"), "--steps", "7", "--print-config"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["distill"] == {**printed["distill"], "steps": 7} and again["budget"] == "4"
    # A config written before `start` existed trained stage 2 from its stage 1: it still does.
    old = {k: v for k, v in printed.items() if k != "start"}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert main([*base, "--config", str(tmp_path / "old.json"), "--print-config"]) == 0
    assert printed["start"] == "scratch" and json.loads(capsys.readouterr().out)["start"] == "stage1"
    assert main([*base, "--config", str(tmp_path / "old.json"), "--start", "scratch", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["start"] == "scratch"
    (tmp_path / "bad.json").write_text(json.dumps({"budget": "4", "distill": {"stpes": 3}}))
    assert main([*base, "--config", str(tmp_path / "bad.json"), "--print-config"]) == 2
    assert "unknown DistillConfig setting(s) ['stpes']" in capsys.readouterr().err
    assert main([*base, "--print-config"]) == 2
    assert "--budget" in capsys.readouterr().err
