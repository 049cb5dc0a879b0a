"""``speechmimic compress``: distil your own encoder, the teacher answering online (no ledger)."""

from __future__ import annotations

from speechmimic import config
from speechmimic.cli import _options
from speechmimic.compress import CompressConfig, compress
from speechmimic.corpus import read_manifest
from speechmimic.targets import load_backend


def register(sub) -> None:
    p = sub.add_parser(
        "compress",
        help="white-box: distil your own encoder into a small student (no queries, no ledger)",
        description="Train a student to predict the teacher's layers (named in its spec, e.g. "
        "'hf:DIR?layers=4,8,12') on the clips of a manifest, the teacher running on every batch. "
        "--shape distilhubert takes the teacher's CNN, width and first layers, starting from its "
        "weights; fithubert is thin and deep (5/8 of the width, all the depth, the CNN copied); "
        "preset builds --preset. Same loss, loop, checkpoints, resume and torchrun support as distill.",
    )
    p.add_argument(
        "--teacher", required=True, help="the encoder to compress: a target spec (hf:DIR?layers=...)"
    )
    p.add_argument("--manifest", required=True, help="manifest of the training clips")
    p.add_argument("--out", required=True, help="folder for the student checkpoint")
    g = p.add_argument_group("compression (stage 2 training, teacher online)")
    _options.add_config_flags(g, CompressConfig)
    _options.add_preset(g)
    _options.add_resume(g)
    _options.add_config_file(p, "compression")
    _options.add_progress(p)
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = config.from_dict(
        CompressConfig, {**_options.file_settings(args), **_options.given(args, CompressConfig)}
    )
    if args.print_config:
        return _options.print_config(cfg)
    student = compress(
        read_manifest(args.manifest),
        load_backend(args.teacher, device=cfg.device),
        args.out,
        cfg,
        preset=args.preset,
        resume=not args.no_resume,
        progress=not args.no_progress,
    )
    print(f"student ({student.num_params / 1e6:.2f} M params) -> {args.out}")
    return 0
