"""``speechmimic ledger``: check a ledger's answers against their digests, and what it holds."""

from __future__ import annotations

import json
from pathlib import Path

from speechmimic.cli import _options
from speechmimic.ledger import Ledger

MAX_LISTED = 20


def register(subparsers) -> None:
    ledger = subparsers.add_parser(
        "ledger",
        help="check a ledger of paid answers (verify), say what it holds (stats), join shards (merge)",
        description="Inspect, check or join ledgers of paid answers without paying anything.",
    )
    sub = ledger.add_subparsers(
        dest="ledger_command", metavar="COMMAND", required=True, help="what to do with the ledger"
    )
    p = sub.add_parser(
        "verify",
        help="check every stored answer against the digest recorded when it was paid",
        description="Check every answer of a ledger against the digest recorded when it was paid, and "
        "the ledger's files: damaged or missing answers, answers a killed writer never indexed, its "
        "leftover temporary files, a torn last index line. Exits 1 when an answer is damaged or "
        "missing (0 after --drop).",
    )
    p.add_argument("dir", metavar="DIR", help="the ledger folder")
    p.add_argument(
        "--drop",
        action="store_true",
        help="move damaged and missing answers aside (DIR/damaged) so the next query buys them again",
    )
    _options.add_progress(p)
    p.set_defaults(func=run_verify)
    s = sub.add_parser(
        "stats",
        help="answers, seconds, bytes, payments, target and first/last payment of a ledger",
        description="Print, as JSON, what a ledger holds and what it has spent: its target, answers "
        "and their seconds, bytes on disk, payments (an answer bought twice counts twice), clips in "
        "doubt and dropped, first and last payment.",
    )
    s.add_argument("dir", metavar="DIR", help="the ledger folder")
    s.set_defaults(func=run_stats)
    m = sub.add_parser(
        "merge",
        help="join ledgers of one target (e.g. the shards of 'query --shard') into one",
        description="Copy the answers of each SHARD ledger into the ledger INTO (created if absent), each "
        "verified against its digest and written crash-safely: a killed merge loses nothing and a "
        "rerun copies only what is missing. Every shard must hold answers of the same target, layers "
        "and storage. An answer two shards both paid for is kept once and both payments stay counted. "
        "Exits 1 if an answer is damaged (it is left out: buy it again with 'query --repair').",
    )
    m.add_argument("shards", nargs="+", metavar="SHARD", help="ledger folders to merge")
    m.add_argument("--into", required=True, metavar="INTO", help="the ledger folder to merge into")
    _options.add_progress(m)
    m.set_defaults(func=run_merge)


def _existing(path: str) -> Ledger:
    # Checked before opening: opening a ledger creates its folder, and a mistyped path should not.
    root = Path(path)
    if not (root / "ledger.json").is_file() and not (root / "index.jsonl").is_file():
        raise FileNotFoundError(f"{path} holds no ledger (no ledger.json, no index.jsonl)")
    return Ledger(root)


def run_verify(args) -> int:
    ledger = _existing(args.dir)
    report = ledger.verify(progress=not args.no_progress)
    bad = report.damaged + report.missing
    for label, rows in (("damaged", report.damaged), ("missing", report.missing)):
        for clip_id, key, reason in rows[:MAX_LISTED]:
            print(f"{label}: clip {clip_id} (key {key}): {reason}")
        if len(rows) > MAX_LISTED:
            print(f"... and {len(rows) - MAX_LISTED} more {label}")
    if report.unindexed:
        print(f"{len(report.unindexed)} answers a killed writer never indexed (the next writer indexes them)")
    if report.leftovers:
        print(f"{len(report.leftovers)} temporary files of killed writers (the next writer removes them)")
    if report.torn_tail:
        print("the index ends in a torn line (the next writer cuts it)")
    if report.unverified:
        print(f"{len(report.unverified)} answers were paid before digests were recorded: not verifiable")
    print(f"checked {report.checked} answers: {len(report.damaged)} damaged, {len(report.missing)} missing")
    if bad and args.drop:
        dropped = ledger.drop([key for _, key, _ in bad])
        print(f"dropped {len(dropped)} answers to {ledger.root / 'damaged'}: the next query buys them again")
        return 0
    return 1 if bad else 0


def run_merge(args) -> int:
    into = Ledger(args.into)
    bad = 0
    for path in args.shards:
        result = into.merge(_existing(path), progress=not args.no_progress)
        print(
            f"{path}: {result['merged']} answers merged, {result['already_here']} already here, "
            f"{result['paid_twice']} paid twice (kept once, both payments counted), "
            f"{len(result['damaged'])} damaged (left out)"
        )
        for clip_id, key, reason in result["damaged"][:MAX_LISTED]:
            print(f"  damaged: clip {clip_id} (key {key}): {reason}")
        if result["in_doubt"]:
            print(
                f"  {result['in_doubt']} clips of {path} were sent and never answered: rerun that shard's "
                "query to finish it, then merge again"
            )
        bad += len(result["damaged"])
    s = into.summary()
    print(f"{args.into}: {len(into)} answers, {s['paid_clips']} payments, {s['paid_seconds']} s paid")
    return 1 if bad else 0


def run_stats(args) -> int:
    print(json.dumps(_existing(args.dir).stats(), indent=2))
    return 0
