"""The ``speechmimic`` command. Each subcommand lives in its own module with ``register(subparsers)``."""

from __future__ import annotations

import argparse
import os
import sys

from speechmimic import distributed
from speechmimic.audio import AudioError
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
from speechmimic.ledger import LedgerError
from speechmimic.targets.base import TargetError

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_options.attach_signed_values(sys.argv[1:] if argv is None else argv))
    if distributed.init(getattr(args, "device", None) or "cpu") and not distributed.is_main():
        sys.stdout = open(os.devnull, "w")  # under torchrun rank 0 speaks for all; errors still show
    try:
        return int(args.func(args) or 0)
    except (AudioError, LedgerError, TargetError, ValueError, FileNotFoundError, KeyError) as e:
        print(f"speechmimic {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
