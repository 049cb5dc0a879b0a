"""What an audit runs on: the thief's pool, the probes that say what was stolen, and the honest
applications whose traffic prices each defence.

A :class:`Suite` holds the pool (the thief's unlabelled clips), the held-out clips (the owner's
calibration traffic; never queried by the thief), probe sets (:class:`~speechmimic.probe.pooled.ProbeSet`)
on which target, stolen student and MFCC are compared, and benign workloads: each one an honest
application's traffic (its clips, in order) with the task it serves, scored on the answers it gets.

- :func:`demo_suite`: the corpus shipped in the package (keywords and sentences of 24 synthetic
  voices): probes and applications from its held-out clips.
- :func:`shared_suite`: a folder laid out as ``../shared/data`` (FSDD, the LibriSpeech subset,
  Speech Commands): the pool of :mod:`benchmarks.selection`, probes on 30 words, short-crop speaker
  identity and speaker verification; a keyword-spotting app on the Speech Commands words and a
  speaker-verification service on 3-s crops of the LibriSpeech speakers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from speechmimic.corpus import Clip, hold_out_by_source, random_crops, scan
from speechmimic.probe.pooled import ProbeSet
from speechmimic.recipes.demo import demo_corpus

SEGMENT_SECONDS = 4.0
HELDOUT_SHARE = 0.10


@dataclass
class Suite:
    name: str
    pool: list[Clip]
    heldout: list[Clip]
    probes: dict[str, ProbeSet]
    benign: dict[str, ProbeSet]  # application -> its traffic and task


def labelled(
    name: str, clips: list[Clip], label: str, group: str | None = None, task: str = "classify"
) -> ProbeSet:
    groups = [str(c.labels[group]) for c in clips] if group else None
    return ProbeSet(name, clips, [str(c.labels[label]) for c in clips], groups, task)


def demo_suite(seed: int = 0) -> Suite:
    pool, heldout = demo_corpus()
    keywords = [c for c in heldout if c.labels["kind"] == "keyword"]
    probes = {
        "keywords": labelled("keywords", keywords, "keyword", "speaker"),
        "speakers": labelled("speakers", heldout, "speaker"),
        "verification": labelled("verification", heldout, "speaker", task="verify"),
    }
    benign = {
        "keyword app": labelled("keyword app", keywords, "keyword", "speaker"),
        "verification service": labelled("verification service", heldout, "speaker", task="verify"),
    }
    return Suite("demo", pool, heldout, probes, benign)


def _scan(root: Path, **kw) -> list[Clip]:
    return scan(root, progress=False, **kw).clips


def shared_suite(data: str | Path, seed: int = 0) -> Suite:
    data = Path(data)
    needed = ["fsdd/recordings", "librispeech_test_other_subset", "speech_commands_subset"]
    missing = [n for n in needed if not (data / n).is_dir()]
    if missing:
        raise FileNotFoundError(f"{data} is not laid out as ../shared/data: missing {missing}")
    fsdd = _scan(data / "fsdd" / "recordings", layout="fsdd")
    clips = [c for c in fsdd if c.labels["index"] >= 5]
    clips += _scan(data / "librispeech_test_other_subset", max_segment_seconds=SEGMENT_SECONDS)
    pool, heldout = hold_out_by_source(clips, HELDOUT_SHARE, seed)
    words = _scan(data / "speech_commands_subset", layout="speech_commands")
    utterances = _scan(data / "librispeech_test_other_subset", layout="librispeech")
    crops = random_crops(utterances, 0.5, 5, seed)
    trials = random_crops(utterances, 3.0, 2, seed)
    probes = {
        "words": labelled("words", words, "word", "speaker"),
        "speakers": labelled("speakers", crops, "speaker", "utterance"),
        "verification": labelled("verification", trials, "speaker", "utterance", task="verify"),
    }
    benign = {
        "keyword app": labelled("keyword app", words, "word", "speaker"),
        "verification service": labelled("verification service", trials, "speaker", "utterance", "verify"),
    }
    return Suite("shared", pool, heldout, probes, benign)


def load_suite(corpus: str, seed: int = 0) -> Suite:
    """``demo`` or a folder laid out as ``../shared/data``."""
    if corpus == "demo":
        return demo_suite(seed)
    return shared_suite(corpus, seed)
