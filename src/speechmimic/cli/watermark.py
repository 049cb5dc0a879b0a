"""``speechmimic watermark mark|verify``: mark an encoder so stolen copies carry the mark; test a suspect."""

from __future__ import annotations

import json

from speechmimic.cli import _options
from speechmimic.corpus import read_manifest
from speechmimic.upstream import load_upstream


def register(sub) -> None:
    p = sub.add_parser(
        "watermark",
        help="mark your encoder so copies stolen from it carry the mark; test a suspect for it",
        description="mark: fine-tune an encoder (hf:... or resemblyzer) on your clips so that clips "
        "carrying a secret audio trigger decode, through a secret decoder, to a secret key, while its "
        "answers to ordinary clips stay close to the original's; shadow thieves distilled meanwhile "
        "teach the mark to survive extraction. The secret is saved apart from the model. "
        "verify: mix the trigger into clips, ask the suspect, and report the share of clips that "
        "decode to the key, its p-value under the null of a model made without the secret, and a verdict.",
    )
    sub2 = p.add_subparsers(
        dest="action",
        metavar="ACTION",
        required=True,
        help="mark (your encoder; 'embed' is another name for it) or verify (test a suspect)",
    )

    e = sub2.add_parser(
        "mark",
        aliases=["embed"],  # its name before 'mark'
        help="fine-tune an encoder to carry a watermark",
        description="Fine-tune --target on your clips so that it carries a watermark; write the marked "
        "weights to --out and the secret to --secret (keep it apart: it proves ownership).",
    )
    _options.add_target(e)
    e.add_argument("--manifest", required=True, help="your own clips to fine-tune on (a corpus manifest)")
    e.add_argument("--out", required=True, metavar="DIR", help="folder for the marked weights")
    e.add_argument(
        "--secret", required=True, metavar="FILE", help="where the secret goes (.npz; not inside --out)"
    )
    from speechmimic.proof.watermark import WatermarkConfig

    _options.add_config_flags(e.add_argument_group("watermark settings"), WatermarkConfig)
    _options.add_resume(e)
    _options.add_progress(e)
    e.set_defaults(func=run_mark)

    v = sub2.add_parser(
        "verify",
        help="test a suspect upstream (a student, a target spec, an HTTP API)",
        description="Ask the suspect each clip as it is and with the secret trigger; report the share of "
        "clips whose decoded reaction is close to the key, its p-value and a verdict.",
    )
    v.add_argument("--secret", required=True, metavar="FILE", help="the secret written by 'mark'")
    v.add_argument(
        "--suspect",
        required=True,
        metavar="SPEC_OR_DIR",
        help="a student folder, a target spec (hf:..., resemblyzer?..., http://host:port)",
    )
    v.add_argument("--manifest", required=True, help="clips to mix the trigger into (any speech)")
    v.add_argument("--clips", type=int, default=64, help="use the first N clips of the manifest (default 64)")
    v.add_argument(
        "--alpha", type=float, default=0.01, help="p-value below which the mark is found (default 0.01)"
    )
    _options.add_target_ledger(v, "--suspect")
    v.add_argument("--out", default=None, metavar="FILE", help="JSON file to write (default: print only)")
    _options.add_progress(v)
    v.set_defaults(func=run_verify)


def run_mark(args) -> int:
    from speechmimic.proof.watermark import WatermarkConfig, mark

    cfg = WatermarkConfig(**_options.given(args, WatermarkConfig))
    wavs = [c.load() for c in read_manifest(args.manifest)]
    summary = mark(
        args.target,
        wavs,
        args.out,
        args.secret,
        cfg,
        progress=not args.no_progress,
        resume=not args.no_resume,
    )
    print(json.dumps(summary, indent=2))
    print(f"marked encoder: {summary['marked']}")
    return 0


def run_verify(args) -> int:
    from speechmimic.proof.watermark import Secret, verify

    secret = Secret.load(args.secret)
    wavs = [c.load() for c in read_manifest(args.manifest)[: args.clips]]
    upstream = load_upstream(args.suspect, ledger=args.ledger)
    result = {"suspect": args.suspect, **verify(upstream, secret, wavs, args.alpha, not args.no_progress)}
    _options.print_json(result, args.out)
    return 0
