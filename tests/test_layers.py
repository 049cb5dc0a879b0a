"""The layering rules, read off the code: the data flows one way through the package.

Every module of ``src/speechmimic`` belongs to one stage of ``FLOW`` (earliest first). A module may
import only from its own stage or an earlier one; no two modules import each other, directly or
around a circle; imports inside functions count as much as those at the top. The packages that
serve or wrap targets (``targets/``, ``serve/`` and the coming ``defences/``) import nothing of
the attack. Some stages that may see each other by their order stay apart all the same (``APART``):
stage 2 imports nothing of stage 1, so the two training stages share only what lives in ``models``
(the student, the loop, masked prediction and its units). A module in no stage fails the test: where
a new module goes is a design decision, so it is made here, in writing.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "speechmimic"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE

# corpus -> stage 1 -> score -> select (budget) -> ledger (query) -> stage 2 -> measurement -> report,
# and the models handed to other tools (interop);
# targets (and defences wrapping them, the server serving them) beside the attack, never inside it.
FLOW = [
    ("foundation", {"config", "records", "errors", "audio", "dsp", "distributed"}),
    ("data", {"corpus", "tasks", "recipes"}),
    ("targets", {"targets"}),
    ("defences", {"defences"}),
    ("serve", {"serve"}),
    # masked (masked prediction) and units (its k-means targets): shared by stage 1 and stage 2
    ("models", {"conv_as_matmul", "student", "baselines", "trainer", "readahead", "masked", "units"}),
    ("stage 1", {"pretrain"}),
    ("score", {"score"}),
    ("budget", {"budget"}),
    ("select", {"select"}),
    ("ledger", {"ledger", "sybil"}),  # sybil: several API keys queried as one target
    ("stage 2", {"distill", "compress"}),
    ("measurement", {"fidelity", "upstream", "probe", "evaluate"}),
    ("proof", {"proof"}),  # watermark and dataset inference: evidence about a suspect upstream
    ("interop", {"s3prl_expert", "export"}),  # our models in other tools: s3prl, ONNX, TorchScript
    ("orchestration", {"extract", "experiment", "report", "demo", "testing", "audit"}),
    ("interface", {"cli", "__init__", "__main__"}),
]
# Stages that may not import each other although FLOW's order would let one: (importer, imported).
APART = [("stage 2", "stage 1")]
# What the target side may never import: the attack.
TARGET_SIDE = {"targets", "defences", "serve"}
ATTACK = {
    "masked", "units", "pretrain", "score", "budget", "select", "ledger", "sybil", "distill", "extract",
    "experiment", "audit",
}  # fmt: skip


def modules(root: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's __init__)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        is_init = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_init else parts)] = (path, is_init)
    return out


def imports(path: Path, name: str, is_init: bool, known: set[str], package: str) -> dict[str, int]:
    """The package's modules that ``name`` imports (anywhere in the file), with a line of each."""
    found: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        while target not in known and "." in target:  # `import a.b.c` of an attribute: its module
            target = target.rsplit(".", 1)[0]
        if target in known and target != name:
            found.setdefault(target, line)

    here = name if is_init else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == package or alias.name.startswith(package + "."):
                    add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if base != package and not base.startswith(package + "."):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in known else base, node.lineno)
    return found


def stage_of(name: str, package: str, flow) -> int | None:
    top = name.split(".")[1] if "." in name else "__init__"
    return next((i for i, (_, members) in enumerate(flow) if top in members), None)


def violations(root: Path, package: str = PACKAGE, flow=FLOW, apart=APART) -> list[str]:
    mods = modules(root, package)
    known = set(mods)
    graph = {name: imports(path, name, is_init, known, package) for name, (path, is_init) in mods.items()}
    problems = []
    for name in sorted(mods):
        stage = stage_of(name, package, flow)
        if stage is None:
            problems.append(f"{name}: in no stage of FLOW (decide where it belongs)")
            continue
        for target, line in sorted(graph[name].items()):
            where = f"{mods[name][0].name}:{line}"
            other = stage_of(target, package, flow)
            if other is not None and other > stage:
                problems.append(
                    f"{name} ({flow[stage][0]}) imports {target} ({flow[other][0]}), a later stage ({where})"
                )
            if other is not None and (flow[stage][0], flow[other][0]) in apart:
                problems.append(
                    f"{name} ({flow[stage][0]}) imports {target} ({flow[other][0]}): these stages stay "
                    f"apart; what both need belongs in an earlier stage ({where})"
                )
            top, target_top = name.split(".")[1:2], target.split(".")[1:2]
            if set(top) & TARGET_SIDE and set(target_top) & ATTACK:
                problems.append(
                    f"{name} imports {target}: the target side knows nothing of the attack ({where})"
                )
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return problems


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle through each strongly connected group of modules (Tarjan), if any."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(_path_through(sorted(group), graph))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _path_through(group: list[str], graph: dict[str, dict[str, int]]) -> list[str]:
    """A closed walk from the group's first module back to it, for the message."""
    start, members = group[0], set(group)
    path, seen = [start], {start}
    while True:
        nxt = next(w for w in sorted(graph[path[-1]]) if w in members and (w == start or w not in seen))
        path.append(nxt)
        if nxt == start:
            return path
        seen.add(nxt)


def test_the_package_keeps_its_layers():
    assert violations(SRC) == []


def test_every_rule_is_enforced(tmp_path):
    """The checker itself, on a small package that breaks each rule once."""
    pkg = tmp_path / "pkg"
    files = {
        "__init__.py": "",
        "audio.py": "",
        "corpus.py": "from pkg import audio\n",
        "pretrain.py": "from pkg.select import Scores\n",  # stage 1 imports the stage after it
        "select.py": "def f():\n    import pkg.extract\n",  # a later stage, inside a function
        "extract.py": "import pkg.corpus\n",  # an earlier stage: allowed
        "distill.py": "from pkg.pretrain import UnitHead\n",  # stage 2 imports stage 1
        "ledger.py": "from pkg.student import x\n",  # into a cycle with student
        "student.py": "def g():\n    from pkg.ledger import y\n",
        "targets/__init__.py": "",
        "targets/hf.py": "from pkg.targets.registry import parse\n",
        # a cycle inside targets/, closed by an import inside a function; a relative import of the attack
        "targets/registry.py": "def load():\n    from pkg.targets import hf\n\n\ndef h():\n"
        "    from ..ledger import L\n",
        "stray.py": "",
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    found = "\n".join(violations(pkg, "pkg"))
    assert "pkg.pretrain (stage 1) imports pkg.select (select), a later stage (pretrain.py:1)" in found
    assert "pkg.select (select) imports pkg.extract (orchestration), a later stage (select.py:2)" in found
    assert "pkg.targets.registry imports pkg.ledger: the target side knows nothing of the attack" in found
    assert "import cycle: pkg.ledger -> pkg.student -> pkg.ledger" in found
    assert "import cycle: pkg.targets.hf -> pkg.targets.registry -> pkg.targets.hf" in found
    assert "pkg.distill (stage 2) imports pkg.pretrain (stage 1): these stages stay apart" in found
    assert "pkg.stray: in no stage of FLOW" in found
    assert "pkg.corpus" not in found and "pkg.extract (orchestration) imports" not in found
