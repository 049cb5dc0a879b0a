"""Dataset recipes: manifest builders that write labelled task folders (:mod:`speechmimic.tasks`).

Each recipe module's ``build(root, out, **options) -> list[Task]`` writes one folder per task under
``out``, and its ``OPTIONS`` documents the options; :data:`RECIPES` holds one :class:`Recipe` record
per module:

``speech_commands``  Speech Commands v0.01: ``ks12`` (SUPERB 12 classes) or ``words``
``voxceleb1``        VoxCeleb1 ``iden_split.txt``: ``sid``
``librispeech``      ``asr`` (characters), ``pr`` (phones: lexicon or espeak-ng), or ``sid`` and ``asv``
                     (speaker verification)
``iemocap``          4-class emotion, leave-one-session-out: ``er_fold1`` .. ``er_fold5``
``fluent``           Fluent Speech Commands intent: ``ic``
``fsdd``             Free Spoken Digit Dataset: ``digits`` (and ``fsdd_sid``)
``shared``           the subsets in ``../shared/data``: ``digits``, ``fsdd_sid``, ``words``, ``sid``,
                     ``asv``
``espeak``           synthetic phone-labelled speech from espeak-ng: ``pr_espeak``; takes no
                     root (``build(out, **options)``)
``demo``             the corpus shipped in the package: ``keywords``, ``speakers``, ``verification``
                     on its held-out clips (the demo's probes); takes no root
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from speechmimic.recipes import (
    demo,
    espeak,
    fluent,
    fsdd,
    iemocap,
    librispeech,
    shared,
    speech_commands,
    voxceleb1,
)
from speechmimic.tasks import Task

# Arguments every build takes (or may take) that are not recipe options.
FIXED_ARGS = frozenset({"root", "out", "seed", "progress"})


@dataclass(frozen=True)
class Recipe:
    """One recipe: its builder, its documented options, a one-line summary, whether it reads a
    dataset folder (``build(root, out, ...)``) or generates its data (``build(out, ...)``)."""

    name: str
    build: Callable[..., list[Task]]
    options: dict[str, str]
    summary: str
    takes_root: bool = True

    @classmethod
    def of(cls, module: ModuleType, takes_root: bool = True) -> Recipe:
        summary = (module.__doc__ or "").strip().splitlines()[0].replace("``", "")
        return cls(module.__name__.rsplit(".", 1)[-1], module.build, module.OPTIONS, summary, takes_root)

    def parameters(self) -> dict[str, inspect.Parameter]:
        """The build's option parameters (its signature minus the fixed arguments)."""
        params = inspect.signature(self.build).parameters
        return {k: v for k, v in params.items() if k not in FIXED_ARGS}

    @property
    def takes_seed(self) -> bool:
        return "seed" in inspect.signature(self.build).parameters


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe.of(speech_commands),
        Recipe.of(voxceleb1),
        Recipe.of(librispeech),
        Recipe.of(iemocap),
        Recipe.of(fluent),
        Recipe.of(fsdd),
        Recipe.of(shared),
        Recipe.of(espeak, takes_root=False),
        Recipe.of(demo, takes_root=False),
    )
}
