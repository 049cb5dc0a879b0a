"""White-box compression: an owner distils their own encoder with stage 2's loss, loop and DDP.

The teacher runs online: each batch's clips (cropped as in stage 2) go through the teacher, no
ledger and no budget, and the student learns to predict the teacher layers named in its spec
(``hf:DIR?layers=4,8,12``). Any :class:`~speechmimic.targets.Target` can teach; a transformers one
(``hf:``) also gives its shape and weights:

- ``distilhubert`` (DistilHuBERT's recipe): the teacher's waveform CNN, width, heads, FFN and
  positional convolution, its first ``student_layers`` transformer layers; all of these start from
  the teacher's weights, so the student's states are the teacher's first layers at the start.
- ``fithubert`` (FitHuBERT's, thin and deep): the teacher's CNN (copied) and depth, at 5/8 of its
  width with an FFN of twice the width; the transformer starts fresh.
- ``preset``: a student of ``--preset`` (any teacher, nothing copied).

Under torchrun every rank draws the whole batch's crops, asks the teacher for its own rows only and
the ranks sum their frame counts, so the loss is the batch's, as in stage 2.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from speechmimic import distributed
from speechmimic.audio import SAMPLE_RATE
from speechmimic.config import option
from speechmimic.corpus import Clip, fingerprint, warn_unusable
from speechmimic.distill import DistillConfig, distill_loss
from speechmimic.errors import InputError
from speechmimic.readahead import ReadAhead
from speechmimic.student import HeadSpec, Student, StudentConfig, build_student
from speechmimic.targets import Target
from speechmimic.targets.whisper import WhisperEncoder
from speechmimic.trainer import STATE_NAME, crop_start, record_of, save_trained, seed_all, train_loop

SHAPES = ("distilhubert", "fithubert", "preset")


@dataclass
class CompressConfig(DistillConfig):
    shape: str = option("distilhubert", "student shape: distilhubert, fithubert or preset", choices=SHAPES)
    student_layers: int = option(2, "transformer layers of a distilhubert-shaped student")
    teacher_init: bool = option(True, "start from the teacher's weights where shapes allow")
    stats_clips: int = option(64, "clips whose teacher answers set the heads' standardisation")


def student_config(teacher: Target, heads: list[HeadSpec], cfg: CompressConfig, preset: str) -> StudentConfig:
    """The student's shape for ``cfg.shape``, read off a transformers teacher's config (or a Whisper
    encoder's: ``distilhubert`` only, on a log-mel front end like Whisper's)."""
    model = getattr(teacher, "model", None)
    hf = getattr(model, "config", None)
    if cfg.shape == "preset":
        return build_student(preset, heads).cfg
    if isinstance(model, WhisperEncoder):
        if cfg.shape != "distilhubert":
            raise InputError(f"a Whisper teacher ({teacher.spec}) gives shape distilhubert or preset")
        dim, first = model.ln_post.normalized_shape[0], model.blocks[0]
        return StudentConfig(frontend="fbank", dim=dim, layers=cfg.student_layers, heads=first.heads,
                             ffn=first.fc1.out_features, norm_first=True, targets=list(heads))  # fmt: skip
    if hf is None or not hasattr(hf, "conv_dim"):
        raise InputError(
            f"shape {cfg.shape!r} copies a transformers teacher's shape; {teacher.spec} is not one: "
            "use --shape preset"
        )
    conv = {(int(k), int(s)) for k, s in zip(hf.conv_kernel, hf.conv_stride, strict=True)}
    if len(set(hf.conv_dim)) != 1 or conv - {(10, 5), (3, 2), (2, 2)}:
        raise InputError(
            f"{teacher.spec}: a CNN other than wav2vec 2.0's cannot be copied; use --shape preset"
        )
    heads_n = int(hf.num_attention_heads)
    if cfg.shape == "distilhubert":
        dim, ffn, layers = int(hf.hidden_size), int(hf.intermediate_size), cfg.student_layers
    else:  # fithubert: thin and deep
        dim = max(heads_n, int(hf.hidden_size) * 5 // 8 // heads_n * heads_n)
        ffn, layers = 2 * dim, int(hf.num_hidden_layers)
    return StudentConfig(
        frontend="conv",
        dim=dim,
        layers=layers,
        heads=heads_n,
        ffn=ffn,
        pos_kernel=int(hf.num_conv_pos_embeddings),
        conv_dim=int(hf.conv_dim[0]),
        pos_groups=int(hf.num_conv_pos_embedding_groups),
        norm_first=bool(getattr(hf, "do_stable_layer_norm", False)),
        input_norm=not getattr(hf, "do_stable_layer_norm", False),
        targets=list(heads),
    )


def copy_teacher_weights(student: Student, teacher_model: nn.Module) -> list[str]:
    """Copy every teacher tensor whose place and shape the student shares; returns the student
    parameters that were set."""
    if isinstance(teacher_model, WhisperEncoder):
        return _copy_whisper(student, teacher_model)
    src = teacher_model.state_dict()
    dst = student.state_dict()
    pairs: dict[str, torch.Tensor] = {}
    convs = [i for i, m in enumerate(student.frontend.cnn) if isinstance(m, nn.Conv1d)]
    for j, index in enumerate(convs):
        pairs[f"frontend.cnn.{index}.weight"] = src.get(f"feature_extractor.conv_layers.{j}.conv.weight")
    if getattr(teacher_model.config, "feat_extract_norm", "") == "group":
        for part in ("weight", "bias"):
            pairs[f"frontend.cnn.1.{part}"] = src.get(f"feature_extractor.conv_layers.0.layer_norm.{part}")
    for part in ("weight", "bias"):
        pairs[f"frontend.norm.{part}"] = src.get(f"feature_projection.layer_norm.{part}")
        pairs[f"frontend.proj.{part}"] = src.get(f"feature_projection.projection.{part}")
        # HuBERT base normalises the encoder's input; the stable-layer-norm models its output
        norm = "final_norm" if student.cfg.norm_first else "input_norm"
        pairs[f"{norm}.{part}"] = src.get(f"encoder.layer_norm.{part}")
    pairs["pos_conv.bias"] = src.get("encoder.pos_conv_embed.conv.bias")
    g = src.get("encoder.pos_conv_embed.conv.parametrizations.weight.original0")
    v = src.get("encoder.pos_conv_embed.conv.parametrizations.weight.original1")
    if g is not None and v is not None:  # weight norm over the kernel axis (dim=2): w = g v / |v|
        pairs["pos_conv.weight"] = g * v / v.norm(dim=(0, 1), keepdim=True)
    for j in range(student.cfg.layers):
        t, s = f"encoder.layers.{j}.", f"blocks.{j}."
        for part in ("weight", "bias"):
            qkv = [src.get(f"{t}attention.{x}_proj.{part}") for x in "qkv"]
            pairs[f"{s}self_attn.in_proj_{part}"] = None if None in qkv else torch.cat(qkv)
            pairs[f"{s}self_attn.out_proj.{part}"] = src.get(f"{t}attention.out_proj.{part}")
            pairs[f"{s}linear1.{part}"] = src.get(f"{t}feed_forward.intermediate_dense.{part}")
            pairs[f"{s}linear2.{part}"] = src.get(f"{t}feed_forward.output_dense.{part}")
            pairs[f"{s}norm1.{part}"] = src.get(f"{t}layer_norm.{part}")
            pairs[f"{s}norm2.{part}"] = src.get(f"{t}final_layer_norm.{part}")
    copied = {k: v for k, v in pairs.items() if v is not None and k in dst and dst[k].shape == v.shape}
    student.load_state_dict(copied, strict=False)
    return sorted(copied)


def _copy_whisper(student: Student, encoder: WhisperEncoder) -> list[str]:
    """Whisper's first layers into a pre-norm student of its width: the same computation (the
    student's layers are PyTorch's pre-norm GELU transformer layers, as Whisper's are), its final
    layer norm, and its strided convolution; Whisper's first convolution, log-mel and sinusoidal
    positions have no counterpart in the student's front end, which learns its own."""
    src, pairs = encoder.state_dict(), {}
    for j in range(min(student.cfg.layers, len(encoder.blocks))):
        t, s = f"blocks.{j}.", f"blocks.{j}."
        for part in ("weight", "bias"):
            pairs.update({
                f"{s}self_attn.in_proj_{part}": src[f"{t}qkv.{part}"],
                f"{s}self_attn.out_proj.{part}": src[f"{t}out.{part}"],
                f"{s}linear1.{part}": src[f"{t}fc1.{part}"], f"{s}linear2.{part}": src[f"{t}fc2.{part}"],
                f"{s}norm1.{part}": src[f"{t}attn_ln.{part}"], f"{s}norm2.{part}": src[f"{t}mlp_ln.{part}"],
            })  # fmt: skip
    for part in ("weight", "bias"):
        pairs[f"final_norm.{part}"] = src[f"ln_post.{part}"]
        pairs[f"frontend.conv2.{part}"] = src[f"conv2.{part}"]
    dst = student.state_dict()
    copied = {k: v for k, v in pairs.items() if k in dst and dst[k].shape == v.shape}
    student.load_state_dict(copied, strict=False)
    return sorted(copied)


def _crop(wav: np.ndarray, crop: int, hop: int, rng: random.Random) -> np.ndarray:
    if len(wav) <= crop:
        return wav
    start = crop_start(len(wav), crop, hop, rng) * hop
    return wav[start : start + crop]


def compress(
    clips: list[Clip],
    teacher: Target,
    out_dir: str | Path,
    cfg: CompressConfig,
    preset: str = "small",
    resume: bool = True,
    progress: bool = True,
) -> Student:
    """Distil ``teacher`` into a student on ``clips``, the teacher answering every batch; saves the
    student to ``out_dir`` (resumable, as stage 2) and returns it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_all(cfg.seed)
    least = int(getattr(teacher, "min_samples", 0) or 0)
    short = {
        c.id: f"shorter than the teacher takes ({least} samples)"
        for c in clips
        if c.duration * SAMPLE_RATE < least
    }
    warn_unusable("compress", short)
    clips = [c for c in clips if c.id not in short]
    if not clips:
        raise InputError("no clips to compress on")
    device = distributed.device_for(cfg.device)
    # A fixed sample of the clips sets the heads' widths, rates and standardisation.
    sample = [c.load() for c in clips[: cfg.stats_clips]]
    answers = teacher(sample)
    rate = teacher.frame_rate or SAMPLE_RATE * len(answers[0][next(iter(answers[0]))]) / len(sample[0])
    heads = [HeadSpec(name, int(a.shape[1]), float(rate)) for name, a in answers[0].items()]
    student = Student(student_config(teacher, heads, cfg, preset))
    copied = (
        copy_teacher_weights(student, teacher.model) if cfg.teacher_init and cfg.shape != "preset" else []
    )
    for head in student.heads.values():
        frames = np.concatenate([a[head.spec.name] for a in answers]).astype(np.float64)
        head.set_stats(frames.mean(0), frames.std(0))
    student.to(device).train()
    hop = student.cfg.hop
    crop = int(cfg.crop_seconds * SAMPLE_RATE) // hop * hop
    waves = ReadAhead(lambda i: clips[i].load())

    def step(model: nn.Module, batch_idx: list[int], rng: random.Random):
        wavs = [_crop(waves[i], crop, hop, rng) for i in batch_idx]  # the same crops on every rank
        rows, weight = distributed.my_share(len(wavs))
        with torch.no_grad():
            targets = teacher([wavs[i] for i in rows])
        frames = {
            name: round(distributed.all_sum(weight * sum(len(t[name]) for t in targets)))
            for name in student.heads
        }
        batch = torch.zeros(len(rows), max(len(w) for w in wavs))
        for r, i in enumerate(rows):
            batch[r, : len(wavs[i])] = torch.from_numpy(wavs[i])
        lengths = torch.tensor([len(wavs[i]) for i in rows], device=device)
        _, _, preds = model(batch.to(device), lengths)
        targets = [{k: torch.from_numpy(v).to(device) for k, v in t.items()} for t in targets]
        loss, _ = distill_loss(
            student, preds, lengths, targets, cfg.cos_weight, frames, cfg.stats_weight, len(wavs)
        )
        return loss * weight, {}

    record = record_of(cfg)
    record.update(teacher=teacher.spec, clips=fingerprint([c.id for c in clips]), preset=preset)
    t0 = time.time()
    log = train_loop(
        student,
        cfg,
        [c.duration for c in clips],
        step,
        out_dir / STATE_NAME,
        record=record,
        resume=resume,
        desc="compress",
        progress=progress,
        reader=waves,
    )
    student.eval()
    extra = {
        "compress": asdict(cfg),
        "target": teacher.spec,
        "teacher_weights": copied,
        "clips": len(clips),
        "train_seconds": round(time.time() - t0, 1),
    }
    save_trained(student, out_dir, log, extra)
    return student
