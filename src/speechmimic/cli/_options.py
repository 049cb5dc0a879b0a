"""Options shared by several subcommands, and flags generated from the typed configs.

Every setting of a config dataclass becomes a flag (``--field-name``, or the flag its metadata
names) whose help is the field's help plus its default. Flags that are not given leave no value
behind, so :func:`config_from_args` layers them over a base config (the defaults, or a ``--config``
file): defaults < file < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import typing

from speechmimic import budget, config
from speechmimic.student import CHUNK_CONTEXT_SECONDS, CHUNK_SECONDS, PRESET_HELP, PRESETS

# Flags whose value may begin with '-' and a digit yet not be a number argparse recognises ("-5%").
_SIGNED_VALUE_FLAGS = ("--budget", "--budgets")


def add_target(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--target",
        required=required,
        metavar="SPEC",
        help="the encoder behind the API: "
        "'hf:<local dir or hub id>[?layers=-1|4,8,12|all&padding=per_clip|bucket]' "
        "(a transformers HuBERT/WavLM/wav2vec2/data2vec-audio) or 'resemblyzer[?layers=1,2,3|all]' "
        "(the pretrained GE2E speaker encoder; layers are its LSTM layers)",
    )


def budget_text(text: str) -> str:
    """The argparse type of a budget: what no pool could make sensible is refused at once, saying why."""
    try:
        budget.check(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def attach_signed_values(argv: list[str]) -> list[str]:
    """``--budget -5%`` as ``--budget=-5%``: argparse takes a value like ``-5%`` for an unknown flag
    and says the budget is missing; attached, it reaches the budget's check, which says what is wrong."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in _SIGNED_VALUE_FLAGS and re.match(r"-\.?\d", arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def add_budget(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--budget",
        required=required,
        default=None,
        type=budget_text,
        metavar="B",
        help="what may be queried: N clips, Ns/Nm/Nh of audio (e.g. 600s, 10m), "
        "or N%% of the manifest's seconds, at most 100%%; a budget above the pool buys all of it",
    )


def add_seed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")


def add_device(p) -> None:
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")


def add_store(p) -> None:
    p.add_argument(
        "--store",
        choices=("float16", "float32"),
        default=None,
        help="how a new ledger stores answers (default float16: half the disk, a rounding far below "
        "a student's error; values beyond float16's range stay float32); an existing ledger keeps its own",
    )


def add_target_ledger(p, what: str) -> None:
    p.add_argument(
        "--ledger",
        default=None,
        metavar="DIR",
        help=f"ledger that records a target's answers, needed when {what} is a target (a rerun pays "
        "nothing again)",
    )


def chunk_seconds(text: str) -> float | None:
    """The argparse type of --chunk-seconds: seconds, or 'none' for whole clips."""
    if text.strip().lower() == "none":
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 2 * CHUNK_CONTEXT_SECONDS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give seconds above {2 * CHUNK_CONTEXT_SECONDS:g} (each window keeps "
            f"{CHUNK_CONTEXT_SECONDS:g} s either side as context only), or 'none'"
        )
    return seconds


def add_chunk_seconds(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--chunk-seconds",
        type=chunk_seconds,
        default=CHUNK_SECONDS,
        metavar="S",
        help=f"a student encodes clips longer than S seconds in overlapping windows of S s, so memory "
        f"stays bounded on hour-long recordings; frames match whole-clip encoding closely, not "
        f"exactly (see docs/targets.md); 'none' encodes every clip whole (default: {CHUNK_SECONDS:g})",
    )


def add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_preset(p) -> None:
    p.add_argument(
        "--preset", choices=tuple(PRESETS), default="small", help=PRESET_HELP + " (default: small)"
    )


def add_stage1(p) -> None:
    p.add_argument(
        "--stage1",
        dest="init",
        default=None,
        metavar="DIR",
        help="stage-1 checkpoint (from 'speechmimic pretrain'): the student starts from it (its "
        "architecture replaces --preset, its trunk weights are loaded, heads are new)",
    )


def add_from_scratch(p) -> None:
    p.add_argument(
        "--from-scratch", action="store_true", help="no stage 1: start the student from random weights"
    )


def add_resume(p) -> None:
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="start training afresh even if the output folder holds an interrupted run",
    )


def add_config_file(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE.json",
        help=f"{what} settings from a JSON file (as --print-config writes it, or a result.json); "
        "flags given beside it win",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved settings as JSON and exit")


# -- flags generated from config dataclasses -----------------------------------------------------------


_METAVARS = {int: "N", float: "X"}


def _dest(prefix: str, name: str) -> str:
    return (prefix + name).replace("-", "_")


def comma_list(text: str) -> list[str]:
    """The argparse type of a list setting: comma-separated values."""
    return [v.strip() for v in text.split(",") if v.strip()]


def _flags(cls, only=None, skip=()):
    for f in dataclasses.fields(cls):
        typ, _ = config.field_type(cls, f.name)
        if dataclasses.is_dataclass(typ) or f.name in skip or (only is not None and f.name not in only):
            continue
        yield f, typ


def add_config_flags(group, cls, prefix: str = "", only=None, skip=()) -> None:
    """A flag per scalar or list field of ``cls`` (``--<prefix><field-name>``; a list as comma-separated
    values); nested configs get their own call with a prefix."""
    for f, typ in _flags(cls, only, skip):
        meta = f.metadata
        default = config.default_of(f)
        shown = "none" if default is None else default
        kwargs = {"dest": _dest(prefix, f.name), "default": argparse.SUPPRESS}
        if typing.get_origin(typ) is list:
            kwargs.update(type=comma_list, metavar=meta.get("metavar") or "A,B")
            shown = ",".join(default or []) or "none"
        elif typ is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif meta.get("choices"):
            kwargs.update(type=typ, choices=meta["choices"])
        else:
            kwargs.update(type=typ, metavar=meta.get("metavar") or _METAVARS.get(typ, f.name.upper()))
        text = meta.get("help", "").replace("%", "%%")
        if default is not dataclasses.MISSING and "default" not in text:
            text += f" (default: {shown})".replace("%", "%%")
        flag = meta.get("flag") if not prefix else None
        group.add_argument(flag or "--" + (prefix + f.name).replace("_", "-"), help=text, **kwargs)


def given(args: argparse.Namespace, cls, prefix: str = "", only=None, skip=()) -> dict:
    """The settings of ``cls`` given as flags on this command line."""
    return {
        f.name: getattr(args, _dest(prefix, f.name))
        for f, _ in _flags(cls, only, skip)
        if hasattr(args, _dest(prefix, f.name))
    }


def value(args: argparse.Namespace, cls, name: str, prefix: str = ""):
    """The flag's value if given, else the field's default."""
    dest = _dest(prefix, name)
    if hasattr(args, dest):
        return getattr(args, dest)
    return config.default_of(next(f for f in dataclasses.fields(cls) if f.name == name))


def file_settings(args: argparse.Namespace) -> dict:
    """The settings of ``--config FILE`` (empty without one)."""
    return config.read(args.config) if args.config else {}


def print_config(cfg) -> int:
    json.dump(config.to_dict(cfg), sys.stdout, indent=2)
    print()
    return 0


def print_json(result: dict, out: str | None) -> None:
    """Print ``result`` as JSON, and write it to ``out`` when given (a command's ``--out FILE``)."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)
