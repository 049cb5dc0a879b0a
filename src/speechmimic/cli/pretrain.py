"""``speechmimic pretrain``: stage 1, HuBERT-style masked prediction on unlabelled audio."""

from __future__ import annotations

from pathlib import Path

from speechmimic.cli import _options
from speechmimic.corpus import read_manifest
from speechmimic.pretrain import PretrainConfig, checkpoint_accuracy, pretrain
from speechmimic.student import PRESETS

_D = PretrainConfig()


def register(sub) -> None:
    p = sub.add_parser(
        "pretrain",
        help="stage 1: pretrain a student by masked prediction of k-means units (no queries)",
        description="HuBERT-style stage 1 on an unlabelled manifest: MFCC -> k-means units -> masked "
        "prediction, optionally a second iteration on the first student's own features. Writes "
        "OUT/iter1 (and OUT/iter2) student checkpoints with their unit head, and the units in "
        "OUT/units. Finished steps are skipped and an interrupted run resumes.",
    )
    p.add_argument("--manifest", required=True, help="JSONL manifest of the unlabelled training clips")
    p.add_argument("--out", required=True, help="output folder (units cache, iter1/, iter2/)")
    p.add_argument(
        "--heldout",
        default=None,
        metavar="MANIFEST",
        help="manifest of held-out clips: print their masked-prediction accuracy next to the "
        "most-frequent-unit rate",
    )
    g = p.add_argument_group("units and masking")
    g.add_argument("--k", type=int, default=_D.k, help=f"k-means clusters (default: {_D.k})")
    g.add_argument(
        "--iterations",
        type=int,
        choices=(1, 2),
        default=_D.iterations,
        help="1: MFCC units; 2: then re-cluster a layer of the first student and train again (default: 1)",
    )
    g.add_argument(
        "--layer",
        type=int,
        default=None,
        help="iteration 2: student state clustered (0 = front end, i = after block i; default: middle)",
    )
    g.add_argument(
        "--kmeans-frames",
        type=int,
        default=_D.kmeans_frames,
        help=f"k-means is fitted on a seeded sample of about this many frames (default: {_D.kmeans_frames})",
    )
    g.add_argument(
        "--mask-prob",
        type=float,
        default=_D.mask_prob,
        help=f"chance that a frame starts a masked span (default: {_D.mask_prob})",
    )
    g.add_argument(
        "--mask-length",
        type=int,
        default=_D.mask_length,
        help=f"span length in frames at 50 Hz, scaled to the student's rate (default: {_D.mask_length})",
    )
    g.add_argument(
        "--temperature",
        type=float,
        default=_D.temperature,
        help=f"cosine-logit temperature (default: {_D.temperature})",
    )
    t = p.add_argument_group("training")
    t.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="small",
        help="student size: 'small' (~3 M params, CPU), 'distilhubert', 'tiny' (tests) (default: small)",
    )
    t.add_argument("--steps", type=int, default=_D.steps, help=f"steps per iteration (default: {_D.steps})")
    t.add_argument("--lr", type=float, default=_D.lr, help=f"AdamW peak learning rate (default: {_D.lr})")
    t.add_argument("--warmup", type=int, default=_D.warmup, help=f"warm-up steps (default: {_D.warmup})")
    t.add_argument(
        "--batch-seconds",
        type=float,
        default=_D.batch_seconds,
        help=f"cap on padded audio seconds per batch (default: {_D.batch_seconds})",
    )
    t.add_argument(
        "--crop-seconds",
        type=float,
        default=_D.crop_seconds,
        help=f"longer clips are randomly cropped to this length (default: {_D.crop_seconds})",
    )
    t.add_argument(
        "--checkpoint-every",
        type=int,
        default=_D.checkpoint_every,
        help=f"save a resumable training state every N steps (default: {_D.checkpoint_every})",
    )
    t.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda (default: cpu)")
    t.add_argument(
        "--no-resume", action="store_true", help="ignore an interrupted run's training state and start afresh"
    )
    _options.add_seed(p)
    _options.add_progress(p)
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = PretrainConfig(
        steps=args.steps,
        lr=args.lr,
        warmup=args.warmup,
        batch_seconds=args.batch_seconds,
        crop_seconds=args.crop_seconds,
        mask_prob=args.mask_prob,
        mask_length=args.mask_length,
        k=args.k,
        iterations=args.iterations,
        layer=args.layer,
        temperature=args.temperature,
        kmeans_frames=args.kmeans_frames,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        device=args.device,
    )
    progress = not args.no_progress
    pretrain(
        read_manifest(args.manifest),
        args.out,
        cfg,
        preset=args.preset,
        progress=progress,
        resume=not args.no_resume,
    )
    last = Path(args.out) / f"iter{cfg.iterations}"
    print(f"pretrained student -> {last}")
    if args.heldout:
        heldout = read_manifest(args.heldout)
        acc = checkpoint_accuracy(last, heldout, seed=cfg.seed, device=cfg.device, progress=progress)
        print(
            f"held-out masked accuracy {acc['accuracy']:.3f} vs most-frequent unit {acc['majority']:.3f} "
            f"({acc['frames']} masked frames of {len(heldout)} clips)"
        )
    return 0
