"""``speechmimic recipe``: build labelled task folders (train/dev/test manifests) from a dataset."""

from __future__ import annotations

import argparse
from collections import Counter

from speechmimic.cli import _options
from speechmimic.errors import InputError
from speechmimic.recipes import RECIPES
from speechmimic.tasks import SPLITS, Task

_MAX_LISTED_CLASSES = 40
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _options_help() -> str:
    lines = ["recipe options (-o KEY=VALUE):"]
    for recipe in RECIPES.values():
        lines.append(f"  {recipe.name}:")
        lines += [f"    {key}: {text}" for key, text in recipe.options.items()] or ["    (none)"]
    return "\n".join(lines)


def register(sub) -> None:
    recipes = "\n".join(f"  {r.name:<16} {r.summary}" for r in RECIPES.values())
    p = sub.add_parser(
        "recipe",
        help="build labelled task folders (train/dev/test manifests) from a standard dataset layout",
        description="Write one task folder (task.json + train/dev/test.jsonl) per task of a dataset "
        f"under --out.\n\nrecipes:\n{recipes}",
        epilog=_options_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", metavar="NAME", choices=sorted(RECIPES), help="the recipe (listed above)")
    p.add_argument(
        "root",
        metavar="ROOT",
        nargs="?",
        help="the dataset folder (not taken by "
        + ", ".join(r.name for r in RECIPES.values() if not r.takes_root)
        + ", which generates its data)",
    )
    p.add_argument("--out", required=True, help="folder to write the task folders in")
    _options.add_seed(p)
    p.add_argument(
        "-o",
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a recipe option (repeatable); the options of each recipe are listed below",
    )
    _options.add_progress(p)
    p.set_defaults(func=run)


def _convert(name: str, key: str, value: str, default):
    # The build function's default says what type the option takes; None/tuple defaults stay strings.
    try:
        if isinstance(default, bool):
            if value.lower() not in _TRUE | _FALSE:
                raise InputError("expected true or false")
            return value.lower() in _TRUE
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError as e:
        raise InputError(f"recipe {name}: option {key}={value!r}: {e}") from e
    return value


def parse_options(name: str, items: list[str]) -> dict:
    """``["key=value", ...]`` -> keyword arguments of recipe ``name``'s build, typed by its defaults."""
    params = RECIPES[name].parameters()
    allowed = list(params)
    options = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise InputError(f"option {item!r}: expected KEY=VALUE")
        if key not in allowed:
            raise InputError(f"recipe {name} has no option {key!r}; options: {', '.join(allowed) or 'none'}")
        options[key] = _convert(name, key, value, params[key].default)
    return options


def run(args) -> int:
    recipe = RECIPES[args.name]
    options = parse_options(args.name, args.option)
    if recipe.takes_seed:
        options["seed"] = args.seed
    options["progress"] = not args.no_progress
    if not recipe.takes_root:
        if args.root is not None:
            raise InputError(f"recipe {args.name} generates its data and takes no ROOT (got {args.root})")
        tasks = recipe.build(args.out, **options)
    else:
        if args.root is None:
            raise InputError(f"recipe {args.name} needs the dataset folder ROOT")
        tasks = recipe.build(args.root, args.out, **options)
    print(f"wrote {len(tasks)} task(s) under {args.out}")
    for task in tasks:
        print(describe(task))
    return 0


def describe(task: Task) -> str:
    """Split sizes and per-class (classify), trial (verify) or token-set (phones, chars) counts of a
    written task."""
    splits = {s: task.split(s) for s in SPLITS}
    sizes = ", ".join(f"{s} {len(splits[s])}" for s in SPLITS)
    lines = [f"  {task.name} ({task.kind}, {task.metric}) -> {task.root}: {sizes}"]
    if task.kind == "classify":
        counts = {s: Counter(task.label(c) for c in splits[s]) for s in SPLITS}
        lines.append(f"    {len(task.classes)} classes")
        if len(task.classes) <= _MAX_LISTED_CLASSES:
            lines += [
                f"      {cls:<16} " + " / ".join(str(counts[s][cls]) for s in SPLITS) for cls in task.classes
            ]
        else:
            train = [counts["train"][cls] for cls in task.classes]
            lines.append(f"      train clips per class: min {min(train)}, max {max(train)}")
    elif task.kind == "verify":
        for s in ("dev", "test"):
            trials = task.trials(s)
            same = sum(t for t, _, _ in trials)
            lines.append(f"    {s} trials: {len(trials)} ({same} same-speaker)")
    else:
        tokens = {t for s in SPLITS for c in splits[s] for t in task.tokens(c)}
        lines.append(f"    {len(tokens)} distinct {'phones' if task.kind == 'phones' else 'characters'}")
    return "\n".join(lines)
