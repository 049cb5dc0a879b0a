"""Checks on the shipped synthetic demo corpus (src/speechmimic/data/demo_corpus).

Regenerate it with ``python scripts/make_demo_corpus.py`` (see its README.md).
"""

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

CORPUS = Path(__file__).resolve().parents[1] / "src" / "speechmimic" / "data" / "demo_corpus"
MANIFEST = CORPUS / "manifest.jsonl"
KEYS = {"id", "path", "sampling_rate", "num_samples", "duration", "offset", "labels"}
KEYWORDS = {"yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"}


@pytest.fixture(scope="module")
def rows():
    assert MANIFEST.is_file(), f"missing {MANIFEST}; run scripts/make_demo_corpus.py"
    with open(MANIFEST, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_schema(rows):
    assert rows
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids)
    for r in rows:
        assert set(r) == KEYS, r["id"]
        assert r["sampling_rate"] == 16000
        assert r["offset"] == 0.0
        assert r["path"] == f"audio/{r['id']}.flac"
        assert r["duration"] == pytest.approx(r["num_samples"] / 16000, abs=1e-9)
        lab = r["labels"]
        assert {"speaker", "engine", "kind", "split"} <= lab.keys()
        assert lab["engine"] in ("espeak-ng", "flite")
        assert lab["split"] in ("pool", "heldout")
        if lab["kind"] == "keyword":
            assert lab["keyword"] in KEYWORDS and "text" not in lab
            assert 0.3 <= r["duration"] <= 1.5, r["id"]
        else:
            assert lab["kind"] == "sentence"
            assert isinstance(lab["text"], str) and len(lab["text"].split()) >= 3
            assert "keyword" not in lab
            assert 1.5 <= r["duration"] <= 6.0, r["id"]


def test_files_exist_and_headers_match(rows):
    listed = {r["path"] for r in rows}
    on_disk = {p.relative_to(CORPUS).as_posix() for p in (CORPUS / "audio").iterdir()}
    assert listed == on_disk
    for r in rows:
        info = sf.info(CORPUS / r["path"])
        assert info.format == "FLAC" and info.subtype == "PCM_16", r["id"]
        assert info.samplerate == 16000 and info.channels == 1, r["id"]
        assert info.frames == r["num_samples"], r["id"]


def test_sample_decodes_and_is_not_silent(rows):
    sample = rows[:: max(1, len(rows) // 60)]  # ~60 clips spread over all speakers
    for r in sample:
        x, sr = sf.read(CORPUS / r["path"], dtype="float32")
        assert sr == 16000 and x.ndim == 1 and len(x) == r["num_samples"]
        assert np.isfinite(x).all()
        assert np.abs(x).max() > 0.05, r["id"]


def test_speakers_kinds_splits(rows):
    by_spk = defaultdict(list)
    for r in rows:
        by_spk[r["labels"]["speaker"]].append(r["labels"])
    assert len(by_spk) >= 20
    assert {lab["engine"] for labs in by_spk.values() for lab in labs} == {"espeak-ng", "flite"}
    counts = set()
    for spk, labs in by_spk.items():
        assert len({lab["engine"] for lab in labs}) == 1, spk
        assert {lab["kind"] for lab in labs} == {"keyword", "sentence"}, spk
        assert {lab["split"] for lab in labs} == {"pool", "heldout"}, spk
        assert {lab["keyword"] for lab in labs if lab["kind"] == "keyword"} == KEYWORDS, spk
        counts.add(tuple(sorted(Counter(lab["kind"] for lab in labs).items())))
    assert len(counts) == 1, f"unbalanced per-speaker clip counts: {counts}"


def test_total_duration(rows):
    assert sum(r["duration"] for r in rows) >= 8 * 60


def test_readme_present():
    text = (CORPUS / "README.md").read_text(encoding="utf-8")
    assert "make_demo_corpus.py" in text and "manifest.jsonl" in text
