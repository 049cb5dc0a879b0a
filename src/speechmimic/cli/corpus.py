"""``speechmimic corpus scan``: turn a folder of audio into a validated JSONL manifest."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from speechmimic.corpus import LAYOUTS, scan, write_manifest

MAX_LISTED_SKIPS = 20


def register(subparsers) -> None:
    """Add the ``corpus`` command (with its ``scan`` subcommand) to an argparse subparsers object."""
    corpus = subparsers.add_parser(
        "corpus",
        help="build and inspect audio corpora (manifests of validated clips)",
        description="Build and inspect audio corpora: manifests of validated clips.",
    )
    sub = corpus.add_subparsers(
        dest="corpus_command", metavar="COMMAND", required=True, help="what to do with a corpus"
    )
    p = sub.add_parser(
        "scan",
        help="decode and validate every audio file under DIR and write a JSONL manifest",
        description=(
            "Decode and validate every audio file under DIR and write a JSONL manifest with one clip "
            "per line. Unreadable, unsupported, empty, NaN/Inf, silent or too-short files, folders that "
            "cannot be read, dangling links and links to folders are skipped and reported, never fatal."
        ),
    )
    p.add_argument("dir", metavar="DIR", help="root folder of the corpus to scan (searched recursively)")
    p.add_argument(
        "--out",
        required=True,
        metavar="MANIFEST.jsonl",
        help="manifest to write (atomically); audio paths under its folder are stored relative to it",
    )
    p.add_argument(
        "--layout",
        choices=("auto", *LAYOUTS),
        default="auto",
        help=(
            "dataset layout, which decides clip ids and labels (speaker, word, digit, split, text); "
            "'auto' (default) detects it from file names and falls back to 'plain'"
        ),
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        metavar="N",
        help=(
            "cut clips longer than N seconds into equal consecutive segments of at most N s "
            "(default: keep clips whole)"
        ),
    )
    p.add_argument(
        "--min-samples",
        type=int,
        default=0,
        metavar="N",
        help="skip clips with fewer than N samples at 16 kHz, e.g. the target model's receptive field",
    )
    p.add_argument(
        "--max-file-seconds",
        type=float,
        default=None,
        metavar="N",
        help="skip files longer than N seconds, from their header, before decoding them (default: no limit)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="decode files in N processes (default 1); the manifest is the same, in the same order",
    )
    p.add_argument(
        "--skipped",
        default=None,
        metavar="FILE",
        help="also write every skipped file with its reason to FILE, one 'path<TAB>reason' per line",
    )
    p.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    p.set_defaults(func=run_scan)


def run_scan(args: argparse.Namespace) -> int:
    """Run ``corpus scan``; returns 0 on success, 1 when no usable clip was found, 2 on bad arguments."""
    try:
        result = scan(
            args.dir,
            layout=args.layout,
            max_segment_seconds=args.max_seconds,
            min_samples=args.min_samples,
            progress=not args.no_progress,
            max_file_seconds=args.max_file_seconds,
            workers=args.workers,
        )
    except (NotADirectoryError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.skipped:
        skipped_path = Path(args.skipped)
        skipped_path.parent.mkdir(parents=True, exist_ok=True)
        skipped_path.write_text("".join(f"{p}\t{r}\n" for p, r in result.skipped), encoding="utf-8")
    if not result.clips:
        print(
            f"error: no usable clips under {args.dir} (layout {result.layout}, "
            f"{len(result.skipped)} files skipped); manifest not written",
            file=sys.stderr,
        )
        _print_skipped(result.skipped)
        return 1

    write_manifest(result.clips, args.out)
    print(
        f"Scanned {args.dir} as layout '{result.layout}': {len(result.clips)} clips, "
        f"{result.hours:.2f} h of audio, {len(result.skipped)} skipped; manifest written to {args.out}."
    )
    _print_skipped(result.skipped)
    return 0


def _print_skipped(skipped: list[tuple[str, str]]) -> None:
    for path, reason in skipped[:MAX_LISTED_SKIPS]:
        print(f"  skipped {path}: {reason}")
    if len(skipped) > MAX_LISTED_SKIPS:
        print(f"  ... and {len(skipped) - MAX_LISTED_SKIPS} more")
