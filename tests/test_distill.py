"""Stage 2: heads sized from the answers alone, one shared training loop, exact resume, stage-1 init."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from speechmimic.distill import DistillConfig, _collate, distill, infer_heads
from speechmimic.ledger import Ledger, query_clips
from speechmimic.student import HeadSpec, build_student
from speechmimic.targets import load_backend
from speechmimic.trainer import make_batches


def test_distill_resume_loses_nothing(tmp_path, speech_clips):
    pool, _ = speech_clips
    clips = pool[:10]
    target = load_backend("resemblyzer")
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


def test_a_state_left_by_other_settings_is_not_resumed(tmp_path, speech_clips):
    pool, _ = speech_clips
    clips = pool[:6]
    ledger = Ledger(tmp_path / "ledger")
    query_clips(load_backend("resemblyzer"), clips, ledger, progress=False)
    cfg = DistillConfig(steps=4, warmup=1, batch_seconds=6, seed=1)
    distill(clips, ledger, tmp_path / "s", cfg, preset="tiny", progress=False)
    # Twice the steps in the same folder: a fresh run of 8 steps, not the old 4 continued.
    longer = DistillConfig(steps=8, warmup=1, batch_seconds=6, seed=1)
    again = distill(clips, ledger, tmp_path / "s", longer, preset="tiny", progress=False)
    fresh = distill(clips, ledger, tmp_path / "fresh", longer, preset="tiny", progress=False)
    for (k, a), (_, b) in zip(again.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_infer_heads_from_answers_only(tmp_path, speech_clips):
    pool, _ = speech_clips
    ledger = Ledger(tmp_path / "ledger")
    query_clips(load_backend("resemblyzer?layers=2"), pool[:6], ledger, progress=False)
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


def test_stage2_starts_from_a_stage1_checkpoint(tmp_path, speech_clips):
    pool, _ = speech_clips
    stage1 = build_student("tiny", [], dim=48)
    stage1.save(tmp_path / "stage1")
    ledger = Ledger(tmp_path / "ledger")
    query_clips(load_backend("resemblyzer?layers=2"), pool[:4], ledger, progress=False)
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


class _NumberedLayers:
    """A target returning layers named as HF's are (``hidden_<i>``), in an order that strings sort
    differently: each layer's width is its number, so a mixed-up order shows in the shapes."""

    spec = "numbered-layers"
    frame_rate = 50.0
    layers = ["hidden_4", "hidden_8", "hidden_12"]
    padding = "per_clip"
    min_samples = 320

    def __call__(self, wavs, keys=None):
        frames = [torch.from_numpy(w[: len(w) // 320 * 320]).reshape(-1, 320) for w in wavs]
        return [{name: f[:, : int(name[7:])].numpy() for name in self.layers} for f in frames]


def test_heads_keep_the_targets_order_not_the_strings(tmp_path, speech_clips):
    from speechmimic import load_upstream
    from speechmimic.fidelity import heldout_fidelity
    from speechmimic.report import fidelity_table

    pool, heldout = speech_clips
    target = _NumberedLayers()
    ledger = Ledger(tmp_path / "ledger")
    query_clips(target, pool[:6], ledger, progress=False)
    assert list(ledger.get(ledger.key_of(pool[0].id))) == [
        "hidden_12",
        "hidden_4",
        "hidden_8",
    ]  # stored sorted
    student = distill(
        pool[:6], ledger, tmp_path / "s", DistillConfig(steps=2, warmup=1), preset="tiny", progress=False
    )
    assert [(h.name, h.dim) for h in infer_heads(ledger, list(ledger.entries))] == [
        ("hidden_4", 4),
        ("hidden_8", 8),
        ("hidden_12", 12),
    ]
    assert list(student.heads) == target.layers
    assert load_upstream(tmp_path / "s").hidden_state_names[-3:] == [
        "pred.hidden_4",
        "pred.hidden_8",
        "pred.hidden_12",
    ]
    assert load_upstream("numbered-layers", ledger=ledger).hidden_state_names == target.layers
    fidelity = heldout_fidelity(student, target, heldout[:2], Ledger(tmp_path / "eval"), progress=False)
    assert list(fidelity) == target.layers
    table = fidelity_table([{"label": "6", "queries": 6, "queried_seconds": 9.0, "fidelity": fidelity}])
    assert [row.split(" | ")[3] for row in table.splitlines()[2:5]] == target.layers


def test_accumulation_resumes_and_autocast_trains(tmp_path, speech_clips):
    pool, _ = speech_clips
    clips = pool[:10]
    ledger = Ledger(tmp_path / "ledger")
    query_clips(load_backend("resemblyzer"), clips, ledger, progress=False)
    # two batches of 3 s per step: a crash mid-epoch resumes on the right batch
    cfg = DistillConfig(steps=8, warmup=2, batch_seconds=3, checkpoint_every=3, seed=1, accumulate=2)
    full = distill(clips, ledger, tmp_path / "full", cfg, preset="tiny", progress=False)

    def crash_at_5(step, loss):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(clips, ledger, tmp_path / "crashed", cfg, preset="tiny", progress=False, on_step=crash_at_5)
    resumed = distill(clips, ledger, tmp_path / "crashed", cfg, preset="tiny", progress=False)
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), k

    def losses(directory):
        return [json.loads(x)["loss"] for x in (directory / "train_log.jsonl").read_text().splitlines()]

    # bf16 autocast on the CPU: the same run to bf16's precision (8 bits of mantissa)
    plain = DistillConfig(steps=8, warmup=2, batch_seconds=6, seed=1)
    distill(clips, ledger, tmp_path / "fp32", plain, preset="tiny", progress=False)
    amp = DistillConfig(steps=8, warmup=2, batch_seconds=6, seed=1, amp="bf16")
    distill(clips, ledger, tmp_path / "bf16", amp, preset="tiny", progress=False)
    a, b = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert a != b and max(abs(x - y) / x for x, y in zip(a, b, strict=True)) < 0.05, (a, b)
    with pytest.raises(ValueError, match="amp"):
        distill(
            clips, ledger, tmp_path / "x", DistillConfig(steps=1, amp="fp8"), preset="tiny", progress=False
        )


def test_augmented_views_train_toward_the_same_answer_and_cost_no_randomness_when_off():
    student = build_student("tiny", [HeadSpec("a", 8, 100.0)])
    wav = (0.1 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32)
    answer = {"a": np.random.default_rng(1).standard_normal((100, 8)).astype(np.float32)}
    rng = random.Random(0)
    plain = _collate([(wav, answer)], student, 6.0, rng)
    assert rng.getstate() == random.Random(0).getstate()  # off: no draw, so default runs are unchanged
    assert torch.equal(plain[0][0], torch.from_numpy(wav))
    views = [_collate([(wav, answer)], student, 6.0, random.Random(s), augment=1.0) for s in range(3)]
    for view in views:
        x = view[0][0].numpy()
        assert not np.allclose(x, wav) and np.corrcoef(x, wav)[0, 1] > 0.95  # the same clip, changed
        gain_db = 10 * np.log10(np.mean(x**2) / np.mean(wav**2))
        assert -6.1 < gain_db < 6.1
        assert torch.equal(view[2][0]["a"], torch.from_numpy(answer["a"]))  # trained toward the paid answer
    with pytest.raises(ValueError, match="augment"):
        DistillConfig(augment=1.5)


def _utterance_stats_error(student, wav, lengths, means, scales) -> float:
    """Mean |difference| of each clip's per-dimension mean and std over frames from the clip's true
    mean and std (not from one noisy draw of its frames, whose own spread would hide the gap), in the
    heads' units."""
    from speechmimic.student import align

    with torch.no_grad():
        _, _, preds = student.eval()(wav, lengths)
    student.train()
    err, n = 0.0, student.cfg.num_frames(lengths)
    for name, head in student.heads.items():
        for i, (mean, scale) in enumerate(zip(means, scales, strict=True)):
            p = align(preds[name][i], int(n[i]) * head.ratio, int(n[i]))
            y_mean, y_std = (mean[0] - head.mean) / head.std, scale / head.std
            err += float((p.mean(0) - y_mean).abs().mean() + (p.std(0) - y_std).abs().mean())
    return err / len(means)


def test_the_utterance_statistics_term_matches_each_clips_mean_and_std():
    from speechmimic.distill import distill_loss

    # Answers whose mean and spread over frames belong to the clip (as a speaker's do) while each
    # frame is fresh noise at every step: frame losses alone learn the mean and no spread at all.
    gen = torch.Generator().manual_seed(0)
    wav = 0.1 * torch.randn(6, 8000, generator=gen)
    lengths = torch.tensor([8000, 8000, 7000, 6000, 8000, 5000])
    frames = [int(n) for n in build_student("tiny").cfg.num_frames(lengths)]
    means = [torch.randn(1, 8, generator=gen) for _ in frames]
    scales = [0.3 + i / 3 for i in range(len(frames))]

    def answers(noise):
        return [
            {"a": m + s * torch.randn(t, 8, generator=noise)}
            for m, s, t in zip(means, scales, frames, strict=True)
        ]

    errors = {}
    for weight in (0.0, 1.0):
        noise = torch.Generator().manual_seed(1)  # both weights see the same answers
        torch.manual_seed(0)
        student = build_student("tiny", [HeadSpec("a", 8, 50.0)], frontend_stride=2)
        opt = torch.optim.Adam(student.parameters(), lr=3e-3)
        for _ in range(150):
            targets = answers(noise)
            _, _, preds = student(wav, lengths)
            loss, parts = distill_loss(student, preds, lengths, targets, stats_weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert ("stats" in parts["a"]) == bool(weight)
        errors[weight] = _utterance_stats_error(student, wav, lengths, means, scales)
    assert errors[1.0] < 0.7 * errors[0.0], errors

    # split across two ranks, the rows' losses with the batch's counts add up to the batch's loss
    student = build_student("tiny", [HeadSpec("a", 8, 50.0)])
    _, _, preds = student(wav, lengths)
    counts = {"a": sum(len(t["a"]) for t in targets)}
    whole, _ = distill_loss(student, preds, lengths, targets, stats_weight=2.0)
    halves = [
        distill_loss(student, {"a": preds["a"][s]}, lengths[s], targets[s], 1.0, counts, 2.0, 6)[0]
        for s in (slice(0, 3), slice(3, 6))
    ]
    assert torch.allclose(whole, halves[0] + halves[1], rtol=1e-5)
    with pytest.raises(ValueError, match="stats_weight"):
        DistillConfig(stats_weight=-1)


def test_semi_supervised_stage2_learns_the_unpaid_units_and_resumes(tmp_path, speech_clips):
    pool, _ = speech_clips
    paid, unpaid = pool[:6], pool[6:20]
    ledger = Ledger(tmp_path / "ledger")
    query_clips(load_backend("resemblyzer"), paid, ledger, progress=False)
    cfg = DistillConfig(
        steps=80,
        warmup=4,
        batch_seconds=6,
        lr=2e-3,
        seed=2,
        checkpoint_every=20,
        masked_weight=1.0,
        masked_k=8,
    )
    with pytest.raises(ValueError, match="unqueried clips"):
        distill(paid, ledger, tmp_path / "none", cfg, preset="tiny", progress=False)

    def crash_at_50(step, loss):
        if step == 50:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(
            paid,
            ledger,
            tmp_path / "s",
            cfg,
            preset="tiny",
            progress=False,
            unpaid=unpaid,
            on_step=crash_at_50,
        )
    resumed = distill(paid, ledger, tmp_path / "s", cfg, preset="tiny", progress=False, unpaid=unpaid)
    full = distill(paid, ledger, tmp_path / "full", cfg, preset="tiny", progress=False, unpaid=unpaid)
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), k
    # The masked term really trains: the units of unpaid clips get predicted better as it goes.
    log = [json.loads(x) for x in (tmp_path / "full" / "train_log.jsonl").read_text().splitlines()]
    first, last = np.mean([e["masked_acc"] for e in log[:5]]), np.mean([e["masked_acc"] for e in log[-10:]])
    assert last > first + 0.05, (first, last)
    assert json.loads((tmp_path / "full" / "config.json").read_text())["unpaid_clips"] == len(unpaid)
    # Off, the same settings train the student alone: another result.
    off = distill(
        paid, ledger, tmp_path / "off", replace(cfg, masked_weight=0.0), preset="tiny", progress=False
    )
    assert not torch.equal(
        off.state_dict()["blocks.0.linear1.weight"], full.state_dict()["blocks.0.linear1.weight"]
    )
