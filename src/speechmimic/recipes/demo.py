"""``demo``: the corpus shipped in the package, and the demo's probe tasks on its held-out clips.

The corpus (``speechmimic/data/demo_corpus``, made by ``scripts/make_demo_corpus.py`` with espeak-ng
and flite) is 24 synthetic speakers saying 10 keywords and a few sentences, 552 clips; its ``split``
label parts the thief's pool from the held-out clips, which are never queried. ``build(out)`` writes
the three tasks (keywords, speaker ID, speaker verification) that the demo probes; it takes no
dataset folder.
"""

from __future__ import annotations

import os
import random
from importlib import resources
from pathlib import Path

from speechmimic.corpus import Clip, read_manifest
from speechmimic.tasks import SPLITS, Task, write_task

OPTIONS: dict[str, str] = {}


def demo_corpus() -> tuple[list[Clip], list[Clip]]:
    """The shipped corpus as (pool, held-out) clips."""
    manifest = Path(str(resources.files("speechmimic") / "data" / "demo_corpus" / "manifest.jsonl"))
    clips = read_manifest(manifest)
    pool = [c for c in clips if c.labels.get("split") == "pool"]
    heldout = [c for c in clips if c.labels.get("split") == "heldout"]
    return pool, heldout


def demo_tasks(heldout: list[Clip], out_dir: Path, seed: int = 0) -> list[Task]:
    """Keyword spotting (10 words; speakers disjoint across splits), speaker ID (24 speakers; each
    speaker's clips split by word) and speaker verification (every pair of the test speakers' clips
    a trial; the dev speakers choose the layer, the train speakers are the background) from held-out
    clips."""
    rng = random.Random(seed)
    speakers = sorted({c.labels["speaker"] for c in heldout})
    rng.shuffle(speakers)
    n = len(speakers)
    part = {s: ("test" if i < n // 6 else "dev" if i < n // 3 else "train") for i, s in enumerate(speakers)}
    keywords = [c for c in heldout if c.labels["kind"] == "keyword"]
    ks = {s: [c for c in keywords if part[c.labels["speaker"]] == s] for s in SPLITS}
    sid: dict[str, list[Clip]] = {s: [] for s in SPLITS}
    for speaker in sorted(part):
        own = [c for c in heldout if c.labels["speaker"] == speaker]
        words = sorted({c.labels["keyword"] for c in own if c.labels["kind"] == "keyword"})
        rng.shuffle(words)
        dev, test = set(words[:2]), set(words[2:4])
        for c in own:
            word = c.labels.get("keyword")
            sid["dev" if word in dev else "test" if word in test else "train"].append(c)
    by_speaker = {s: [c for c in heldout if part[c.labels["speaker"]] == s] for s in SPLITS}
    return [
        write_task(
            out_dir / "keywords",
            "keywords",
            "classify",
            "keyword",
            ks,
            "10 keywords; train/dev/test speakers disjoint; held-out clips only",
        ),
        write_task(
            out_dir / "speakers",
            "speakers",
            "classify",
            "speaker",
            sid,
            "24 synthetic speakers; sentences + 6 keywords train, 2 dev, 2 test; held-out clips only",
        ),
        write_task(
            out_dir / "verification",
            "verification",
            "verify",
            "speaker",
            by_speaker,
            "speaker verification: every pair of the test speakers' clips; train/dev/test speakers "
            "disjoint; held-out clips only",
        ),
    ]


def build(out: str | os.PathLike, seed: int = 0, progress: bool = True) -> list[Task]:
    """The demo's three probe tasks, from the shipped corpus's held-out clips, under ``out``."""
    return demo_tasks(demo_corpus()[1], Path(out), seed=seed)
