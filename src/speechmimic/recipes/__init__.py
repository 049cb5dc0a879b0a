"""Dataset recipes: manifest builders that write labelled task folders (:mod:`speechmimic.tasks`).

Each recipe's ``build(root, out, **options) -> list[Task]`` writes one folder per task under
``out``; its module ``OPTIONS`` documents the options:

``speech_commands``  Speech Commands v0.01: ``ks12`` (SUPERB 12 classes) or ``words``
``voxceleb1``        VoxCeleb1 ``iden_split.txt``: ``sid``
``librispeech``      ``asr`` (characters), ``pr`` (phones: lexicon or espeak-ng), or ``sid``
``iemocap``          4-class emotion, leave-one-session-out: ``er_fold1`` .. ``er_fold5``
``fluent``           Fluent Speech Commands intent: ``ic``
``fsdd``             Free Spoken Digit Dataset: ``digits`` (and ``fsdd_sid``)
``shared``           the subsets in ``../shared/data``: ``digits``, ``fsdd_sid``, ``words``, ``sid``
``espeak``           synthetic phone-labelled speech from espeak-ng: ``pr_espeak``; takes no
                     root (``build(out, **options)``), see :data:`ROOTLESS`
"""

from __future__ import annotations

from speechmimic.recipes import espeak, fluent, fsdd, iemocap, librispeech, shared, speech_commands, voxceleb1

RECIPES = {
    "speech_commands": speech_commands.build,
    "voxceleb1": voxceleb1.build,
    "librispeech": librispeech.build,
    "iemocap": iemocap.build,
    "fluent": fluent.build,
    "fsdd": fsdd.build,
    "shared": shared.build,
    "espeak": espeak.build,
}
MODULES = {
    "speech_commands": speech_commands,
    "voxceleb1": voxceleb1,
    "librispeech": librispeech,
    "iemocap": iemocap,
    "fluent": fluent,
    "fsdd": fsdd,
    "shared": shared,
    "espeak": espeak,
}
# Recipes that generate their data instead of reading a dataset folder.
ROOTLESS = frozenset({"espeak"})
