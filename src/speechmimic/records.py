"""Cached JSON records, keyed by what made them.

A long step (one extraction of a grid, one thief of an audit, a proof test) keeps its result as one
JSON file beside its outputs, holding under some of its keys the settings that made it. A rerun reads
the record back only when those keys hold the same values (compared as JSON stores them: tuples come
back as lists), and otherwise runs the step again. Records are written atomically (a temporary file,
then a rename): a crash leaves the old record or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def read(path: str | os.PathLike, made_by: dict) -> dict | None:
    """The record at ``path`` if its ``made_by`` keys hold these values, else None."""
    path = Path(path)
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if {k: record.get(k) for k in made_by} != json.loads(json.dumps(made_by)):
        return None
    return record


def write(path: str | os.PathLike, made_by: dict, record: dict) -> dict:
    """Write ``made_by`` and ``record`` as one record at ``path``; returns it."""
    path = Path(path)
    whole = {**made_by, **record}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(whole, indent=2))
    tmp.replace(path)
    return whole
