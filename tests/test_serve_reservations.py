"""The embed pipeline's reservations, without HTTP: a key's concurrent requests never pass its quota
together, a reservation is given back exactly once, a duplicate waits for the first, and bodies in
flight stay within their budgets."""

from __future__ import annotations

import asyncio

import pytest

from speechmimic.audio import SAMPLE_RATE
from speechmimic.serve import embed as pipeline
from speechmimic.serve.batcher import Batcher
from speechmimic.serve.config import ServeConfig
from speechmimic.serve.keys import IMPLICIT, KeyStore, QuotaExceeded
from speechmimic.serve.limits import RateLimiter
from speechmimic.serve.metrics import Metrics
from speechmimic.serve.problems import Problem
from speechmimic.serve.reservations import Reservations
from speechmimic.targets import load_backend


@pytest.fixture
def store(tmp_path):
    s = KeyStore(tmp_path / "keys.sqlite")
    yield s
    s.close()


def test_reservations_count_toward_the_quota_and_are_given_back_once(store):
    key, _ = store.create("k", quota_requests=2, quota_seconds=3)
    res = Reservations()
    a = res.reserve(key, SAMPLE_RATE)
    b = res.reserve(key, SAMPLE_RATE)
    assert res.held(key.id) == (2, 2 * SAMPLE_RATE)
    with pytest.raises(QuotaExceeded, match="request quota of 2"):
        res.reserve(key, SAMPLE_RATE)  # the key's store shows no use yet: only the holds refuse it
    a.release()
    a.release()  # given back once, however often it is called
    assert res.held(key.id) == (1, SAMPLE_RATE)
    with res.reserve(key, SAMPLE_RATE):  # the request freed by `a`
        with pytest.raises(QuotaExceeded, match="request quota"):
            res.reserve(key, 1)
    b.release()
    assert res.held(key.id) == (0, 0)
    with pytest.raises(QuotaExceeded, match="audio quota of 3 s"):
        res.reserve(key, 3 * SAMPLE_RATE + 1)
    other, _ = store.create("other", quota_requests=1)
    with res.reserve(other, 10):
        assert res.held(key.id) == (0, 0)  # keys reserve apart


def test_a_claim_makes_duplicates_wait_and_bytes_in_flight_keep_their_budgets():
    async def run():
        res = Reservations()
        assert res.answering(1, "clip") is None
        with res.claim(1, "clip") as claim:
            first = res.answering(1, "clip")
            assert first is claim.done and not first.done()
            assert res.answering(2, "clip") is None  # another key's clip of the same name
        assert first.done() and res.answering(1, "clip") is None
        # bytes in flight: per key, then all keys together
        assert res.take_bytes(1, 60, key_limit=100, total_limit=150) is None
        assert res.take_bytes(1, 50, key_limit=100, total_limit=150) == "key"
        assert res.take_bytes(2, 100, key_limit=100, total_limit=150) == "total"
        assert res.take_bytes(2, 90, key_limit=100, total_limit=150) is None
        assert res.bytes_held == 150
        res.give_bytes(1, 60)
        assert res.take_bytes(2, 10, key_limit=100, total_limit=150) is None and res.bytes_held == 100

    asyncio.run(run())


def test_concurrent_answers_of_one_key_stop_at_its_quota_and_charge_each_once(store, tiny_hf, speech_clips):
    """Five clips of one key with a quota of three, answered side by side by the pipeline's
    ``answer`` step (reservation, batch, charge), no HTTP: three answers, two refusals, three charges,
    nothing left reserved."""
    target = load_backend(f"hf:{tiny_hf['hubert']}?layers=all")
    key, _ = store.create("thief", quota_requests=3)
    wavs = [c.load() for c in speech_clips[0][:5]]

    async def run():
        metrics = Metrics()
        batcher = Batcher(target, metrics, 30.0, 0.05, 64, 1)
        service = pipeline.Service(target, store, ServeConfig(), batcher, RateLimiter(), metrics)
        await batcher.start()
        try:
            names = [f"{IMPLICIT}{i}" for i in range(len(wavs))]
            calls = [pipeline.answer(service, key, w, n, n) for w, n in zip(wavs, names, strict=True)]
            return service, await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await batcher.stop()

    service, results = asyncio.run(run())
    refused = [r for r in results if isinstance(r, Problem)]
    answered = [r for r in results if not isinstance(r, BaseException)]
    assert len(answered) == 3 and len(refused) == 2
    assert all(p.status == 429 and p.kind == "quota-exhausted" for p in refused)
    for arrays, keep, earlier in answered:
        assert list(arrays) == target.layers and keep and earlier is None
    used = store.get(key.id)
    charged = [len(w) for w, r in zip(wavs, results, strict=True) if not isinstance(r, BaseException)]
    assert used.requests == 3 and used.samples == sum(charged)
    assert service.reservations.held(key.id) == (0, 0)
    # Each answer went into the store with its charge, under its name; no refusal did.
    stored = [store.stored(key.id, f"{IMPLICIT}{i}") is not None for i in range(5)]
    assert stored == [not isinstance(r, BaseException) for r in results]
