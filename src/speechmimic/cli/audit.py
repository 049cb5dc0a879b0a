"""``speechmimic audit``: what a query budget leaks, what each defence costs, who gets caught."""

from __future__ import annotations

from speechmimic import config
from speechmimic.cli import _options
from speechmimic.errors import InputError


def register(sub) -> None:
    from speechmimic.audit.grid import AuditConfig
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
    _options.add_config_flags(p.add_argument_group("audit settings"), AuditConfig, skip=("defences",))
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
    _options.add_config_file(p, "audit")
    _options.add_progress(p)
    p.set_defaults(func=run)


def _defences(items: list[str]) -> dict[str, str] | None:
    if not items:
        return None
    out = {}
    for item in items:
        name, eq, chain = item.partition("=")
        if not eq or not name:
            raise InputError(f"--defence {item!r}: expected NAME=CHAIN, e.g. noise=noise?snr=10")
        if name in out:
            raise InputError(f"--defence {name!r} given twice")
        out[name] = chain
    return out


def run(args) -> int:
    from speechmimic.audit import run_audit
    from speechmimic.audit.grid import AuditConfig

    values = {**_options.file_settings(args), **_options.given(args, AuditConfig)}
    if args.defence:
        values["defences"] = _defences(args.defence)
    cfg = config.from_dict(AuditConfig, values)
    if args.print_config:
        return _options.print_config(cfg)
    summary = run_audit(args.out, cfg, progress=not args.no_progress)
    for verdict in summary["verdicts"]:
        print(verdict)
    print(
        f"wrote {summary['paths']['md']} and {summary['paths']['json']} ({summary['setup']['seconds']:.0f} s)"
    )
    return 0
