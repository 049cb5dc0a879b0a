"""What the API charges, through real requests on loopback: never without an answer that was either
delivered or is free to fetch again, however the connection breaks; bodies in flight within their
budgets; stored answers within their bound."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from speechmimic.serve.process import ServerProcess
from speechmimic.targets import wire


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_hf):
    # a batch waits 0.5 s for company: time enough to break a connection while its clip is computed
    flags = [
        "--max-delay-ms",
        "500",
        "--max-key-inflight-bytes",
        "1000000",
        "--max-inflight-bytes",
        "1500000",
    ]
    with ServerProcess(tmp_path_factory.mktemp("charges"), f"hf:{tiny_hf['hubert']}?layers=all", *flags) as s:
        yield s


@pytest.fixture(scope="module")
def clips(speech_clips):
    return [c.load()[:16000] for c in speech_clips[0][:8]]


def raw_request(token: str, body: bytes, idem: str | None = None, length: int | None = None) -> bytes:
    head = (
        f"POST /v1/embed HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: {wire.RAW}\r\n"
        f"Content-Length: {len(body) if length is None else length}\r\n"
    )
    if idem:
        head += f"Idempotency-Key: {idem}\r\n"
    return (head + "\r\n").encode() + body


def post(server, token, body, idem=None):
    headers = {"Authorization": f"Bearer {token}", "Content-Type": wire.RAW}
    if idem:
        headers["Idempotency-Key"] = idem
    return httpx.post(server.url + "/v1/embed", content=body, headers=headers, timeout=30)


def broken(server, request: bytes, read: int) -> None:
    """Send ``request`` and close the connection after reading ``read`` bytes of the answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(request)
        got = b""
        while len(got) < read:
            chunk = s.recv(read - len(got))
            if not chunk:
                break
            got += chunk


@pytest.mark.parametrize("idem", [None, "my-clip"], ids=["plain", "idempotent"])
def test_a_charge_is_never_without_an_answer_delivered_or_free_to_fetch(server, clips, idem):
    token = server.key(f"breaker-{idem}")
    body = [wire.encode_raw(c) for c in clips]
    # broken before the body ends: nothing computed, nothing charged
    broken(server, raw_request(token, body[0][:1000], idem, length=len(body[0])), read=0)
    time.sleep(1.0)
    assert server.usage(f"breaker-{idem}").requests == 0
    # broken while the clip is computed, and while the answer is being read: charged, and the same
    # request again gets that answer, free
    for i, read in ((1, 0), (2, 20)):
        tag = f"{idem}-{i}" if idem else None
        broken(server, raw_request(token, body[i], tag), read=read)
        time.sleep(1.5)  # the server answers (and charges) after the client has gone
        assert server.usage(f"breaker-{idem}").requests == i
        again = post(server, token, body[i], tag)
        assert again.status_code == 200 and again.headers["X-Charged-Seconds"] == "0"
        assert again.headers["Idempotent-Replayed"] == "true"
        assert wire.decode_answer(again.content, wire.SAFETENSORS)[1] == len(clips[i])
    assert server.usage(f"breaker-{idem}").requests == 2


def test_bodies_in_flight_stay_within_the_key_and_the_server_budgets(server):
    a, b = server.key("uploader-a"), server.key("uploader-b")
    big = 800_000  # announced, then held back: the server holds a budget for it while it waits
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as first:
        first.sendall(raw_request(a, b"", length=big))
        time.sleep(0.3)
        second = post(server, a, b"\0" * big)  # the key's 1,000,000 bytes would be passed
        assert second.status_code == 429 and second.json()["type"] == "urn:speechmimic:problem:busy"
        assert second.headers["Retry-After"] == "1"
        third = post(server, b, b"\0" * big)  # the server's 1,500,000 would be passed
        assert third.status_code == 503 and third.json()["type"] == "urn:speechmimic:problem:server-busy"
    time.sleep(12)  # the held-back body reaches its deadline: its budget comes back
    assert post(server, a, b"\0" * 1000).status_code == 422  # read (and refused as silent), not 429


def test_stored_answers_stay_within_their_bound(tmp_path, tiny_hf, clips):
    one = None
    flags = ["--max-store-bytes", "100000", "--purge-seconds", "0.5", "--resend-ttl-seconds", "3"]
    with ServerProcess(tmp_path, f"hf:{tiny_hf['hubert']}?layers=all", *flags) as s:
        token = s.key("hoarder")
        for clip in clips:
            r = post(s, token, wire.encode_raw(clip))
            one = one or len(r.content)
        time.sleep(1.5)
        metrics = s.metrics()
        stored = next(
            float(x.split()[-1])
            for x in metrics.splitlines()
            if x.startswith("speechmimic_stored_answer_bytes ")
        )
        assert 0 < stored <= 100_000 and one * len(clips) > 100_000  # the cap held: the oldest went
        first = post(s, token, wire.encode_raw(clips[0]))  # dropped by the cap: charged again
        last = post(s, token, wire.encode_raw(clips[-1]))  # kept: free
        assert first.headers["X-Charged-Seconds"] != "0" and last.headers["X-Charged-Seconds"] == "0"
        assert last.content == r.content  # a replay is the first answer, byte for byte
        time.sleep(4)  # past --resend-ttl-seconds: every answer without an Idempotency-Key is gone
        assert post(s, token, wire.encode_raw(clips[-1])).headers["X-Charged-Seconds"] != "0"
        assert s.usage("hoarder").requests == len(clips) + 2
