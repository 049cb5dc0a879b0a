"""``speechmimic query``: pay for the target's answers to a manifest, through the ledger."""

from __future__ import annotations

import json

from speechmimic.budget import Budget
from speechmimic.cli import _options
from speechmimic.corpus import read_manifest
from speechmimic.ledger import Ledger, query_clips
from speechmimic.targets import load_target


def register(sub) -> None:
    p = sub.add_parser(
        "query",
        help="send clips to the target and store the answers in a crash-safe ledger",
        description="Send the clips of a manifest to the target and store every answer in the "
        "ledger. Already paid clips (by id or identical audio) are never sent again; "
        "after a crash, rerun the same command to resume.",
    )
    _options.add_target(p)
    p.add_argument(
        "--manifest", required=True, help="JSONL manifest of the clips to query (e.g. from select)"
    )
    p.add_argument("--ledger", required=True, help="ledger folder (created if absent)")
    p.add_argument(
        "--budget",
        default=None,
        metavar="B",
        help="lifetime cap of the ledger: N clips or Ns/Nm/Nh of audio (default: no cap)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="clips per request to the target (default: 8)")
    _options.add_device(p)
    _options.add_progress(p)
    p.set_defaults(func=run)


def run(args) -> int:
    budget = Budget.parse(args.budget) if args.budget else Budget()
    ledger = Ledger(args.ledger, budget)
    if ledger.in_doubt:
        print(f"{len(ledger.in_doubt)} clips were in flight when the last run stopped; sending them again")
    target = load_target(args.target, device=args.device)
    stats = query_clips(
        target,
        read_manifest(args.manifest),
        ledger,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    print(json.dumps(stats, indent=2))
    return 0
