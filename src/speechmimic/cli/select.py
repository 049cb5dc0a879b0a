"""``speechmimic select``: choose the clips to query within a budget."""

from __future__ import annotations

from speechmimic.cli import _options
from speechmimic.corpus import write_manifest
from speechmimic.score import Scores
from speechmimic.select import STRATEGIES, select_from_manifest


def register(sub) -> None:
    p = sub.add_parser(
        "select",
        help="choose which clips of a manifest to query, within a budget",
        description="Choose the clips of a manifest to send to the target, within a budget, "
        "and write them as a manifest in query order; each clip gets labels.selection = "
        "{strategy, rank, score}. Informed strategies read per-clip scores from 'speechmimic score' "
        "(stage 1).",
    )
    p.add_argument("--manifest", required=True, help="JSONL manifest of the thief's candidate clips")
    _options.add_budget(p, required=True)
    p.add_argument(
        "--strategy",
        choices=sorted(STRATEGIES),
        default="random",
        help="how clips are ranked before the budget is applied: "
        + "; ".join(s.describe() for s in STRATEGIES.values())
        + " (default: random)",
    )
    p.add_argument(
        "--scores",
        metavar="FILE.npz",
        default=None,
        help="per-clip scores written by 'speechmimic score' with the stage-1 student: 'uncertainty' "
        "(for uncertainty, hybrid) and/or 'embeddings' (for diversity, cluster, hybrid); "
        "must cover every clip of the manifest",
    )
    _options.add_seed(p)
    p.add_argument("--out", required=True, help="manifest of the chosen clips to write, in query order")
    p.set_defaults(func=run)


def run(args) -> int:
    scores = Scores.load(args.scores) if args.scores else None
    chosen, pool_clips, pool_seconds = select_from_manifest(
        args.manifest, args.budget, strategy=args.strategy, seed=args.seed, scores=scores
    )
    write_manifest(chosen, args.out)
    seconds = sum(c.duration for c in chosen)
    values = [c.labels["selection"]["score"] for c in chosen]
    values = [v for v in values if v is not None]
    meaning = STRATEGIES[args.strategy].score
    score = f"; {meaning} {min(values):.4g} .. {max(values):.4g}" if meaning and values else ""
    print(
        f"selected {len(chosen)} of {pool_clips} clips, {seconds:.1f} of {pool_seconds:.1f} s "
        f"(strategy {args.strategy}{score}) -> {args.out}"
    )
    return 0
