"""Stage 1: units, label/frame alignment, masked prediction, resume, scoring and the two commands."""

from __future__ import annotations

import argparse
import json
import random

import numpy as np
import pytest
import torch

from speechmimic.cli import pretrain as pretrain_cli
from speechmimic.cli import score as score_cli
from speechmimic.corpus import write_manifest
from speechmimic.pretrain import PretrainConfig, load_pretrained, mix_utterances, pretrain
from speechmimic.recipes.demo import demo_corpus
from speechmimic.score import Scores, checkpoint_accuracy, score_clips
from speechmimic.student import PRESETS, Student, build_student
from speechmimic.trainer import seed_all
from speechmimic.units import MFCCSource, StudentSource, fit_units, frame_centre_offset, labels_for_student

_RNG = random.Random(7)
DURATIONS = [0.1, 0.137, 1.0, 3.33, 20.0] + [round(_RNG.uniform(0.1, 20), 4) for _ in range(20)]


@pytest.mark.parametrize("preset", ["small", "distilhubert"])
def test_labels_have_one_unit_per_student_frame(preset):
    cfg = PRESETS[preset]
    mfcc = MFCCSource()
    for seconds in DURATIONS:
        n = round(seconds * 16_000)
        labels = np.arange(n // 160 + 1)  # label i = MFCC frame i, so the choice of frame is visible
        if seconds in (0.1, 0.137, 3.33):  # that is MFCC's frame count
            assert len(mfcc(np.random.default_rng(0).standard_normal(n).astype(np.float32))) == len(labels)
        out = labels_for_student(labels, n, cfg)
        assert len(out) == cfg.num_frames(n), (preset, seconds)
        # Nearest label frame to each student frame's centre, never off by more than half a label hop.
        centres = np.arange(len(out)) * cfg.hop + frame_centre_offset(cfg)
        inside = centres <= (len(labels) - 1) * 160
        assert np.all(np.abs(out * 160 - centres)[inside] <= 80)
        # Iteration 2: labels already at the student's rate map one to one.
        own = np.arange(cfg.num_frames(n))
        assert np.array_equal(labels_for_student(own, n, cfg, cfg.hop, frame_centre_offset(cfg)), own)


def test_student_frames_match_the_formula():
    student = build_student("tiny").eval()
    for seconds in (0.1, 0.137, 1.0, 3.33):
        n = round(seconds * 16_000)
        states, _ = student.encode(torch.zeros(1, n))
        assert states[-1].shape[1] == student.cfg.num_frames(n)


class _Counting(MFCCSource):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __call__(self, wav):
        self.calls += 1
        return super().__call__(wav)


def test_units_cached_and_keyed_by_inputs(tmp_path):
    pool, _ = demo_corpus()
    clips = pool[:10]
    source = _Counting()
    units = fit_units(clips, source, k=8, seed=0, cache_dir=tmp_path, max_frames=2000, progress=False)
    labels = units.clip_labels(clips, tmp_path, progress=False)
    assert source.calls == 2 * len(clips)  # one pass to sample, one to assign
    again = fit_units(clips, source, k=8, seed=0, cache_dir=tmp_path, max_frames=2000, progress=False)
    relabelled = again.clip_labels(clips, tmp_path, progress=False)
    assert source.calls == 2 * len(clips)  # nothing recomputed
    assert np.array_equal(again.centroids, units.centroids)
    assert all(np.array_equal(relabelled[c.id][0], labels[c.id][0]) for c in clips)
    # Each input is in the name: other k, seed or clips -> other files.
    fit_units(clips, source, k=9, seed=0, cache_dir=tmp_path, max_frames=2000, progress=False)
    fit_units(clips, source, k=8, seed=1, cache_dir=tmp_path, max_frames=2000, progress=False)
    fit_units(clips[:9], source, k=8, seed=0, cache_dir=tmp_path, max_frames=2000, progress=False)
    assert len(list(tmp_path.glob("kmeans-*.safetensors"))) == 4
    # ... and, for iteration 2, the student's weights.
    a, b = build_student("tiny"), build_student("tiny")
    with torch.no_grad():
        b.mask_emb.add_(1.0)
    assert StudentSource(a, 1).fingerprint() != StudentSource(b, 1).fingerprint()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    pool, heldout = demo_corpus()
    out = tmp_path_factory.mktemp("pretrain")
    cfg = PretrainConfig(
        steps=300, lr=2e-3, warmup=30, batch_seconds=20, k=50, codebook_dim=64, seed=0, checkpoint_every=1000
    )
    pretrain(pool, out, cfg, preset="tiny", progress=False)
    return out / "iter1", heldout


def test_masked_prediction_beats_most_frequent_unit(pretrained):
    directory, heldout = pretrained
    acc = checkpoint_accuracy(directory, heldout, seed=0, progress=False)
    print(f"held-out masked accuracy {acc}")
    assert acc["frames"] > 1000
    assert acc["accuracy"] > 2 * acc["majority"] and acc["accuracy"] > acc["majority"] + 0.05, acc


def test_score_clips_aligned_finite_and_seeded(pretrained):
    directory, heldout = pretrained
    clips = heldout[:5]
    scores = score_clips(directory, clips, seed=1, progress=False)
    assert scores.ids == [c.id for c in clips]
    assert scores.uncertainty.shape == (5,) and np.isfinite(scores.uncertainty).all()
    assert scores.embeddings.shape == (5, PRESETS["tiny"].dim) and np.isfinite(scores.embeddings).all()
    reversed_ = score_clips(directory, clips[::-1], seed=1, progress=False).aligned(clips)
    assert np.allclose(reversed_.uncertainty, scores.uncertainty, atol=1e-5)  # masks follow the clip


def test_scoring_a_lazily_read_manifest_is_scoring_the_list(pretrained, tmp_path, capsys):
    from dataclasses import replace

    from speechmimic.corpus import iter_manifest, write_manifest

    directory, heldout = pretrained
    (tmp_path / "bad.wav").write_bytes(b"RIFF" + bytes(60))
    clips = [*heldout[:3], replace(heldout[0], id="bad", path=str(tmp_path / "bad.wav")), *heldout[3:5]]
    write_manifest(clips, tmp_path / "m.jsonl")
    listed = score_clips(directory, heldout[:5], seed=1, progress=False)
    lazy = score_clips(directory, iter_manifest(tmp_path / "m.jsonl"), seed=1, progress=False, total=6)
    assert lazy.ids == listed.ids and "bad" not in lazy.ids
    np.testing.assert_array_equal(lazy.embeddings, listed.embeddings)
    np.testing.assert_array_equal(lazy.uncertainty, listed.uncertainty)
    assert "stage-1 scoring: skipped 1 unusable clip(s): bad" in capsys.readouterr().err


def test_pretrain_resume_loses_nothing_and_skips_done_work(tmp_path):
    pool, _ = demo_corpus()
    clips = pool[:12]
    cfg = PretrainConfig(
        steps=12, warmup=2, batch_seconds=6, k=8, codebook_dim=16, checkpoint_every=5, seed=3
    )
    full = pretrain(clips, tmp_path / "full", cfg, preset="tiny", progress=False)

    class Crash(RuntimeError):
        pass

    def crash_at_9(step, loss):
        if step == 9:
            raise Crash

    with pytest.raises(Crash):
        pretrain(clips, tmp_path / "crashed", cfg, preset="tiny", progress=False, on_step=crash_at_9)
    resumed = pretrain(clips, tmp_path / "crashed", cfg, preset="tiny", progress=False)
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), k
    heads = [load_pretrained(tmp_path / d / "iter1")[1].state_dict() for d in ("full", "crashed")]
    assert all(torch.allclose(heads[0][k], heads[1][k], atol=1e-6) for k in heads[0])
    log_file = tmp_path / "crashed" / "iter1" / "train_log.jsonl"
    log = [json.loads(x) for x in log_file.read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 13))

    def no_training(step, loss):
        raise AssertionError("a finished iteration was trained again")

    pretrain(clips, tmp_path / "full", cfg, preset="tiny", progress=False, on_step=no_training)


def test_second_iteration_clusters_the_first_student(tmp_path):
    pool, heldout = demo_corpus()
    cfg = PretrainConfig(steps=4, warmup=1, batch_seconds=6, k=8, codebook_dim=16, iterations=1, seed=0)
    pretrain(pool[:10], tmp_path, cfg, preset="tiny", progress=False)
    steps = []
    cfg.iterations = 2
    pretrain(pool[:10], tmp_path, cfg, preset="tiny", progress=False, on_step=lambda s, _: steps.append(s))
    assert steps == [1, 2, 3, 4]  # iteration 1 was done already: only iteration 2 trained
    assert len(list((tmp_path / "units").glob("kmeans-*.safetensors"))) == 2
    student, _, units = load_pretrained(tmp_path / "iter2")
    assert isinstance(units.source, StudentSource) and units.source.layer == 1
    labels = units.student_labels(heldout[:3], student.cfg, progress=False)
    assert all(len(labels[c.id]) == student.cfg.num_frames(len(c.load())) for c in heldout[:3])


def test_mask_leaves_unmasked_forward_unchanged(tmp_path):
    torch.manual_seed(0)
    student = build_student("tiny").eval()
    with torch.no_grad():
        student.mask_emb.normal_()
    wav = torch.randn(2, 16_000)
    t = student.cfg.num_frames(16_000)
    plain, _ = student.encode(wav)
    none_masked, _ = student.encode(wav, mask=torch.zeros(2, t, dtype=torch.bool))
    assert all(torch.equal(a, b) for a, b in zip(plain, none_masked, strict=True))
    mask = torch.zeros(2, t, dtype=torch.bool)
    mask[0, 10:20] = True
    masked, _ = student.encode(wav, mask=mask)

    def by_hand(module, inputs, out):  # what masking means: those front-end frames become mask_emb
        out = out.clone()
        out[0, 10:20] = student.mask_emb
        return out

    hook = student.frontend.register_forward_hook(by_hand)
    expected, _ = student.encode(wav)
    hook.remove()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(masked, expected, strict=True))
    assert torch.equal(masked[-1][1], plain[-1][1])  # the other clip is untouched
    # A checkpoint saved before mask_emb existed still loads.
    student.save(tmp_path)
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "model.safetensors")
    del weights["mask_emb"]
    save_file(weights, tmp_path / "model.safetensors")
    Student.load(tmp_path)


def _parser():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    pretrain_cli.register(sub)
    score_cli.register(sub)
    return parser, sub


def test_cli_pretrain_and_score(tmp_path, capsys):
    parser, sub = _parser()
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help, (name, action.dest)
    pool, heldout = demo_corpus()
    write_manifest(pool[:8], tmp_path / "pool.jsonl")
    write_manifest(heldout[:3], tmp_path / "heldout.jsonl")
    args = parser.parse_args(
        ["pretrain", "--manifest", str(tmp_path / "pool.jsonl"), "--out", str(tmp_path / "pt"), "--k", "6"]
        + ["--steps", "3", "--warmup", "1", "--preset", "tiny", "--batch-seconds", "6", "--no-progress"]
        + ["--heldout", str(tmp_path / "heldout.jsonl")]
    )
    assert args.func(args) == 0
    assert "held-out masked accuracy" in capsys.readouterr().out
    out = tmp_path / "scores.npz"
    args = parser.parse_args(
        ["score", "--student", str(tmp_path / "pt" / "iter1"), "--manifest", str(tmp_path / "heldout.jsonl")]
        + ["--out", str(out), "--seed", "2", "--no-progress"]
    )
    assert args.func(args) == 0
    scores = Scores.load(out)
    assert scores.ids == [c.id for c in heldout[:3]] and scores.embeddings.shape == (3, PRESETS["tiny"].dim)


def test_utterance_mixing_adds_another_clip_where_drawn_and_draws_nothing_when_off():
    wav = torch.randn(3, 16000)
    wav[2, 8000:] = 0  # the third clip is half as long
    lengths = torch.tensor([16000, 16000, 8000])
    rng = random.Random(1)
    assert mix_utterances(wav, lengths, 0.0, rng) is wav
    assert rng.random() == random.Random(1).random()  # off: no number drawn, old runs replay alike
    mixed = mix_utterances(wav, lengths, 1.0, random.Random(2))
    for b, n in enumerate(lengths.tolist()):
        changed = torch.nonzero(mixed[b] != wav[b]).flatten()
        assert 0 < len(changed) <= n // 2  # one segment, at most half the clip, inside it
        assert int(changed.max()) < n and int(changed.max() - changed.min()) < n // 2 + 1
        # the added segment is a scaled piece of another clip, at -5..5 dB of this one's energy
        added = (mixed[b] - wav[b])[changed]
        ratio = 10 * torch.log10(wav[b, :n].square().mean() / added.square().mean())
        assert -5.01 <= float(ratio) <= 5.01
    assert not torch.equal(mixed, mix_utterances(wav, lengths, 1.0, random.Random(3)))


def test_data2vec_stage1_regresses_its_ema_teacher_resumes_and_cannot_score(tmp_path):
    pool, _ = demo_corpus()
    clips = pool[:12]
    with pytest.raises(ValueError, match="one iteration"):
        PretrainConfig(objective="data2vec", iterations=2)
    cfg = PretrainConfig(
        steps=30, warmup=3, batch_seconds=6, checkpoint_every=10, seed=4, objective="data2vec", mix_prob=0.5
    )
    full = pretrain(clips, tmp_path / "full", cfg, preset="tiny", progress=False)

    def crash_at_17(step, loss):
        if step == 17:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(clips, tmp_path / "crashed", cfg, preset="tiny", progress=False, on_step=crash_at_17)
    resumed = pretrain(clips, tmp_path / "crashed", cfg, preset="tiny", progress=False)
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), k
    # The teacher followed the student (30 EMA updates) without becoming it; the loss fell.
    state = torch.load(tmp_path / "full" / "iter1" / "train_state.pt", weights_only=False)["model"]
    assert int(state["updates"]) == 30
    seed_all(4)  # as pretrain does before building its student: the same initial weights
    start = build_student("tiny").state_dict()
    w = "blocks.0.linear1.weight"
    assert not torch.equal(state[f"teacher.{w}"], start[w])
    assert not torch.equal(state[f"teacher.{w}"], state[f"student.{w}"])
    log = [json.loads(x) for x in (tmp_path / "full" / "iter1" / "train_log.jsonl").read_text().splitlines()]
    assert np.mean([e["loss"] for e in log[-5:]]) < np.mean([e["loss"] for e in log[:5]])
    assert not (tmp_path / "full" / "iter1" / "units.safetensors").exists()
    with pytest.raises(ValueError, match="data2vec"):
        load_pretrained(tmp_path / "full" / "iter1")

    def no_training(step, loss):
        raise AssertionError("a finished data2vec stage 1 was trained again")

    pretrain(clips, tmp_path / "full", cfg, preset="tiny", progress=False, on_step=no_training)
