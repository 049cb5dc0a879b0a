"""``speechmimic pretrain``: stage 1, HuBERT-style masked prediction on unlabelled audio."""

from __future__ import annotations

from pathlib import Path

from speechmimic import config
from speechmimic.cli import _options
from speechmimic.corpus import read_manifest
from speechmimic.pretrain import PretrainConfig, pretrain
from speechmimic.score import checkpoint_accuracy
from speechmimic.trainer import TrainConfig

# The fields of PretrainConfig that are stage 1's own (the rest are the training loop's).
_UNIT_FIELDS = tuple(
    f for f in PretrainConfig.__dataclass_fields__ if f not in TrainConfig.__dataclass_fields__
)


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
    _options.add_config_flags(p.add_argument_group("units and masking"), PretrainConfig, only=_UNIT_FIELDS)
    t = p.add_argument_group("training")
    _options.add_config_flags(t, PretrainConfig, skip=_UNIT_FIELDS)
    _options.add_preset(t)
    _options.add_resume(t)
    _options.add_config_file(p, "stage-1")
    _options.add_progress(p)
    p.set_defaults(func=run)


def run(args) -> int:
    values = {**_options.file_settings(args), **_options.given(args, PretrainConfig)}
    cfg = config.from_dict(PretrainConfig, values)
    if args.print_config:
        return _options.print_config(cfg)
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
