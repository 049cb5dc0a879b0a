"""The embedding API, through real requests to a real server on loopback: every status code, the
answers against in-process calls, idempotency across a SIGKILL, batching, info, usage and metrics."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import soundfile as sf

from speechmimic import config
from speechmimic.audio import SAMPLE_RATE, load_audio
from speechmimic.serve.config import ServeConfig
from speechmimic.serve.process import ServerProcess as Server
from speechmimic.targets import load_backend, wire

EMBED = "/v1/embed"


@pytest.fixture(scope="module")
def spec(tiny_hf):
    return f"hf:{tiny_hf['hubert']}?layers=all"


@pytest.fixture(scope="module")
def server(tmp_path_factory, spec):
    with Server(tmp_path_factory.mktemp("serve"), spec, "--max-delay-ms", "20") as s:
        yield s


@pytest.fixture(scope="module")
def clip(speech_clips):
    return speech_clips[0][0].load()


def post(url, token=None, body=b"", content_type=wire.RAW, headers=None, **params):
    h = {"Content-Type": content_type, **(headers or {})}
    if token:
        h["Authorization"] = f"Bearer {token}"
    return httpx.post(url + EMBED, content=body, headers=h, params=params, timeout=60)


def problem(r, status, kind):
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/problem+json"
    doc = r.json()
    assert doc["status"] == status and doc["type"] == f"urn:speechmimic:problem:{kind}", doc
    return doc


def test_answers_equal_in_process_calls_in_every_format(server, spec, clip, speech_clips):
    token = server.key("formats")
    local = load_backend(spec)
    expected = local([clip])[0]
    raw = post(server.url, token, wire.encode_raw(clip))
    assert raw.status_code == 200 and raw.headers["content-type"] == wire.SAFETENSORS
    arrays, samples = wire.decode_answer(raw.content, raw.headers["content-type"])
    assert samples == len(clip) and list(arrays) == local.layers
    for name in expected:
        np.testing.assert_array_equal(arrays[name], expected[name])
    assert float(raw.headers["X-Charged-Seconds"]) == pytest.approx(len(clip) / SAMPLE_RATE)

    js = post(server.url, token, wire.encode_raw(clip), format="json")
    assert js.headers["content-type"] == wire.JSON
    for name, arr in wire.decode_answer(js.content, js.headers["content-type"])[0].items():
        np.testing.assert_array_equal(arr, expected[name])

    half = post(server.url, token, wire.encode_raw(clip), dtype="float16")
    assert len(half.content) < 0.6 * len(raw.content)
    for name, arr in wire.decode_answer(half.content, half.headers["content-type"])[0].items():
        np.testing.assert_allclose(arr, expected[name], rtol=1e-3, atol=1e-3)

    # int16 samples, and audio files: the answers are the in-process answers to the same decoded audio
    s16 = np.round(clip * 32767).astype("<i2")
    r = post(server.url, token, s16.tobytes(), encoding="s16le")
    np.testing.assert_allclose(
        wire.decode_answer(r.content, r.headers["content-type"])[0][local.layers[-1]],
        local([s16.astype(np.float32) / 32768])[0][local.layers[-1]], atol=1e-5,
    )  # fmt: skip
    path = speech_clips[0][0].path
    flac = post(server.url, token, open(path, "rb").read(), "audio/flac")
    assert flac.status_code == 200, flac.text
    np.testing.assert_array_equal(
        wire.decode_answer(flac.content, flac.headers["content-type"])[0][local.layers[-1]],
        local([load_audio(path)])[0][local.layers[-1]],
    )
    for fmt, mime in (("WAV", "audio/wav"), ("OGG", "audio/ogg")):
        buf = io.BytesIO()
        sf.write(buf, clip, SAMPLE_RATE, format=fmt)
        assert post(server.url, token, buf.getvalue(), mime).status_code == 200
    # raw samples at another rate are resampled like a file at that rate
    r = post(server.url, token, wire.encode_raw(clip[::2]), sample_rate=8000)
    assert r.status_code == 200 and int(r.headers["X-Audio-Seconds"].split(".")[0]) >= 0
    assert wire.decode_answer(r.content, r.headers["content-type"])[1] == 2 * len(clip[::2])


def test_every_refusal_is_a_problem_document(server, clip, speech_clips):
    url = server.url
    ok = wire.encode_raw(clip)
    problem(post(url, None, ok), 401, "missing-key")
    problem(post(url, "smk_not-a-key", ok), 401, "unknown-key")
    r = httpx.post(url + EMBED, content=ok, headers={"X-API-Key": "smk_wrong", "Content-Type": wire.RAW})
    problem(r, 401, "unknown-key")

    revoked = server.key("revoked")
    assert post(url, revoked, ok).status_code == 200
    out = subprocess.run(
        [sys.executable, "-m", "speechmimic", "keys", "revoke", "revoked", "--db", str(server.db)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "revoked 'revoked'" in out.stdout
    assert "was revoked" in problem(post(url, revoked, ok), 403, "revoked-key")["detail"]

    small = server.key("small", max_bytes=1000)
    assert "at most 1000" in problem(post(url, small, ok), 413, "payload-too-large")["detail"]
    short = server.key("short", max_seconds=0.5)
    assert "longer than the 0.5 s allowed" in problem(post(url, short, ok), 413, "clip-too-long")["detail"]
    flac = open(speech_clips[0][0].path, "rb").read()
    assert (
        "longer than the 0.5 s allowed"
        in problem(post(url, short, flac, "audio/flac"), 413, "clip-too-long")["detail"]
    )

    token = server.key("refusals")
    problem(post(url, token, b"hello", "text/plain"), 415, "unsupported-media-type")
    problem(post(url, token, b"fLaC" + bytes(200), "audio/flac"), 422, "undecodable-audio")
    problem(post(url, token, wire.encode_raw(np.full(8000, np.nan, np.float32))), 422, "non-finite-audio")
    problem(post(url, token, wire.encode_raw(np.zeros(8000, np.float32))), 422, "silent-audio")
    assert (
        "receptive field"
        in problem(post(url, token, wire.encode_raw(clip[:100])), 422, "clip-too-short")["detail"]
    )
    problem(post(url, token, ok[:-1]), 422, "malformed-samples")
    problem(post(url, token, b""), 422, "empty-audio")
    problem(post(url, token, ok, format="npz"), 422, "invalid-request")
    r = post(url, token, ok, headers={"Idempotency-Key": "clip-1"})
    assert r.status_code == 200
    other = wire.encode_raw(clip[: len(clip) // 2])
    problem(post(url, token, other, headers={"Idempotency-Key": "clip-1"}), 422, "idempotency-key-reused")
    # refusals are free: only the answered requests were charged
    assert server.usage("refusals").requests == 1

    limited = server.key("limited", rate=0.2, burst=1)
    assert post(url, limited, ok).status_code == 200
    r = post(url, limited, ok)
    problem(r, 429, "rate-limited")
    assert 1 <= int(r.headers["Retry-After"]) <= 5

    quota = server.key("quota", quota_requests=2)
    others = [wire.encode_raw(clip * g) for g in (0.9, 0.8, 0.7)]  # three clips, all new to the server
    assert [post(url, quota, b).status_code for b in others[:2]] == [200, 200]
    r = post(url, quota, others[2])
    assert "request quota of 2 spent" in problem(r, 429, "quota-exhausted")["detail"]
    assert "Retry-After" not in r.headers  # waiting will not help
    assert post(url, quota, others[0]).headers["X-Charged-Seconds"] == "0"  # what it has, it may have again
    seconds = server.key("seconds", quota_seconds=1.5 * len(clip) / SAMPLE_RATE)
    assert post(url, seconds, ok).status_code == 200
    problem(post(url, seconds, others[0]), 429, "quota-exhausted")
    assert server.usage("seconds").samples == len(clip)

    problem(httpx.get(url + "/v1/nothing"), 404, "not-found")
    problem(httpx.get(url + EMBED), 405, "method-not-allowed")


def test_idempotent_answers_survive_sigkill_and_are_charged_once(tmp_path, spec, clip):
    server = Server(tmp_path, spec).start()
    try:
        token = server.key("thief")
        first = post(server.url, token, wire.encode_raw(clip), headers={"Idempotency-Key": "k" * 64})
        assert first.status_code == 200 and "Idempotent-Replayed" not in first.headers
        server.kill()  # SIGKILL: nothing flushed on the way out
        server.start()
        again = post(
            server.url, token, wire.encode_raw(clip), headers={"Idempotency-Key": "k" * 64}, format="json"
        )
        assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
        assert again.headers["X-Charged-Seconds"] == "0"
        a = wire.decode_answer(first.content, first.headers["content-type"])[0]
        b = wire.decode_answer(again.content, again.headers["content-type"])[0]
        assert list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)
        used = server.usage("thief")
        assert (used.requests, used.samples) == (1, len(clip))
        usage = httpx.get(server.url + "/v1/usage", headers={"Authorization": f"Bearer {token}"}).json()
        assert usage["requests"] == 1 and usage["samples"] == len(clip)
    finally:
        server.kill()


def test_concurrent_requests_share_batches_and_answer_each_clip_exactly(server, spec, speech_clips):
    token = server.key("batched")
    wavs = [c.load() for c in speech_clips[0][:16]]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda w: post(server.url, token, wire.encode_raw(w)), wavs))
    local = load_backend(spec)
    for wav, r in zip(wavs, answers, strict=True):
        assert r.status_code == 200
        got = wire.decode_answer(r.content, r.headers["content-type"])[0]
        np.testing.assert_array_equal(got[local.layers[-1]], local([wav])[0][local.layers[-1]])
    metrics = server.metrics()
    batches = _metric(metrics, "speechmimic_batch_clips_count")
    clips = _metric(metrics, "speechmimic_batch_clips_sum")
    assert clips > batches  # some calls of the model answered several requests at once
    assert _metric(metrics, 'speechmimic_key_requests_total{key="batched"}') == 16
    assert 'speechmimic_requests_total{endpoint="/v1/embed",status="200"}' in metrics
    assert "speechmimic_request_latency_seconds_bucket" in metrics


def test_info_describes_the_target_and_hides_what_it_is_told_to(tmp_path, server, spec):
    info = httpx.get(server.url + "/v1/info").json()
    local = load_backend(spec)
    assert info["layers"] == local.layers and info["frame_rate"] == 50.0
    assert info["widths"] == {name: 32 for name in local.layers} and info["min_samples"] == local.min_samples
    schema = httpx.get(server.url + "/openapi.json").json()
    embed = schema["paths"][EMBED]["post"]
    assert set(embed["responses"]) >= {"200", "400", "401", "403", "413", "415", "422", "429", "503"}
    assert set(embed["requestBody"]["content"]) == {wire.RAW, "audio/wav", "audio/flac", "audio/ogg"}
    with Server(tmp_path, spec, "--hide-info", "layers,widths,frame_rate") as hidden:
        info = httpx.get(hidden.url + "/v1/info").json()
        assert "layers" not in info and "widths" not in info and "frame_rate" not in info
        assert info["min_samples"] == local.min_samples


def test_settings_come_from_file_then_environment_then_flags(tmp_path, monkeypatch):
    from speechmimic.cli import build_parser
    from speechmimic.cli.serve import resolve

    path = tmp_path / "serve.json"
    path.write_text(json.dumps({"target": "resemblyzer", "port": 9001, "max_queue": 10, "max_delay_ms": 1.0}))
    monkeypatch.setenv("SPEECHMIMIC_SERVE_PORT", "9002")
    monkeypatch.setenv("SPEECHMIMIC_SERVE_MAX_QUEUE", "20")
    args = build_parser().parse_args(["serve", "--config", str(path), "--max-queue", "30"])
    cfg = resolve(args)
    assert (cfg.target, cfg.port, cfg.max_queue, cfg.max_delay_ms) == ("resemblyzer", 9002, 30, 1.0)
    monkeypatch.setenv("SPEECHMIMIC_SERVE_PORT", "eighty")
    with pytest.raises(ValueError, match="SPEECHMIMIC_SERVE_PORT='eighty': expected int"):
        resolve(args)
    with pytest.raises(ValueError, match="unknown field"):
        config.from_dict(ServeConfig, {"target": "x", "hide_info": "weights"}).check()


def test_keys_command_shows_a_key_once_and_lists_usage_without_it(tmp_path):
    db = str(tmp_path / "k.sqlite")
    run = [sys.executable, "-m", "speechmimic", "keys"]
    out = subprocess.run([*run, "create", "alice", "--db", db, "--quota-seconds", "60", "--rate", "2"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    token = out.splitlines()[0]
    assert token.startswith("smk_") and "quota_seconds=60, rate=2" in out
    listed = subprocess.run([*run, "list", "--db", db], capture_output=True, text=True, check=True).stdout
    assert (
        "alice" in listed
        and token not in listed
        and token not in (tmp_path / "k.sqlite").read_bytes().decode(errors="replace")
    )
    again = subprocess.run([*run, "create", "alice", "--db", db], capture_output=True, text=True)
    assert again.returncode == 2 and "a key named 'alice' exists already" in again.stderr


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no metric {name}")


def test_a_long_queue_is_turned_away_with_retry_after_and_duplicates_wait_for_the_first(
    tmp_path, spec, speech_clips
):
    with Server(tmp_path, spec, "--max-queue", "1", "--max-delay-ms", "1000") as s:
        token = s.key("crowd")
        wavs = [wire.encode_raw(c.load()) for c in speech_clips[0][:12]]
        t = time.monotonic()
        with ThreadPoolExecutor(12) as pool:
            codes = [r.status_code for r in pool.map(lambda w: post(s.url, token, w), wavs)]
        assert set(codes) <= {200, 429} and 429 in codes and 200 in codes, codes
        assert time.monotonic() - t < 60
        # 10 requests with one Idempotency-Key at once: the model runs once, the key pays once, and
        # the others get the first one's answer, byte for byte
        before = _metric(s.metrics(), "speechmimic_batch_clips_sum")
        other = wire.encode_raw(speech_clips[0][13].load())
        with ThreadPoolExecutor(10) as pool:
            answers = list(pool.map(lambda _: post(s.url, token, other, headers={"Idempotency-Key": "once"}),
                                    range(10)))  # fmt: skip
        assert [r.status_code for r in answers] == [200] * 10
        assert _metric(s.metrics(), "speechmimic_batch_clips_sum") == before + 1
        assert sum(r.headers["X-Charged-Seconds"] != "0" for r in answers) == 1
        assert len({r.content for r in answers}) == 1
        assert s.usage("crowd").requests == codes.count(200) + 1


def test_the_batcher_caps_batches_by_audio_seconds_and_answers_each_clip_as_alone(spec, speech_clips):
    import asyncio

    from speechmimic.serve.batcher import Batcher
    from speechmimic.serve.metrics import Metrics

    local = load_backend(spec)
    calls: list[float] = []

    def recording(wavs, keys=None):
        calls.append(sum(len(w) for w in wavs) / SAMPLE_RATE)
        return local(wavs)

    for name in ("spec", "frame_rate", "layers", "padding", "min_samples"):
        setattr(recording, name, getattr(local, name))
    wavs = [c.load()[: int(0.8 * SAMPLE_RATE)] for c in speech_clips[0][:10]]

    async def run():
        batcher = Batcher(recording, Metrics(), max_batch_seconds=2.0, max_delay=0.2, max_queue=100)
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.embed(w) for w in wavs))
        finally:
            await batcher.stop()

    answers = asyncio.run(run())
    assert max(calls) <= 2.0 and len(calls) < len(wavs)  # batched, never beyond the cap
    assert sum(round(c / 0.8) for c in calls) == len(wavs)
    for wav, answer in zip(wavs, answers, strict=True):
        np.testing.assert_array_equal(answer[local.layers[-1]], local([wav])[0][local.layers[-1]])
