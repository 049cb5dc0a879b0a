"""``speechmimic fidelity``: how close a student is to the target on held-out clips."""

from __future__ import annotations

from speechmimic.cli import _options
from speechmimic.corpus import read_manifest
from speechmimic.defences import load_target
from speechmimic.fidelity import heldout_fidelity
from speechmimic.ledger import Ledger
from speechmimic.student import Student


def register(sub) -> None:
    p = sub.add_parser(
        "fidelity",
        help="per-layer cosine, L1 and r2 of a student against the target",
        description="Measure, per returned layer, mean frame cosine, L1 and explained variance r2 "
        "(against the mean target frame of the queried clips) of a student's "
        "predictions on held-out clips, and the cosine of the constant mean frame.",
    )
    p.add_argument("--student", required=True, help="extracted student folder")
    _options.add_target(p)
    p.add_argument("--manifest", required=True, help="held-out clips (never queried by the attack)")
    p.add_argument(
        "--eval-ledger", required=True, help="ledger folder for the target's answers to held-out clips"
    )
    p.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    _options.add_chunk_seconds(p)
    _options.add_progress(p)
    p.set_defaults(func=run)


def run(args) -> int:
    student, _ = Student.load(args.student)
    result = heldout_fidelity(
        student,
        load_target(args.target),
        read_manifest(args.manifest),
        Ledger(args.eval_ledger),
        progress=not args.no_progress,
        chunk_seconds=args.chunk_seconds,
    )
    _options.print_json(result, args.out)
    return 0
