"""A local target asked from several processes: the same answers, each clip paid once, errors kept
per clip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from speechmimic.cli import main
from speechmimic.corpus import write_manifest
from speechmimic.ledger import Ledger
from speechmimic.serve.process import ServerProcess as Server
from speechmimic.targets import load_backend
from speechmimic.targets.base import ClipRefused, PartialAnswers
from speechmimic.targets.pool import PooledTarget


def test_query_with_workers_is_query_in_one_process(tmp_path, speech_clips):
    pool, _ = speech_clips
    clips = pool[:10]
    write_manifest(clips, tmp_path / "m.jsonl")
    spec = "resemblyzer?layers=all"
    base = ["query", "--target", spec, "--manifest", str(tmp_path / "m.jsonl"), "--no-progress"]
    assert main([*base, "--ledger", str(tmp_path / "one"), "--store", "float32"]) == 0
    assert main([*base, "--ledger", str(tmp_path / "two"), "--store", "float32", "--workers", "2"]) == 0
    one, two = Ledger(tmp_path / "one"), Ledger(tmp_path / "two")
    assert one.header == two.header and two.header["target"] == load_backend(spec).spec
    for clip in clips:  # per-clip answers: the same bits whichever process computed them
        a, b = one.get_clip(clip.id), two.get_clip(clip.id)
        assert all(np.array_equal(a[k], b[k]) for k in a)
    events = [json.loads(x) for x in (tmp_path / "two" / "index.jsonl").read_text().splitlines()]
    paid = [e["key"] for e in events if e["event"] == "paid"]
    assert len(paid) == len(set(paid)) == len(clips)
    # a rerun pays nothing
    assert main([*base, "--ledger", str(tmp_path / "two"), "--workers", "2"]) == 0
    assert Ledger(tmp_path / "two").spent_clips == len(clips)


def test_an_error_in_one_share_fails_only_its_clips(tmp_path, speech_clips, tiny_hf, monkeypatch):
    pool, _ = speech_clips
    spec = f"hf:{tiny_hf['hubert']}"
    # a real API that refuses clips over 2 s for what they are (413): the clip's failure, not the batch's
    with Server(tmp_path / "server", spec, "--max-clip-seconds", "2") as server:
        monkeypatch.setenv("POOL_KEY", server.key("pool"))
        target = PooledTarget(f"{server.url}?key_env=POOL_KEY", workers=2)
        try:
            short = [c.load() for c in pool if c.duration < 2][:3]
            long = [c.load() for c in pool if c.duration > 2][:1]
            with pytest.raises(PartialAnswers) as caught:
                target(short + long)
            answers, errors = caught.value.answers, caught.value.errors
            assert [a is not None for a in answers] == [True, True, True, False]
            assert list(errors) == [3] and isinstance(errors[3], ClipRefused)
            assert server.usage("pool").requests == 3
        finally:
            target.close()
