"""``speechmimic audit``: what a query budget leaks, what each defence costs, who gets caught."""

from __future__ import annotations

from speechmimic.cli import _options


def register(sub) -> None:
    from speechmimic.audit import DEFAULT_ATTACKERS, DEFAULT_BUDGETS, DEFAULT_TARGET
    from speechmimic.audit.grid import ATTACKERS
    from speechmimic.defences import DEFENCES

    p = sub.add_parser(
        "audit",
        help="for an API owner: per budget, defence and attacker, what a thief recovers, what honest "
        "applications pay, and whether the detector notices",
        description="Run every budget x defence x attacker as a real extraction (random selection, "
        "stage 2 from scratch, a fresh set of API keys on a fresh defence state each), probe the "
        "target, each stolen student and MFCC, price every defence on the traffic of honest "
        "applications (a keyword-spotting app, a speaker-verification service), and test the "
        "detector on both. Writes OUT/report.md (tables, plots), OUT/report.json (every number) and "
        "caches each step under OUT: rerun to resume. With nothing but --out it runs a CPU-sized "
        "grid on the corpus shipped in the package against resemblyzer.",
    )
    p.add_argument("--out", required=True, help="output folder (cells/, benign/, report.md, report.json)")
    p.add_argument("--target", default=DEFAULT_TARGET, help=f"target spec (default: {DEFAULT_TARGET})")
    p.add_argument(
        "--corpus",
        default="demo",
        help="'demo' (the corpus shipped in the package) or a folder laid out as ../shared/data "
        "(FSDD, the LibriSpeech subset, Speech Commands) (default: demo)",
    )
    budgets = ",".join(DEFAULT_BUDGETS)
    p.add_argument(
        "--budgets",
        default=budgets,
        help="comma list of budgets: N%%, N clips or Ns/Nm (default: " + budgets.replace("%", "%%") + ")",
    )
    p.add_argument(
        "--defence",
        action="append",
        default=[],
        metavar="NAME=CHAIN",
        help="a defence to audit, as a chain written after the target (e.g. noise=noise?snr=10, "
        "both=transform|b4b?calibration={calibration}); repeat for more; '{calibration}' is replaced "
        "by the owner's statistics of held-out answers; defences: "
        f"{', '.join(sorted(DEFENCES))}. Default: none, noise, transform, b4b, prada (refusing flagged "
        "keys), a quota as large as the largest honest application's traffic; "
        "'none' is always added",
    )
    p.add_argument(
        "--attackers",
        default=",".join(DEFAULT_ATTACKERS),
        help=f"comma list of {', '.join(ATTACKERS)} (default: {','.join(DEFAULT_ATTACKERS)}): sybils pool 4 "
        "keys through 8 anchor clips, augment trains on augmented views of half the clips",
    )
    p.add_argument("--steps", type=int, default=100, help="stage-2 steps of every thief (default: 100)")
    p.add_argument("--preset", default="small", help="student preset (default: small)")
    p.add_argument(
        "--streams", type=int, default=8, help="honest streams per application for the detector (default: 8)"
    )
    p.add_argument(
        "--http",
        action="store_true",
        help="thieves pay over the wire: each defence served by 'speechmimic serve' on a loopback port "
        "(OUT/servers), each thief key an API key there; the report adds what the server charged",
    )
    p.add_argument(
        "--secret",
        default=None,
        metavar="FILE",
        help="the watermark secret of --target (from 'speechmimic watermark embed'): every stolen copy is "
        "tested for the mark and by dataset inference, and the report adds what the mark costs on the probes",
    )
    p.add_argument(
        "--proof", action="store_true", help="dataset inference on every stolen copy (implied by --secret)"
    )
    _options.add_seed(p)
    _options.add_progress(p)
    p.set_defaults(func=run)


def _defences(items: list[str]) -> dict[str, str] | None:
    if not items:
        return None
    out = {}
    for item in items:
        name, eq, chain = item.partition("=")
        if not eq or not name:
            raise ValueError(f"--defence {item!r}: expected NAME=CHAIN, e.g. noise=noise?snr=10")
        if name in out:
            raise ValueError(f"--defence {name!r} given twice")
        out[name] = chain
    return out


def run(args) -> int:
    from speechmimic.audit import run_audit

    summary = run_audit(
        args.out,
        target=args.target,
        corpus=args.corpus,
        budgets=tuple(b.strip() for b in args.budgets.split(",") if b.strip()),
        defences=_defences(args.defence),
        attackers=tuple(a.strip() for a in args.attackers.split(",") if a.strip()),
        steps=args.steps,
        seed=args.seed,
        preset=args.preset,
        streams=args.streams,
        progress=not args.no_progress,
        http=args.http,
        secret=args.secret,
        proof=args.proof,
    )
    for verdict in summary["verdicts"]:
        print(verdict)
    print(
        f"wrote {summary['paths']['md']} and {summary['paths']['json']} ({summary['setup']['seconds']:.0f} s)"
    )
    return 0
