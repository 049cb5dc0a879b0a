"""The ``speechmimic`` command. Each subcommand lives in its own module with ``register(subparsers)``.

Errors: what speechmimic raises on purpose (:class:`~speechmimic.errors.SpeechmimicError`: a bad
setting, spec, file or dataset, a target that would not answer, a ledger that cannot pay) and a
file or folder that is missing or not readable are the user's to fix: one line, exit status 2.
Anything else is a bug: its traceback, exit status 1. ``--traceback`` (anywhere on the line) shows
the traceback of every error.
"""

from __future__ import annotations

import argparse
import os
import sys

from speechmimic import distributed
from speechmimic.cli import (
    _options,
    audit,
    compress,
    corpus,
    demo,
    distill,
    embed,
    evaluate,
    export,
    extract,
    fidelity,
    inference,
    ledger,
    pretrain,
    probe,
    query,
    recipe,
    score,
    select,
    serve,
    watermark,
)
from speechmimic.errors import SpeechmimicError

COMMANDS = (
    demo,
    corpus,
    recipe,
    pretrain,
    score,
    select,
    query,
    ledger,
    distill,
    compress,
    extract,
    fidelity,
    probe,
    evaluate,
    embed,
    export,
    serve,
    audit,
    watermark,
    inference,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="speechmimic",
        description=(
            "Query-budgeted model extraction of self-supervised speech encoders. The data flows one way: "
            "corpus scan -> select -> query (paid, through the ledger) -> distill -> fidelity -> "
            "probe / evaluate. "
            "'extract' chains select, query and distill; 'demo' runs a whole attack on a real pretrained "
            "encoder with the corpus shipped in the package."
        ),
        epilog="Run 'speechmimic COMMAND --help' for the options of each command.",
    )
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, help="one stage of the attack, or the demo"
    )
    for module in COMMANDS:
        module.register(sub)
    for parser_ in {id(p): p for p in _all_parsers(parser)}.values():  # an alias names a parser twice
        parser_.add_argument(
            "--traceback",
            action="store_true",
            default=argparse.SUPPRESS if parser_ is not parser else False,
            help="on an error, print its traceback, not only its message",
        )
    return parser


def _all_parsers(parser: argparse.ArgumentParser):
    """The parser and every subcommand's, nested ones included."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


# The user's to fix: one line. (A missing or unreadable file, as well as our own errors.)
USER_ERRORS = (SpeechmimicError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_options.attach_signed_values(sys.argv[1:] if argv is None else argv))
    if distributed.init(getattr(args, "device", None) or "cpu") and not distributed.is_main():
        sys.stdout = open(os.devnull, "w")  # under torchrun rank 0 speaks for all; errors still show
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        if args.traceback:
            raise
        print(f"speechmimic {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
