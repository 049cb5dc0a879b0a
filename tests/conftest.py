from __future__ import annotations

import pytest
import torch

from speechmimic.demo import demo_corpus


@pytest.fixture(autouse=True)
def _two_threads():
    # The machines this runs on have 2 cores; more threads only add contention.
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def speech_clips():
    """Real-speech-like clips that always exist: the corpus shipped in the package (pool, held-out)."""
    pool, heldout = demo_corpus()
    sentences = [c for c in pool if c.labels["kind"] == "sentence"]
    keywords = [c for c in pool if c.labels["kind"] == "keyword"]
    return sentences[:24] + keywords[:24], heldout[:12]
