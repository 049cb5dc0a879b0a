"""Target backends. ``load_backend(spec)`` turns the spec of one backend into a :class:`Target`
(:func:`speechmimic.load_target`, from :mod:`speechmimic.defences`, loads any spec, defended ones too).

Specs:
- ``hf:<local dir or hub id>[?layers=...&padding=...]``: any transformers audio encoder with hidden
  states (HuBERT, WavLM, wav2vec 2.0, data2vec-audio).
- ``resemblyzer[?layers=...]``: the pretrained GE2E speaker encoder shipped in the resemblyzer wheel.
- ``http://host:port[/prefix][?...]``: an embedding API that speaks our wire format.

``layers`` is a comma list of hidden-state indices (``-1`` is the last; ``all`` returns every one).
"""

from speechmimic.targets.base import Target
from speechmimic.targets.registry import load_backend, parse_spec

__all__ = ["Target", "load_backend", "parse_spec"]
