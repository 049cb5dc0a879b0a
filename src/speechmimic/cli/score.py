"""``speechmimic score``: per-clip uncertainty and embeddings from a stage-1 student, for selection."""

from __future__ import annotations

from speechmimic.cli import _options
from speechmimic.corpus import count_manifest, iter_manifest
from speechmimic.score import score_clips


def register(sub) -> None:
    p = sub.add_parser(
        "score",
        help="score candidate clips with a pretrained (stage-1) student",
        description="Per clip of a manifest: the stage-1 student's mean masked-prediction loss over "
        "seeded masks (uncertainty; higher = less known) and its mean-pooled last-layer features "
        "(embedding). Written as an .npz that informed selection strategies read.",
    )
    p.add_argument("--student", required=True, help="a 'speechmimic pretrain' output, e.g. OUT/iter1")
    p.add_argument("--manifest", required=True, help="JSONL manifest of the candidate clips")
    p.add_argument("--out", required=True, help="scores file to write (.npz)")
    p.add_argument("--n-masks", type=int, default=2, help="seeded masks averaged per clip (default: 2)")
    _options.add_device(p)
    _options.add_seed(p)
    _options.add_progress(p)
    p.set_defaults(func=run)


def run(args) -> int:
    total = count_manifest(args.manifest)
    scores = score_clips(
        args.student,
        iter_manifest(args.manifest),  # read as scored: memory holds a row per clip, not the manifest
        seed=args.seed,
        n_masks=args.n_masks,
        device=args.device,
        progress=not args.no_progress,
        total=total,
    )
    scores.save(args.out)
    print(f"scored {len(scores.ids)} of {total} clips -> {args.out}")
    return 0
