"""Target backends. ``load_target(spec)`` turns a spec string into a :class:`Target`.

Specs:
- ``hf:<local dir or hub id>[?layers=...&padding=...]``: any transformers audio encoder with hidden
  states (HuBERT, WavLM, wav2vec 2.0, data2vec-audio).
- ``resemblyzer[?layers=...]``: the pretrained GE2E speaker encoder shipped in the resemblyzer wheel.

``layers`` is a comma list of hidden-state indices (``-1`` is the last; ``all`` returns every one).
"""

from speechmimic.targets.base import Target
from speechmimic.targets.registry import load_target, parse_spec

__all__ = ["Target", "load_target", "parse_spec"]
