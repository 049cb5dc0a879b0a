"""SUPERB-style probing of a frozen upstream: cached features, a learnable layer mix, light heads."""

from speechmimic.probe.features import FeatureStore, upstream_identity
from speechmimic.probe.featurizer import Featurizer
from speechmimic.probe.heads import CTCHead, UtteranceHead
from speechmimic.probe.train import ProbeConfig, probe

__all__ = [
    "CTCHead",
    "FeatureStore",
    "Featurizer",
    "ProbeConfig",
    "UtteranceHead",
    "probe",
    "upstream_identity",
]
