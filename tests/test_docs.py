"""The documentation says what the code does: every command in the README and docs/ parses with the
real command line, every benchmark flag exists, every Python example imports what it names, every
link leads somewhere, and the README stays a front door."""

from __future__ import annotations

import argparse
import ast
import importlib
import re
import shlex
from pathlib import Path

import pytest

from speechmimic.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
README_MAX_LINES = 300


def blocks(page: Path, languages: tuple[str, ...]) -> list[str]:
    """The fenced code blocks of ``page`` in these languages."""
    pattern = r"^```(\w*)\n(.*?)^```"
    return [m[2] for m in re.finditer(pattern, page.read_text(), re.M | re.S) if m[1] in languages]


def commands(page: Path) -> list[list[str]]:
    """Each command line of the page's bash blocks (continuations joined, comments and prompts off),
    split as the shell would; lines that are not commands of ours are kept too (the callers choose)."""
    out = []
    for block in blocks(page, ("bash", "")):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = line.strip().removeprefix("$ ")
            if not line or line.startswith("#"):
                continue
            words = shlex.split(line, comments=True)
            if words:
                out.append(words)
    return out


def speechmimic_args(words: list[str]) -> list[str] | None:
    """The arguments of a ``speechmimic`` command (also ``python -m speechmimic`` and ``torchrun ... -m
    speechmimic``), or None for another program."""
    if words[0] == "speechmimic":
        return words[1:]
    if "-m" in words and words.index("-m") + 1 < len(words) and words[words.index("-m") + 1] == "speechmimic":
        return words[words.index("-m") + 2 :]
    return None


def subparser(parser: argparse.ArgumentParser, args: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The (sub)command's own parser, and the arguments after its name."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or not args or args[0] not in subs[0].choices:
            return parser, args
        parser, args = subs[0].choices[args[0]], args[1:]


def doc_commands():
    for page in PAGES:
        for words in commands(page):
            args = speechmimic_args(words)
            if args is not None:
                yield pytest.param(args, id=f"{page.relative_to(ROOT)}: {' '.join(args)[:60]}")


@pytest.mark.parametrize("args", list(doc_commands()))
def test_every_documented_command_parses(args):
    parser = build_parser()
    if "..." in args:  # the rest of the line is elided: check the command and each flag it names
        args = args[: args.index("...")]
        sub, rest = subparser(parser, args)
        assert sub is not parser, f"no such command: {args}"
        known = {s for a in sub._actions for s in a.option_strings}
        flags = [w.split("=")[0] for w in rest if w.startswith("--")]
        assert set(flags) <= known, f"unknown flags {sorted(set(flags) - known)} of {args}"
        return
    try:
        parser.parse_args(args)
    except SystemExit as e:  # argparse's way of refusing (its message went to stderr)
        raise AssertionError(f"speechmimic {' '.join(args)} does not parse") from e


def test_the_documented_commands_are_many_and_of_every_kind():
    parser = build_parser()
    named = {" ".join(subparser(parser, p.values[0])[0].prog.split()[1:]) for p in doc_commands()}
    assert {"demo", "corpus scan", "select", "query", "distill", "fidelity", "extract", "serve", "audit",
            "watermark mark", "watermark verify", "ledger verify", "export", "compress"} <= named  # fmt: skip


def test_every_benchmark_command_names_a_script_and_its_flags():
    wanted: dict[str, set[str]] = {}
    for page in PAGES:
        for words in commands(page):
            if words[0] in ("python", "python3") and len(words) > 1 and words[1].startswith("benchmarks/"):
                flags = {w.split("=")[0] for w in words[2:] if w.startswith("--")}
                wanted.setdefault(words[1], set()).update(flags)
        for m in re.finditer(r"`python (benchmarks/\w+\.py)([^`]*)`", page.read_text()):
            flags = {w.split("=")[0] for w in m[2].split() if w.startswith("--")}
            wanted.setdefault(m[1], set()).update(flags)
    assert len(wanted) >= 8, sorted(wanted)
    for script, flags in sorted(wanted.items()):
        assert (ROOT / script).is_file(), f"{script} is documented but does not exist"
        source = (ROOT / script).read_text()  # its argparse flags, read rather than run (each imports torch)
        missing = {f for f in flags if f'"{f}"' not in source}
        assert not missing, f"{script} has no {sorted(missing)}"


def test_every_python_example_compiles_and_imports_what_it_names():
    checked = 0
    for page in PAGES:
        for code in blocks(page, ("python",)):
            tree = ast.parse(code, str(page))
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("speechmimic"):
                    module = importlib.import_module(node.module)
                    for alias in node.names:
                        assert hasattr(module, alias.name) or importlib.util.find_spec(
                            f"{node.module}.{alias.name}"
                        ), f"{page.name}: {node.module} has no {alias.name}"
                        checked += 1
    assert checked >= 10


def anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped but '-' and '_', spaces to '-'."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_every_link_leads_somewhere():
    broken = []
    for page in PAGES:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # a URL: not checked offline
            path, _, fragment = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif fragment and dest.suffix == ".md":
                ids = {anchor(h) for h in re.findall(r"^#+ (.*)$", dest.read_text(), re.M)}
                if fragment not in ids:
                    broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    for page in PAGES[1:]:
        assert f"]({page.relative_to(ROOT)})" in readme, f"README.md does not link {page.relative_to(ROOT)}"
