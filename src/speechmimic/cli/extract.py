"""``speechmimic extract``: select -> query -> distill in one go."""

from __future__ import annotations

import json

from speechmimic.cli import _options
from speechmimic.corpus import read_manifest
from speechmimic.extract import extract
from speechmimic.select import STRATEGIES, Budget, Scores
from speechmimic.targets import load_target


def register(sub) -> None:
    p = sub.add_parser(
        "extract",
        help="run a budgeted extraction: select, query and distill",
        description="Run a query-budgeted extraction in one go: select clips of the manifest "
        "within the budget, query the target through a ledger, distill a student; "
        "with --heldout, also measure fidelity on clips never queried. Rerun to resume.",
    )
    _options.add_target(p)
    p.add_argument("--manifest", required=True, help="the thief's candidate clips (JSONL manifest)")
    _options.add_budget(p, required=True)
    p.add_argument(
        "--strategy", choices=sorted(STRATEGIES), default="random", help="clip selection (default: random)"
    )
    p.add_argument(
        "--scores",
        default=None,
        metavar="FILE.npz",
        help="per-clip uncertainty and embeddings from 'speechmimic score', needed by informed strategies",
    )
    p.add_argument(
        "--heldout",
        default=None,
        help="manifest of held-out clips for fidelity (their answers go to a separate evaluation ledger)",
    )
    p.add_argument(
        "--out", required=True, help="output folder (selected.jsonl, ledger/, student/, result.json)"
    )
    _options.add_seed(p)
    _options.add_distill(p)
    _options.add_progress(p)
    p.set_defaults(func=run)


def run(args) -> int:
    pool = read_manifest(args.manifest)
    budget = Budget.parse(args.budget, pool_seconds=sum(c.duration for c in pool))
    result = extract(
        load_target(args.target, device=args.device),
        pool,
        args.out,
        budget,
        strategy=args.strategy,
        seed=args.seed,
        preset=args.preset,
        init=_options.init_dir(args),
        scores=Scores.load(args.scores) if args.scores else None,
        distill_cfg=_options.distill_config(args),
        heldout=read_manifest(args.heldout) if args.heldout else None,
        progress=not args.no_progress,
    )
    print(json.dumps(result, indent=2))
    return 0
