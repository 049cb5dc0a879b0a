"""Our stage-2 training step against s3prl's DistilHuBERT distiller, side by side, in one run.

Both train a student of DistilHuBERT's size (waveform CNN, 2 transformer layers of 768, FFN 3072, 12
heads, 3 prediction heads of 768 at 50 Hz) on the same batch (8 clips of 4 s; targets: 3 layers of
768 at 50 Hz), forward + backward + gradient clipping + AdamW, on the same CPU threads. s3prl's side
is its own ``DistillerModel`` (``upstream/distiller/model.py`` with DistilHuBERT's published
config), imported from s3prl's sdist without installing it (its package imports torchaudio; ``make
setup`` downloads the sdist, or set SPEECHMIMIC_S3PRL_SDIST), and its loss as in s3prl's
``pretrain/distiller/pretrain_expert.py``: L1 over all frames + ``-log sigmoid(cos)``. Each side
steps its own trainer's AdamW: ours fused (``speechmimic.trainer.adamw``), s3prl's torch's unfused
one (kinder to it than its DistilHuBERT config's Python-loop ``AdamW_with_schedule``). Steps
alternate between the two so that a busy machine slows both alike; the medians give audio-seconds
per second and their ratio. Then a profile of where our step spends its time.

    python benchmarks/distill_throughput.py [--steps 8] [--threads 2] [--batch 8] [--seconds 4]
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from speechmimic.distill import distill_loss
from speechmimic.student import HeadSpec, build_student
from speechmimic.testing import S3PRL_SDIST_ENV, s3prl_sdist, unpack_s3prl
from speechmimic.trainer import adamw

LAYERS = ["hidden_4", "hidden_8", "hidden_12"]
# DistilHuBERT (s3prl's pretrain/distiller/config_model.yaml)
DISTILHUBERT = {
    "extractor_mode": "default",
    "extractor_conv_feature_layers": "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2",
    "feature_grad_mult": 0.1,
    "conv_pos": 128,
    "conv_pos_groups": 16,
    "encoder_layers": 2,
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "activation_fn": "gelu",
    "layer_norm_first": False,
    "attention_type": "original",
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "activation_dropout": 0.1,
    "encoder_layerdrop": 0.0,
    "final_dim": 768,
    "out_layer_type": "expand-last",
    "n_tasks": 3,
    "task_emb_type": "expand-last",
    "loss_type": "l1",
    "feat_pen_loss": 0.0,
    "cosine_loss": 1.0,
    "pred_layer_id": [4, 8, 12],
}


def s3prl_distiller():
    """s3prl's ``upstream.distiller.model`` module, from its sdist."""
    sdist = s3prl_sdist()
    if sdist is None:
        sys.exit(f"s3prl's sdist is missing: `make setup` downloads it, or set {S3PRL_SDIST_ENV}")
    files = [
        f"s3prl/upstream/{f}"
        for f in ("distiller/model.py", "distiller/module.py", "wav2vec2/wav2vec2_model.py")
    ]
    unpack_s3prl(sdist, Path(tempfile.mkdtemp(prefix="s3prl-")), files)
    return importlib.import_module("s3prl.upstream.distiller.model")


def s3prl_loss(pred: torch.Tensor, target: torch.Tensor, cosine: float) -> torch.Tensor:
    """s3prl's DistilHuBERT loss (pretrain_expert.py): pred, target (B, N, T, D)."""
    rec = F.l1_loss(pred, target)
    sim = -F.logsigmoid(F.cosine_similarity(pred, target, dim=-1)).mean()
    return rec + cosine * sim


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="timed steps of each (after 2 warm-up steps)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile-steps", type=int, default=2, help="steps of ours to profile (0: none)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    n = int(args.seconds * 16000)
    wav = torch.from_numpy((0.1 * rng.standard_normal((args.batch, n))).astype(np.float32))
    lengths = torch.full((args.batch,), n)
    frames = (n - 400) // 320 + 1  # HuBERT's frames for the clip
    targets = torch.from_numpy(rng.standard_normal((args.batch, len(LAYERS), frames, 768)).astype(np.float32))

    ours = build_student("distilhubert", [HeadSpec(name, 768, 50.0) for name in LAYERS]).train()
    ours_targets = [{name: targets[i, j] for j, name in enumerate(LAYERS)} for i in range(args.batch)]

    model = s3prl_distiller()
    theirs = model.DistillerModel(model.DistillerConfig(DISTILHUBERT)).train()
    pad_mask = torch.ones(args.batch, n, dtype=torch.long)  # s3prl's: 1 where the wave is real

    def our_step(opt):
        _, _, preds = ours(wav, lengths)
        loss, _ = distill_loss(ours, preds, lengths, ours_targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), 5.0)
        opt.step()

    def their_step(opt):
        _, _, pred, _ = theirs(wav, pad_mask)
        t = min(pred.shape[2], frames)
        loss = s3prl_loss(pred[:, :, :t], targets[:, :, :t], DISTILHUBERT["cosine_loss"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 10.0)
        opt.step()

    opts = {
        "speechmimic": (our_step, adamw(ours.parameters(), lr=2e-4, weight_decay=0.01)),
        "s3prl": (their_step, torch.optim.AdamW(theirs.parameters(), lr=2e-4)),
    }
    params = {
        "speechmimic": sum(p.numel() for p in ours.parameters()),
        "s3prl": sum(p.numel() for p in theirs.parameters()),
    }
    times: dict[str, list[float]] = {k: [] for k in opts}
    for i in range(args.steps + 2):
        for name, (step, opt) in opts.items():
            t0 = time.perf_counter()
            step(opt)
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
        print(f"step {i + 1}/{args.steps + 2}", file=sys.stderr, flush=True)

    audio = args.batch * args.seconds
    print(
        f"\nbatch {args.batch} x {args.seconds:g} s, {args.threads} threads, {args.steps} timed steps each "
        "(median; forward + backward + clipping + AdamW)"
    )
    print("| | parameters | s / step | audio-s / s |\n|---|---|---|---|")
    rate = {}
    for name, ts in times.items():
        med = float(np.median(ts))
        rate[name] = audio / med
        print(f"| {name} | {params[name] / 1e6:.2f} M | {med:.3f} | {rate[name]:.1f} |")
    print(f"\nratio speechmimic / s3prl: {rate['speechmimic'] / rate['s3prl']:.2f}x")

    if args.profile_steps:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.profile_steps):
                our_step(opts["speechmimic"][1])
        print(f"\nwhere our step spends its time ({args.profile_steps} steps, CPU self time):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
