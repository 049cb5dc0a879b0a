"""``speechmimic dataset-inference``: is a suspect more at home on your private clips than on public ones?"""

from __future__ import annotations

from speechmimic.cli import _options
from speechmimic.corpus import read_manifest
from speechmimic.upstream import load_upstream


def register(sub) -> None:
    p = sub.add_parser(
        "dataset-inference",
        help="test whether a suspect encoder derives from one trained on your private clips",
        description="Fit a density (PCA + Gaussian mixture) to the suspect's pooled, L2-normalised "
        "representations of half of your private clips; a one-sided Welch t-test asks whether the other "
        "half is likelier under it than public clips of the same kind. Needs no change to any model; "
        "private and public clips must be drawn alike (same sources and lengths).",
    )
    p.add_argument(
        "--suspect", required=True, metavar="SPEC_OR_DIR", help="a student folder or a target spec"
    )
    p.add_argument(
        "--private", required=True, metavar="MANIFEST", help="clips the owner's encoder was trained on"
    )
    p.add_argument("--public", required=True, metavar="MANIFEST", help="clips of the same kind it never saw")
    p.add_argument(
        "--layers", default=None, help="comma-separated layers to read (default: all the suspect returns)"
    )
    p.add_argument("--components", type=int, default=4, help="Gaussian mixture components (default 4)")
    p.add_argument("--dims", type=int, default=16, help="PCA dimensions before the mixture (default 16)")
    p.add_argument("--alpha", type=float, default=0.01, help="p-value below which the verdict is 'derived'")
    _options.add_seed(p)
    _options.add_target_ledger(p, "--suspect")
    p.add_argument("--out", default=None, metavar="FILE", help="JSON file to write (default: print only)")
    p.set_defaults(func=run)


def run(args) -> int:
    from speechmimic.proof import dataset_inference

    upstream = load_upstream(args.suspect, ledger=args.ledger)
    private = read_manifest(args.private)
    result = dataset_inference(
        upstream,
        [c.load() for c in private],
        [c.load() for c in read_manifest(args.public)],
        layers=args.layers.split(",") if args.layers else None,
        groups=[c.path for c in private],  # segments of one recording stay on one side
        components=args.components,
        dims=args.dims,
        seed=args.seed,
        alpha=args.alpha,
    )
    _options.print_json({"suspect": args.suspect, **result}, args.out)
    return 0
