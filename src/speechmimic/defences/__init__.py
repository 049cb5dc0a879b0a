"""Defences that wrap any target: output perturbation, secret per-key transforms, B4B coverage noise,
a PRADA-style detector, quotas and the answer watermark, named in the target spec after ``|`` (see
:mod:`speechmimic.defences.chain`)."""

from speechmimic.defences.b4b import calibrate
from speechmimic.defences.base import Defence, Query, Refused, digest
from speechmimic.defences.chain import DEFENCES, Chain, Defended, load_target, parse_chain, parse_defences
from speechmimic.defences.state import StateStore

__all__ = [
    "DEFENCES", "Chain", "Defence", "Defended", "Query", "Refused", "StateStore",
    "calibrate", "digest", "load_target", "parse_chain", "parse_defences",
]  # fmt: skip
