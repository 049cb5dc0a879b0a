"""Stage 2 end to end on real transformers code paths and on the real pretrained resemblyzer."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from speechmimic import load_upstream
from speechmimic.distill import DistillConfig, distill, infer_heads
from speechmimic.extract import extract, heldout_fidelity, query_clips
from speechmimic.fidelity import mean_r2
from speechmimic.ledger import Ledger
from speechmimic.select import Budget, select
from speechmimic.student import Student, build_student, predict
from speechmimic.targets import load_target
from speechmimic.trainer import make_batches


def _tiny_hf(kind: str, path):
    import transformers

    torch.manual_seed(0)
    common = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(32,) * 7,
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )
    if kind == "hubert":
        model = transformers.HubertModel(transformers.HubertConfig(**common))
    else:
        model = transformers.WavLMModel(
            transformers.WavLMConfig(**common, num_buckets=16, max_bucket_distance=64)
        )
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["hubert", "wavlm"])
def test_extract_tiny_hf_target_gets_closer(kind, tmp_path, speech_clips):
    pool, heldout = speech_clips
    target = load_target(f"hf:{_tiny_hf(kind, tmp_path / kind)}?layers=1,2")
    cfg = DistillConfig(steps=60, lr=2e-3, warmup=10, batch_seconds=20, seed=0)
    result = extract(
        target,
        pool,
        tmp_path / "run",
        Budget(),
        preset="tiny",
        distill_cfg=cfg,
        heldout=heldout,
        progress=False,
    )
    # The thief inferred width and frame rate from the answers alone.
    student, config = Student.load(result["student"]["path"])
    heads = {h.name: h for h in student.cfg.targets}
    assert set(heads) == {"hidden_1", "hidden_2"}
    assert all(h.dim == 32 and h.rate == pytest.approx(50.0, abs=1.0) for h in heads.values())
    assert config["target"] == target.spec
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
    target = load_target("resemblyzer?layers=all")
    cfg = DistillConfig(steps=80, lr=2e-3, warmup=10, batch_seconds=20, seed=0)
    result = extract(
        target,
        pool,
        tmp_path / "run",
        Budget(),
        preset="tiny",
        distill_cfg=cfg,
        heldout=heldout,
        progress=False,
    )
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


def test_save_load_upstream_identical(tmp_path, speech_clips):
    pool, _ = speech_clips
    target = load_target("resemblyzer?layers=1,3")
    ledger = Ledger(tmp_path / "ledger")
    query_clips(target, pool[:8], ledger, progress=False)
    student = distill(
        pool[:8],
        ledger,
        tmp_path / "student",
        DistillConfig(steps=3, warmup=1),
        preset="tiny",
        progress=False,
    )
    upstream = load_upstream(tmp_path / "student")
    wavs = [torch.from_numpy(c.load()) for c in pool[:3]]
    out = upstream(wavs)["hidden_states"]
    assert upstream.hidden_state_names == ["student.frontend", "student.layer1", "pred.lstm1", "pred.lstm3"]
    assert upstream.downsample_rate == 160
    assert all(h.shape[0] == 3 and h.shape[1] == max(len(w) for w in wavs) // 160 + 1 for h in out)
    # The stolen representations are exactly what the in-memory student predicts.
    for i, wav in enumerate(wavs):
        pred = predict(student, wav)
        n = len(pred["lstm3"])
        assert torch.equal(out[3][i, :n], pred["lstm3"])
    again = load_upstream(tmp_path / "student")(wavs)["hidden_states"]
    assert all(torch.equal(a, b) for a, b in zip(out, again, strict=True))
    # A target spec wraps the same way.
    t_up = load_upstream("resemblyzer?layers=1,3")
    t_out = t_up(wavs[:1])["hidden_states"]
    direct = target([wavs[0].numpy()])[0]
    assert np.array_equal(t_out[1][0].numpy(), direct["lstm3"])


def test_distill_resume_loses_nothing(tmp_path, speech_clips):
    pool, _ = speech_clips
    clips = pool[:10]
    target = load_target("resemblyzer")
    ledger = Ledger(tmp_path / "ledger")
    query_clips(target, clips, ledger, progress=False)
    cfg = DistillConfig(steps=16, warmup=2, batch_seconds=6, checkpoint_every=5, seed=3)
    full = distill(clips, ledger, tmp_path / "full", cfg, preset="tiny", progress=False)

    class Crash(RuntimeError):
        pass

    def crash_at_12(step, loss):
        if step == 12:
            raise Crash

    with pytest.raises(Crash):
        distill(clips, ledger, tmp_path / "crashed", cfg, preset="tiny", progress=False, on_step=crash_at_12)
    resumed = distill(clips, ledger, tmp_path / "crashed", cfg, preset="tiny", progress=False)
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), k
    log = [json.loads(x) for x in (tmp_path / "crashed" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 17))


def test_infer_heads_from_answers_only(tmp_path, speech_clips):
    pool, _ = speech_clips
    ledger = Ledger(tmp_path / "ledger")
    query_clips(load_target("resemblyzer?layers=2"), pool[:6], ledger, progress=False)
    (spec,) = infer_heads(ledger, list(ledger.keys()))
    assert (spec.name, spec.dim) == ("lstm2", 256)
    assert spec.rate == pytest.approx(100, abs=1)


def test_batches_capped_by_seconds():
    rng = random.Random(0)
    durations = [rng.uniform(0.3, 9.0) for _ in range(200)]
    batches = make_batches(durations, batch_seconds=20, crop_seconds=6, rng=random.Random(1))
    assert sorted(i for b in batches for i in b) == list(range(200))
    for b in batches:
        assert len(b) * max(min(durations[i], 6) for i in b) <= 20 or len(b) == 1


def test_budget_and_random_selection(speech_clips):
    pool, _ = speech_clips
    total = sum(c.duration for c in pool)
    assert Budget.parse("25%", pool_seconds=total).seconds == pytest.approx(total / 4)
    assert Budget.parse("90s") == Budget(seconds=90) and Budget.parse("2m") == Budget(seconds=120)
    assert Budget.parse("7") == Budget(clips=7)
    with pytest.raises(ValueError, match="bad budget"):
        Budget.parse("lots")
    chosen = select(pool, Budget(seconds=20), seed=1)
    assert sum(c.duration for c in chosen) <= 20 and chosen
    assert chosen == select(pool, Budget(seconds=20), seed=1)
    assert chosen != select(pool, Budget(seconds=20), seed=2)
    # A smaller budget with the same seed is a prefix of a larger one: ledgers are shared across budgets.
    assert select(pool, Budget(clips=5), seed=1) == select(pool, Budget(clips=10), seed=1)[:5]


def test_stage2_starts_from_a_stage1_checkpoint(tmp_path, speech_clips):
    pool, _ = speech_clips
    stage1 = build_student("tiny", [], dim=48)
    stage1.save(tmp_path / "stage1")
    ledger = Ledger(tmp_path / "ledger")
    query_clips(load_target("resemblyzer?layers=2"), pool[:4], ledger, progress=False)
    student = distill(
        pool[:4], ledger, tmp_path / "s", DistillConfig(steps=0), init=tmp_path / "stage1", progress=False
    )
    assert student.cfg.dim == 48 and list(student.heads) == ["lstm2"]  # its architecture, new heads
    own = student.state_dict()
    for k, v in stage1.state_dict().items():
        assert torch.equal(own[k], v), k
    with pytest.raises(ValueError, match="not a speechmimic student"):
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "config.json").write_text("{}")
        distill(
            pool[:4], ledger, tmp_path / "s2", DistillConfig(steps=0), init=tmp_path / "bad", progress=False
        )


def test_extract_command_pretrains_stage1_by_default(tmp_path, speech_clips, capsys):
    from speechmimic.cli import main
    from speechmimic.corpus import read_manifest, write_manifest

    pool, _ = speech_clips
    manifest = tmp_path / "pool.jsonl"
    write_manifest(pool, manifest)
    common = ["--target", "resemblyzer?layers=2", "--manifest", str(manifest), "--budget", "6"]
    common += ["--preset", "tiny", "--steps", "0", "--no-progress"]
    out = tmp_path / "x"
    cmd = ["extract", *common, "--strategy", "hybrid", "--stage1-steps", "3", "--out", str(out)]
    assert main(cmd) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["stage1"] == str(out / "stage1" / "iter1")
    # Stage 2 starts from the stage-1 trunk (no stage-2 step was taken here) ...
    stage1, _ = Student.load(out / "stage1" / "iter1")
    student, _ = Student.load(out / "student")
    own = student.state_dict()
    for k, v in stage1.state_dict().items():
        assert torch.equal(own[k], v), k
    # ... and the informed strategy ranked by the stage-1 student's scores of the pool.
    chosen = read_manifest(out / "selected.jsonl")
    assert len(chosen) == 6 and all(c.labels["selection"]["score"] > 0 for c in chosen)
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
