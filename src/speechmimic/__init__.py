"""speechmimic: query-budgeted model extraction of self-supervised speech encoders.

The Python API in one place (each name is imported on first use, so ``import speechmimic`` stays
cheap)::

    from speechmimic import Budget, ExtractConfig, Ledger, load_target, load_upstream, read_manifest
    from speechmimic.extract import extract

The verbs named like their modules (``extract``, ``distill``, ``pretrain``, ``select``) are not
re-exported here: ``speechmimic.extract`` is the module, and ``speechmimic.extract.extract`` its
function.
"""

from __future__ import annotations

import importlib
import os

__version__ = "0.1.0"

# oneDNN (PyTorch's CPU kernels) keeps a compiled kernel for every input shape it meets, up to 1024 of
# them: with clips of every length that is memory growing with the corpus (tens to hundreds of MB;
# benchmarks/memory.py). 64 keeps the shapes a training run repeats; set the variable to choose.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")

# name -> the module that defines it
_EXPORTS = {
    "Budget": "budget",
    "Clip": "corpus",
    "DistillConfig": "distill",
    "ExtractConfig": "extract",
    "Experiment": "experiment",
    "Grid": "experiment",
    "Ledger": "ledger",
    "PretrainConfig": "pretrain",
    "Scores": "score",
    "Student": "student",
    "Target": "targets",
    "build_student": "student",
    "heldout_fidelity": "fidelity",
    "load_target": "defences",
    "load_upstream": "upstream",
    "query_clips": "ledger",
    "read_manifest": "corpus",
    "scan": "corpus",
    "write_manifest": "corpus",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"speechmimic.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'speechmimic' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
