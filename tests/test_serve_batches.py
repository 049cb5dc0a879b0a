"""Several clips in one request, on loopback: each answered, charged, stored and replayable on its own,
a bad clip refused alone and free, the limits on the whole request; the ``http://`` target sends
batches where the API offers them."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from speechmimic.ledger import Ledger, content_key
from speechmimic.serve.process import ServerProcess
from speechmimic.targets import load_backend, wire
from speechmimic.targets.http import HTTPTarget


@pytest.fixture(scope="module")
def spec(tiny_hf):
    return f"hf:{tiny_hf['hubert']}?layers=all"


@pytest.fixture(scope="module")
def server(tmp_path_factory, spec):
    with ServerProcess(tmp_path_factory.mktemp("batches"), spec, "--max-batch-clips", "6") as s:
        yield s


@pytest.fixture(scope="module")
def wavs(speech_clips):
    return [c.load() for c in speech_clips[0][:6]]


def batch(server, token, body, **params):
    headers = {"Authorization": f"Bearer {token}", "Content-Type": wire.SAFETENSORS}
    return httpx.post(
        server.url + "/v1/embed/batch", content=body, headers=headers, params=params, timeout=60
    )


def test_each_clip_of_a_batch_is_answered_charged_and_replayable_alone(server, spec, wavs):
    token = server.key("batcher")
    clips = [wavs[0], np.zeros(8000, np.float32), wavs[1], wavs[2]]  # the second is silent
    r = batch(server, token, wire.encode_clips(clips, keys=[None, None, "third", None]))
    assert r.status_code == 200
    results = wire.decode_batch_answer(r.content, r.headers["content-type"])
    assert results[1]["status"] == 422 and results[1]["type"].endswith(":silent-audio")
    local = load_backend(spec)
    for i in (0, 2, 3):
        expected = local([clips[i]])[0]
        assert list(results[i]) == local.layers
        for layer in expected:
            np.testing.assert_allclose(results[i][layer], expected[layer], rtol=1e-5, atol=1e-5)
    used = server.usage("batcher")
    assert used.requests == 3 and used.samples == sum(len(clips[i]) for i in (0, 2, 3))  # the bad one is free
    assert float(r.headers["X-Charged-Seconds"]) == pytest.approx(used.samples / 16000, abs=1e-3)
    # each answer is stored on its own: asked alone (the same samples, or the same Idempotency-Key), free
    headers = {"Authorization": f"Bearer {token}", "Content-Type": wire.RAW}
    alone = httpx.post(server.url + "/v1/embed", content=wire.encode_raw(clips[0]), headers=headers)
    keyed = httpx.post(server.url + "/v1/embed", content=wire.encode_raw(clips[2]),
                       headers={**headers, "Idempotency-Key": "third"})  # fmt: skip
    for got in (alone, keyed):
        assert got.status_code == 200 and got.headers["X-Charged-Seconds"] == "0"
    again = batch(server, token, wire.encode_clips(clips, keys=[None, None, "third", None]), format="json")
    assert again.headers["X-Charged-Seconds"] == "0" and len(again.json()["results"]) == 4
    assert server.usage("batcher").requests == 3


def test_the_limits_apply_to_the_whole_batch(server, wavs):
    token = server.key("greedy")
    assert batch(server, token, wire.encode_clips(wavs + wavs[:1])).status_code == 413  # 7 clips > 6
    small = server.key("small", max_bytes=50_000)
    assert batch(server, small, wire.encode_clips(wavs[:2])).status_code == 413  # the body as a whole
    limited = server.key("limited", rate=0.5, burst=2)
    assert batch(server, limited, wire.encode_clips(wavs[:3])).json()["type"].endswith(":too-many-clips")
    assert batch(server, limited, wire.encode_clips(wavs[:2])).status_code == 200  # two tokens, one each
    r = batch(server, limited, wire.encode_clips(wavs[2:4]))
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert batch(server, token, b"not safetensors").json()["type"].endswith(":malformed-batch")
    assert sum(k.requests for k in server.keys() if k.name in ("greedy", "small")) == 0


def test_the_http_target_sends_batches_where_the_api_offers_them(server, spec, wavs, monkeypatch, tmp_path):
    monkeypatch.setenv("BATCH_KEY", server.key("ledger-thief"))
    target = HTTPTarget(server.url, key_env="BATCH_KEY", concurrency=2)
    assert target.max_batch == 6
    before = server.metrics()
    ledger = Ledger(tmp_path / "ledger")
    clips = [(content_key(w), lambda w=w: w) for w in wavs]
    ledger.query(target, clips, batch_size=6, progress=False)
    after = server.metrics()

    def count(text, endpoint):
        line = f'speechmimic_requests_total{{endpoint="{endpoint}",status="200"}}'
        return next((float(x.split()[-1]) for x in text.splitlines() if x.startswith(line)), 0.0)

    assert count(after, "/v1/embed/batch") - count(before, "/v1/embed/batch") == 2  # 6 clips, 2 in flight
    assert count(after, "/v1/embed") == count(before, "/v1/embed")
    local = load_backend(spec)
    for w in wavs:
        expected = local([w])[0]
        got = ledger.get(content_key(w))
        for layer in expected:
            np.testing.assert_allclose(got[layer], expected[layer], rtol=1e-3, atol=1e-3)
    assert server.usage("ledger-thief").samples == sum(len(w) for w in wavs)
    target.close()
