"""speechmimic: query-budgeted model extraction of self-supervised speech encoders.

Python API in one place::

    from speechmimic import load_target, Ledger, Budget, extract, load_upstream
"""

from speechmimic.corpus import Clip, read_manifest, scan, write_manifest
from speechmimic.distill import DistillConfig, distill
from speechmimic.extract import extract, heldout_fidelity, query_clips
from speechmimic.ledger import Ledger
from speechmimic.pretrain import PretrainConfig, pretrain
from speechmimic.select import Budget, select
from speechmimic.student import Student, build_student
from speechmimic.targets import Target, load_target
from speechmimic.upstream import load_upstream

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "Clip",
    "DistillConfig",
    "Ledger",
    "PretrainConfig",
    "Student",
    "Target",
    "build_student",
    "distill",
    "extract",
    "heldout_fidelity",
    "load_target",
    "load_upstream",
    "pretrain",
    "query_clips",
    "read_manifest",
    "scan",
    "select",
    "write_manifest",
]
