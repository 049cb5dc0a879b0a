"""``speechmimic query``: pay for the target's answers to a manifest, through the ledger."""

from __future__ import annotations

import argparse
import json

import torch

from speechmimic.budget import Budget
from speechmimic.cli import _options
from speechmimic.corpus import read_manifest
from speechmimic.defences import load_target
from speechmimic.ledger import Ledger, query_clips
from speechmimic.targets.pool import PooledTarget


def register(sub) -> None:
    p = sub.add_parser(
        "query",
        help="send clips to the target and store the answers in a crash-safe ledger",
        description="Send the clips of a manifest to the target and store every answer in the "
        "ledger. Already paid clips (by id or identical audio) are never sent again; "
        "after a crash, rerun the same command to resume. One process writes a ledger at a time: "
        "a second query on the same ledger waits for the first, then pays only what is still missing.",
    )
    _options.add_target(p)
    p.add_argument(
        "--manifest", required=True, help="JSONL manifest of the clips to query (e.g. from select)"
    )
    p.add_argument("--ledger", required=True, help="ledger folder (created if absent)")
    p.add_argument(
        "--budget",
        default=None,
        type=_options.budget_text,
        metavar="B",
        help="lifetime cap of the ledger: N clips or Ns/Nm/Nh of audio (default: no cap)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="clips per request to the target (default: 8)")
    p.add_argument(
        "--repair",
        action="store_true",
        help="first check the stored answers of the manifest's clips against their digests and buy "
        "the damaged or missing ones again",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="ask a local target from N processes at once, each with its own copy of the model "
        "(one ledger and one writer still: a clip is paid once; default 1)",
    )
    p.add_argument(
        "--shard",
        type=_shard,
        default=None,
        metavar="I/N",
        help="pay only shard I of N of the manifest (by content, so shards never overlap), e.g. 0/4 "
        "on one machine and 1/4 on another, each into its own ledger; join them with 'speechmimic "
        "ledger merge'. --budget then caps this shard's ledger: bound the total by selecting within it",
    )
    _options.add_store(p)
    _options.add_device(p)
    _options.add_progress(p)
    p.set_defaults(func=run)


def _shard(text: str) -> tuple[int, int]:
    i, sep, n = text.partition("/")
    try:
        shard = (int(i), int(n))
    except ValueError:
        shard = None
    if not sep or shard is None or not 0 <= shard[0] < shard[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return shard


def run(args) -> int:
    budget = Budget.parse(args.budget) if args.budget else Budget()
    ledger = Ledger(args.ledger, budget, store=args.store)
    if ledger.in_doubt:
        print(f"{len(ledger.in_doubt)} clips were in flight when the last run stopped; sending them again")
    if args.workers > 1:
        threads = max(1, torch.get_num_threads() // args.workers)
        target = PooledTarget(args.target, args.workers, device=args.device, threads=threads)
    else:
        target = load_target(args.target, device=args.device)
    clips = read_manifest(args.manifest)
    if args.repair:
        keys = [k for k in (ledger.key_of(c.id) for c in clips) if k is not None]
        dropped = ledger.repair(keys)
        print(f"checked {len(keys)} stored answers: {len(dropped)} damaged or missing, bought again below")
    stats = query_clips(
        target,
        clips,
        ledger,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        shard=args.shard,
    )
    if args.workers > 1:
        target.close()
    print(json.dumps(stats, indent=2))
    return 0
