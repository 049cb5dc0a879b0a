"""``speechmimic watermark mark|fingerprint|verify``: mark what an API answers so stolen copies carry the
mark (or fine-tune a family fingerprint into an encoder); test a suspect."""

from __future__ import annotations

import json

from speechmimic.cli import _options
from speechmimic.corpus import read_manifest
from speechmimic.upstream import load_upstream


def register(sub) -> None:
    p = sub.add_parser(
        "watermark",
        help="mark what your API answers so copies stolen from it carry the mark; test a suspect for it",
        description="mark: draw a secret for an answer watermark (a secret frequency band, a secret key "
        "direction); the API served as 'SPEC|mark?secret=FILE' nudges its answers toward the key where a "
        "clip carries energy in the band, and copies learn the nudge from clean queries. Exclusive: the "
        "unmarked original and its copies do not carry it. fingerprint: fine-tune an encoder so that copies "
        "of it react to a secret trigger (SSLGuard's recipe); copies of the unmarked original react too, so "
        "it says 'derived from this model family'. verify: test a suspect against either secret; the "
        "report gives a p-value under the null of a model made without the secret, and a verdict.",
    )
    sub2 = p.add_subparsers(
        dest="action",
        metavar="ACTION",
        required=True,
        help="mark (a secret for the served answer watermark), fingerprint (fine-tune a family "
        "fingerprint into an encoder; 'embed' is another name for it) or verify (test a suspect)",
    )

    m = sub2.add_parser(
        "mark",
        help="draw the secret of an answer watermark for an API",
        description="Draw a secret band and key for --target from your clips and write it to --secret; "
        "then serve 'SPEC|mark?secret=FILE' (speechmimic serve --target ...). Keep the file: it proves "
        "ownership. See docs/defences.md.",
    )
    _options.add_target(m)
    m.add_argument("--manifest", required=True, help="your own clips, to calibrate the band's quantiles")
    m.add_argument("--secret", required=True, metavar="FILE", help="where the secret goes (.npz)")
    from speechmimic.defences.mark import MarkConfig

    _options.add_config_flags(m.add_argument_group("answer mark settings"), MarkConfig)
    m.set_defaults(func=run_mark)

    e = sub2.add_parser(
        "fingerprint",
        aliases=["embed"],  # its name before 'fingerprint'
        help="fine-tune an encoder to carry a family fingerprint",
        description="Fine-tune --target on your clips so that it and copies of it react to a secret "
        "trigger; write the fine-tuned weights to --out and the secret to --secret (keep it apart).",
    )
    _options.add_target(e)
    e.add_argument("--manifest", required=True, help="your own clips to fine-tune on (a corpus manifest)")
    e.add_argument("--out", required=True, metavar="DIR", help="folder for the fine-tuned weights")
    e.add_argument(
        "--secret", required=True, metavar="FILE", help="where the secret goes (.npz; not inside --out)"
    )
    from speechmimic.proof.watermark import WatermarkConfig

    _options.add_config_flags(e.add_argument_group("fingerprint settings"), WatermarkConfig)
    _options.add_resume(e)
    _options.add_progress(e)
    e.set_defaults(func=run_fingerprint)

    v = sub2.add_parser(
        "verify",
        help="test a suspect upstream (a student, a target spec, an HTTP API)",
        description="Ask the suspect each clip as it is and with the secret's trigger; report how far its "
        "reactions lean toward the secret key, the p-value and a verdict.",
    )
    v.add_argument(
        "--secret", required=True, metavar="FILE", help="the secret written by 'mark' or 'fingerprint'"
    )
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
    from speechmimic.defences import load_target
    from speechmimic.defences.mark import MarkConfig, make_secret

    cfg = MarkConfig(**_options.given(args, MarkConfig))
    wavs = [c.load() for c in read_manifest(args.manifest)]
    secret = make_secret(load_target(args.target), wavs, cfg)
    path = secret.save(args.secret)
    lo, hi = secret.band
    print(f"secret: {path} (band {lo:.0f}-{hi:.0f} Hz, {len(secret.key)} dimensions)")
    print(f"serve the marked API as: {args.target}|mark?secret={path}")
    return 0


def run_fingerprint(args) -> int:
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
    print(f"fingerprinted encoder: {summary['marked']}")
    return 0


def run_verify(args) -> int:
    from speechmimic.proof import load_secret, verify_any

    secret = load_secret(args.secret)
    wavs = [c.load() for c in read_manifest(args.manifest)[: args.clips]]
    upstream = load_upstream(args.suspect, ledger=args.ledger)
    found = verify_any(upstream, secret, wavs, alpha=args.alpha, progress=not args.no_progress)
    result = {"suspect": args.suspect, **found}
    _options.print_json(result, args.out)
    return 0
