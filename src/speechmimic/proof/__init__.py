"""Proof of theft: evidence that a copy found in the wild came from the owner's encoder.

- :mod:`~speechmimic.proof.watermark`: mark an encoder so that copies stolen from it carry the
  mark, and verify a suspect (statistic, p-value, verdict);
- :mod:`~speechmimic.proof.inference`: dataset inference, which needs no change to the model;
- :func:`~speechmimic.proof.examine.examine`: both on one suspect.
"""

from speechmimic.proof.examine import examine
from speechmimic.proof.inference import dataset_inference
from speechmimic.proof.watermark import Secret, WatermarkConfig, mark, verify

__all__ = ["Secret", "WatermarkConfig", "dataset_inference", "examine", "mark", "verify"]
