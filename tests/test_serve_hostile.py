"""The API against hostile clients, on loopback: connections that send nothing or dribble, headers
of any size, garbage after a request. Every load here is bounded in count and time and stops by
itself."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from speechmimic.serve.app import create_app
from speechmimic.serve.config import ServeConfig
from speechmimic.serve.keys import KeyStore
from speechmimic.serve.process import ServerProcess
from speechmimic.targets import load_backend, wire
from speechmimic.testing import HostileClients

TIMEOUT = 2.0  # the server's header and body deadlines in these tests


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_hf):
    flags = ["--max-connections", "40", "--header-timeout", str(TIMEOUT), "--body-timeout", str(TIMEOUT)]
    with ServerProcess(tmp_path_factory.mktemp("hostile"), f"hf:{tiny_hf['hubert']}?layers=all", *flags) as s:
        yield s


@pytest.fixture(scope="module")
def clip(speech_clips):
    return speech_clips[0][0].load()[:16000]


def embed(server, token, clip, timeout=20.0):
    headers = {"Authorization": f"Bearer {token}", "Content-Type": wire.RAW}
    with httpx.Client(timeout=timeout) as client:  # a fresh connection per request
        return client.post(server.url + "/v1/embed", content=wire.encode_raw(clip), headers=headers)


def test_an_honest_client_gets_through_three_times_as_many_stalled_connections(server, clip):
    token = server.key("honest")
    port = server.port
    attack = HostileClients("127.0.0.1", port, n=120, interval=0.5, seconds=12).start()
    time.sleep(2)  # the stalled connections fill the server's 40 places
    latencies, statuses = [], []
    end = time.monotonic() + 6
    while time.monotonic() < end:
        t0 = time.monotonic()
        statuses.append(embed(server, token, clip).status_code)
        latencies.append(time.monotonic() - t0)
    stats = attack.stop()
    assert statuses and set(statuses) == {200}, statuses
    assert sorted(latencies)[len(latencies) // 2] < 1.0, latencies
    # the server closed the stalled connections itself (evicted, or at their deadline), never later
    assert stats["closed_by_server"] >= 120, stats
    assert stats["max_lifetime"] <= TIMEOUT + 1.5, stats
    metrics = server.metrics()
    assert 'speechmimic_connections_closed_total{reason="evicted"}' in metrics


def test_a_huge_header_is_refused_at_once_and_stalls_no_one(server):
    result = {}
    huge = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (64 << 20) + b"\r\n\r\n"  # 64 MB

    def send_huge() -> None:
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            try:
                s.sendall(huge)
                result["answer"] = s.recv(1024)
            except OSError:  # the server closed the connection while the header was still coming
                result["answer"] = b"reset"
        result["seconds"] = time.monotonic() - t0

    sender = threading.Thread(target=send_huge)
    health = []
    with httpx.Client(timeout=5) as client:
        client.get(server.url + "/healthz")  # connected before, so only the server's answer is timed
        sender.start()
        while len(health) < 5 or sender.is_alive() and len(health) < 200:
            t0 = time.monotonic()
            assert client.get(server.url + "/healthz").status_code == 200
            health.append(time.monotonic() - t0)
    sender.join(timeout=10)
    assert result["seconds"] < 1.0, result
    assert result["answer"] in (b"reset", b"") or result["answer"].startswith(b"HTTP/1.1 431"), result
    assert max(health) < 0.1, health


def test_garbage_after_a_request_does_not_lose_its_answer(server, clip):
    token = server.key("pipeliner")
    body = wire.encode_raw(clip)
    request = (
        f"POST /v1/embed HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: {wire.RAW}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as s:
        s.sendall(request + b"NOT HTTP AT ALL\r\n\r\n")
        received = b""
        while chunk := s.recv(65536):  # the answer, then the server closes the connection
            received += chunk
    head, _, content = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    arrays, samples = wire.decode_answer(content, wire.SAFETENSORS)
    assert samples == len(clip) and all(np.isfinite(a).all() for a in arrays.values())
    assert server.usage("pipeliner").requests == 1  # charged once, and delivered


def test_conflicting_credentials_are_refused_and_cost_nothing(server, clip):
    alice, bob = server.key("alice"), server.key("bob")
    body, raw = wire.encode_raw(clip), {"Content-Type": wire.RAW}
    url = server.url + "/v1/embed"
    for headers in (
        [("Authorization", f"Bearer {alice}"), ("X-API-Key", bob)],  # two keys
        [("Authorization", f"Bearer {alice}"), ("Authorization", f"Bearer {bob}")],  # two headers
        [("X-API-Key", alice), ("X-API-Key", alice)],
    ):
        r = httpx.post(url, content=body, headers=[*raw.items(), *headers])
        assert r.status_code == 400 and r.json()["type"] == "urn:speechmimic:problem:conflicting-credentials"
    same = httpx.post(
        url, content=body, headers={**raw, "Authorization": f"Bearer {alice}", "X-API-Key": alice}
    )
    assert same.status_code == 200
    assert (server.usage("alice").requests, server.usage("bob").requests) == (1, 0)


def test_metrics_docs_and_errors_expose_nothing_to_anonymous_callers(server, tmp_path, tiny_hf):
    assert httpx.get(server.url + "/metrics").status_code == 401
    wrong = httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer guess"})
    assert wrong.status_code == 401 and "alice" not in wrong.text
    assert "speechmimic_requests_total" in server.metrics()  # with the token
    # an upload that does not decode: the reason, never where the server put it
    token = server.key("uploader")
    r = httpx.post(server.url + "/v1/embed", content=b"RIFF" + bytes(100),
                   headers={"Authorization": f"Bearer {token}", "Content-Type": "audio/wav"})  # fmt: skip
    assert r.status_code == 422 and "/tmp" not in r.text and "speechmimic-upload" not in r.text, r.text
    # without a metrics token there are no metrics; --no-docs leaves no schema to read
    spec = f"hf:{tiny_hf['hubert']}?layers=all"
    cfg = ServeConfig(target=spec, db=str(tmp_path / "k.sqlite"), docs=False)
    app = create_app(load_backend(spec), KeyStore(cfg.db), cfg)
    with TestClient(app) as client:  # in-process: no socket
        assert client.get("/metrics").status_code == 404
        for path in ("/docs", "/openapi.json", "/redoc"):
            assert client.get(path).status_code == 404
        assert client.get("/healthz").status_code == 200
