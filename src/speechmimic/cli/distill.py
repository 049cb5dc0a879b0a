"""``speechmimic distill``: train a student on the paid answers of a ledger."""

from __future__ import annotations

from speechmimic import config
from speechmimic.cli import _options
from speechmimic.corpus import read_manifest
from speechmimic.distill import DistillConfig, distill
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
        "--unpaid",
        metavar="MANIFEST",
        help="manifest of clips not queried, for the masked-prediction term (--masked-weight)",
    )
    p.add_argument(
        "--out", required=True, help="folder for the student checkpoint (safetensors + config.json)"
    )
    g = p.add_argument_group("distillation (stage 2 training)")
    _options.add_config_flags(g, DistillConfig)
    _options.add_preset(g)
    _options.add_stage1(g)
    _options.add_from_scratch(g)
    _options.add_resume(g)
    _options.add_config_file(p, "stage-2 training")
    _options.add_progress(p)
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = config.from_dict(
        DistillConfig, {**_options.file_settings(args), **_options.given(args, DistillConfig)}
    )
    if args.print_config:
        return _options.print_config(cfg)
    student = distill(
        read_manifest(args.manifest),
        Ledger(args.ledger),
        args.out,
        cfg,
        preset=args.preset,
        init=None if args.from_scratch else args.init,
        resume=not args.no_resume,
        progress=not args.no_progress,
        unpaid=read_manifest(args.unpaid) if args.unpaid else None,
    )
    print(f"student ({student.num_params / 1e6:.2f} M params) -> {args.out}")
    return 0
