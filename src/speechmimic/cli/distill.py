"""``speechmimic distill``: train a student on the paid answers of a ledger."""

from __future__ import annotations

from speechmimic.cli import _options
from speechmimic.corpus import read_manifest
from speechmimic.distill import distill
from speechmimic.ledger import Ledger


def register(sub) -> None:
    p = sub.add_parser(
        "distill",
        help="train a student to predict every layer the target returned",
        description="Stage 2: train a student (one head per returned layer, DistilHuBERT loss) "
        "on the clips of a manifest whose answers are in the ledger. Resumes an "
        "interrupted run in the same output folder.",
    )
    p.add_argument("--manifest", required=True, help="manifest of the queried clips")
    p.add_argument("--ledger", required=True, help="ledger folder holding their paid answers")
    p.add_argument(
        "--out", required=True, help="folder for the student checkpoint (safetensors + config.json)"
    )
    _options.add_seed(p)
    _options.add_distill(p)
    _options.add_progress(p)
    p.set_defaults(func=run)


def run(args) -> int:
    student = distill(
        read_manifest(args.manifest),
        Ledger(args.ledger),
        args.out,
        _options.distill_config(args),
        preset=args.preset,
        init=_options.init_dir(args),
        resume=not args.no_resume,
        progress=not args.no_progress,
    )
    print(f"student ({student.num_params / 1e6:.2f} M params) -> {args.out}")
    return 0
