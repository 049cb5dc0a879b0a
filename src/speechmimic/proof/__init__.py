"""Proof of theft: evidence that a copy found in the wild came from the owner's encoder.

- :mod:`~speechmimic.proof.answer_mark`: verify the answer watermark an API serves
  (:mod:`speechmimic.defences.mark`): exclusive to the marked API and its copies, with an exact p-value;
- :mod:`~speechmimic.proof.watermark`: a family fingerprint fine-tuned into an encoder (SSLGuard's
  recipe): copies carry it, and so do copies of the unmarked original;
- :mod:`~speechmimic.proof.inference`: dataset inference, which needs no change to the model;
- :func:`~speechmimic.proof.examine.examine`: the tests on one suspect.
"""

from speechmimic.proof.examine import examine, load_secret, verify_any
from speechmimic.proof.inference import dataset_inference
from speechmimic.proof.watermark import Secret, WatermarkConfig, mark, verify

__all__ = [
    "Secret", "WatermarkConfig", "dataset_inference", "examine", "load_secret", "mark", "verify",
    "verify_any",
]  # fmt: skip
