"""``speechmimic extract``: (stage 1) -> select -> query -> distill in one go."""

from __future__ import annotations

import json

from speechmimic.cli import _options
from speechmimic.corpus import read_manifest
from speechmimic.extract import extract
from speechmimic.pretrain import PretrainConfig
from speechmimic.select import STRATEGIES, Budget, Scores
from speechmimic.targets import load_target

_P = PretrainConfig()


def register(sub) -> None:
    p = sub.add_parser(
        "extract",
        help="run a budgeted extraction: stage 1, select, query and distill",
        description="Run a query-budgeted extraction in one go: pretrain a student on the manifest "
        "(stage 1, no queries; OUT/stage1), select clips within the budget, query the target through "
        "a ledger, distill the stage-1 student on the answers; with --heldout, also measure "
        "fidelity on clips never queried. --stage1 DIR starts from an existing stage-1 checkpoint "
        "instead, --from-scratch skips stage 1. Rerun to resume.",
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
        help="per-clip uncertainty and embeddings from 'speechmimic score' for informed strategies "
        "(default: the stage-1 student scores the manifest)",
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
    g = p.add_argument_group("stage 1 (when neither --stage1 nor --from-scratch is given)")
    g.add_argument(
        "--stage1-steps",
        type=int,
        default=_P.steps,
        help=f"masked-prediction steps on the manifest (default: {_P.steps})",
    )
    g.add_argument(
        "--stage1-iterations",
        type=int,
        choices=(1, 2),
        default=_P.iterations,
        help=f"1: MFCC units; 2: then units of the first student's own features (default: {_P.iterations})",
    )
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
        stage1=_stage1(args),
        scores=Scores.load(args.scores) if args.scores else None,
        distill_cfg=_options.distill_config(args),
        heldout=read_manifest(args.heldout) if args.heldout else None,
        progress=not args.no_progress,
    )
    print(json.dumps(result, indent=2))
    return 0


def _stage1(args) -> str | PretrainConfig | None:
    if args.from_scratch:
        return None
    if args.stage1:
        return args.stage1
    return PretrainConfig(
        steps=args.stage1_steps,
        iterations=args.stage1_iterations,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        device=args.device,
    )
