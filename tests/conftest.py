from __future__ import annotations

import pytest
import torch

from speechmimic.distill import DistillConfig, distill
from speechmimic.ledger import Ledger, query_clips
from speechmimic.recipes.demo import demo_corpus
from speechmimic.targets import load_backend
from speechmimic.testing import tiny_hf_model

TINY_STUDENT_TARGET = "resemblyzer?layers=all"


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


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """Folders of seeded tiny transformers encoders (2 layers, 32-d, 50 Hz): ``{"hubert", "wavlm"}``."""
    root = tmp_path_factory.mktemp("tiny_hf")
    return {kind: tiny_hf_model(root / kind, kind) for kind in ("hubert", "wavlm")}


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory, speech_clips):
    """A tiny student distilled for 10 steps from resemblyzer's three layers on 16 pool clips:
    ``(student folder, its ledger, the clips)``."""
    pool, _ = speech_clips
    root = tmp_path_factory.mktemp("tiny_student")
    clips = pool[:16]
    ledger = Ledger(root / "ledger")
    query_clips(load_backend(TINY_STUDENT_TARGET), clips, ledger, progress=False)
    distill(clips, ledger, root / "student", DistillConfig(steps=10, warmup=2), preset="tiny", progress=False)
    return root / "student", ledger, clips
