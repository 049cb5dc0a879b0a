"""``speechmimic select``: choose the clips to query within a budget."""

from __future__ import annotations

from speechmimic.cli import _options
from speechmimic.corpus import read_manifest, write_manifest
from speechmimic.select import STRATEGIES, Budget, select


def register(sub) -> None:
    p = sub.add_parser(
        "select",
        help="choose which clips of a manifest to query, within a budget",
        description="Choose the clips of a manifest to send to the target, within a budget, "
        "and write them as a manifest in query order.",
    )
    p.add_argument("--manifest", required=True, help="JSONL manifest of the thief's candidate clips")
    _options.add_budget(p, required=True)
    p.add_argument(
        "--strategy",
        choices=sorted(STRATEGIES),
        default="random",
        help="how clips are ranked before the budget is applied (default: random)",
    )
    _options.add_seed(p)
    p.add_argument("--out", required=True, help="manifest of the chosen clips to write")
    p.set_defaults(func=run)


def run(args) -> int:
    clips = read_manifest(args.manifest)
    budget = Budget.parse(args.budget, pool_seconds=sum(c.duration for c in clips))
    chosen = select(clips, budget, strategy=args.strategy, seed=args.seed)
    write_manifest(chosen, args.out)
    print(
        f"selected {len(chosen)} of {len(clips)} clips, {sum(c.duration for c in chosen):.1f} s -> {args.out}"
    )
    return 0
