"""Options shared by several subcommands, so they read the same everywhere."""

from __future__ import annotations

import argparse

from speechmimic.distill import DistillConfig
from speechmimic.student import PRESETS

_D = DistillConfig()


def add_target(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--target",
        required=required,
        metavar="SPEC",
        help="the encoder behind the API: "
        "'hf:<local dir or hub id>[?layers=-1|4,8,12|all&padding=per_clip|bucket]' "
        "(a transformers HuBERT/WavLM/wav2vec2/data2vec-audio) or 'resemblyzer[?layers=1,2,3|all]' "
        "(the pretrained GE2E speaker encoder; layers are its LSTM layers)",
    )


def add_budget(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--budget",
        required=required,
        default=None,
        metavar="B",
        help="what may be queried: N clips, Ns/Nm/Nh of audio (e.g. 600s, 10m), "
        "or N%% of the manifest's seconds",
    )


def add_seed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")


def add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_distill(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("distillation (stage 2 training)")
    g.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="small",
        help="student size: 'small' (~3 M params, CPU), 'distilhubert' (2 x 768-d, 23 M), "
        "'tiny' (tests) (default: small)",
    )
    g.add_argument("--steps", type=int, default=_D.steps, help=f"optimiser steps (default: {_D.steps})")
    g.add_argument("--lr", type=float, default=_D.lr, help=f"AdamW peak learning rate (default: {_D.lr})")
    g.add_argument(
        "--warmup", type=int, default=_D.warmup, help=f"linear warm-up steps (default: {_D.warmup})"
    )
    g.add_argument(
        "--batch-seconds",
        type=float,
        default=_D.batch_seconds,
        help=f"cap on padded audio seconds per batch (default: {_D.batch_seconds})",
    )
    g.add_argument(
        "--crop-seconds",
        type=float,
        default=_D.crop_seconds,
        help=f"longer clips are randomly cropped to this length in training (default: {_D.crop_seconds})",
    )
    g.add_argument(
        "--checkpoint-every",
        type=int,
        default=_D.checkpoint_every,
        help=f"save a resumable training state every N steps (default: {_D.checkpoint_every})",
    )
    g.add_argument(
        "--stage1",
        default=None,
        metavar="DIR",
        help="stage-1 checkpoint (from 'speechmimic pretrain') the student starts from: its architecture "
        "replaces --preset and its trunk weights are loaded; heads are new",
    )
    g.add_argument(
        "--from-scratch", action="store_true", help="ignore --stage1 and start from random weights"
    )
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    g.add_argument(
        "--no-resume",
        action="store_true",
        help="start training afresh even if the output folder holds an interrupted run",
    )


def init_dir(args: argparse.Namespace) -> str | None:
    """The stage-1 checkpoint to start from, if any."""
    return None if args.from_scratch else args.stage1


def distill_config(args: argparse.Namespace) -> DistillConfig:
    return DistillConfig(
        steps=args.steps,
        lr=args.lr,
        warmup=args.warmup,
        batch_seconds=args.batch_seconds,
        crop_seconds=args.crop_seconds,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        device=args.device,
    )
