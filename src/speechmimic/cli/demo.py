"""``speechmimic demo``: a whole extraction of a real pretrained encoder, on the shipped corpus."""

from __future__ import annotations

from speechmimic.cli import _options
from speechmimic.demo import DEMO_TARGET


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="extract resemblyzer's real speaker encoder on the shipped corpus (about 5 min on 2 CPU cores)",
        description="Run a complete, query-budgeted extraction of a real pretrained encoder "
        "(resemblyzer's GE2E, all three LSTM layers returned) using the synthetic "
        "corpus shipped in the package: stage 2 at each budget, held-out fidelity, "
        "report.json, report.md and a plot in --out. Rerun to resume.",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--budgets",
        default="10%,100%",
        help="comma list of budgets: N%% of the pool's seconds, N clips or Ns/Nm (default: 10%%,100%%)",
    )
    p.add_argument(
        "--steps", type=int, default=350, help="training steps per budget, equal for all (default: 350)"
    )
    p.add_argument("--preset", default="small", help="student preset (default: small)")
    p.add_argument(
        "--no-probes",
        action="store_true",
        help="skip the downstream probes (keywords, speaker ID) on held-out clips",
    )
    p.add_argument("--target", default=DEMO_TARGET, help=f"target spec (default: {DEMO_TARGET})")
    p.add_argument(
        "--http",
        action="store_true",
        help="attack over the wire: serve the target with 'speechmimic serve' on a free loopback port "
        "(OUT/server) and pay through an http:// target; the report adds the server's charges beside "
        "the ledgers' payments",
    )
    _options.add_seed(p)
    _options.add_progress(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from speechmimic.demo import run_demo

    run_demo(
        args.out,
        budgets=tuple(b.strip() for b in args.budgets.split(",")),
        steps=args.steps,
        seed=args.seed,
        preset=args.preset,
        target_spec=args.target,
        probes=not args.no_probes,
        progress=not args.no_progress,
        http=args.http,
    )
    return 0
