"""The production path as users run it: ``deploy/nginx.conf`` (Debian's nginx) in front of ``speechmimic
serve``, on loopback: a request through it, a slow client and an oversized header turned away by the
proxy, the metrics kept off its public side. Skipped where nginx is absent."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from speechmimic.serve.process import ServerProcess
from speechmimic.targets import wire
from speechmimic.testing import NginxProxy

CONF = Path(__file__).resolve().parents[1] / "deploy" / "nginx.conf"
pytestmark = pytest.mark.skipif(
    shutil.which("nginx") is None, reason="nginx is not installed (apt-get install nginx; .ci/run does)"
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_hf):
    root = tmp_path_factory.mktemp("deploy")
    with ServerProcess(root / "server", f"hf:{tiny_hf['hubert']}?layers=all") as server:
        settings = {"client_header_timeout": "2s", "client_body_timeout": "2s"}
        with NginxProxy(CONF, root / "nginx", server.port, settings) as proxy:
            yield server, proxy


def test_a_request_through_the_proxy_is_the_servers_answer(stack, speech_clips):
    server, proxy = stack
    token = server.key("proxied")
    wav = speech_clips[0][0].load()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": wire.RAW}
    via = httpx.post(proxy.url + "/v1/embed", content=wire.encode_raw(wav), headers=headers, timeout=60)
    assert via.status_code == 200
    direct = httpx.post(server.url + "/v1/embed", content=wire.encode_raw(wav), headers=headers, timeout=60)
    assert direct.headers["X-Charged-Seconds"] == "0"  # the same clip: the proxied answer was stored
    a, b = (wire.decode_answer(r.content, wire.SAFETENSORS)[0] for r in (via, direct))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert server.usage("proxied").requests == 1


def test_the_proxy_turns_away_slow_clients_and_huge_headers_and_hides_the_metrics(stack):
    server, proxy = stack
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(b"POST /v1/embed HTTP/1.1\r\nHost: x\r\n")  # and then nothing more
        try:
            assert s.recv(1024) == b""  # closed by the proxy
        except ConnectionResetError:  # (reset_timedout_connection: closed with a reset)
            pass
    assert time.monotonic() - t0 < 2 + 1.5
    huge = httpx.get(proxy.url + "/healthz", headers={"X-Big": "a" * 65536}, timeout=10)
    assert huge.status_code in (400, 494)
    assert (
        httpx.get(
            proxy.url + "/metrics", headers={"Authorization": f"Bearer {server.metrics_token}"}
        ).status_code
        == 404
    )
    assert httpx.get(proxy.url + "/healthz").status_code == 200
