"""32 concurrent clients against a real server on loopback, for a bounded time: no 5xx, every distinct
answer charged exactly once (half the requests send a clip never sent before, half one the key was
answered already, which comes back from the store, free), latency percentiles printed. 10 s by
default, 60 s behind the slow marker."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from speechmimic.serve.process import ServerProcess as Server
from speechmimic.targets import wire

CLIENTS = 32


def hammer(server: Server, wavs: list[np.ndarray], tokens: list[str], seconds: float) -> dict:
    stop = time.monotonic() + seconds
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    answered: set[tuple[str, bytes]] = set()  # (key, body) pairs answered
    lock = threading.Lock()

    def client(i: int) -> None:
        rng = random.Random(i)
        token = tokens[i % len(tokens)]
        headers = {"Authorization": f"Bearer {token}", "Content-Type": wire.RAW}
        with httpx.Client(base_url=server.url, timeout=60) as http:
            n = 0
            while time.monotonic() < stop:
                wav = rng.choice(wavs)
                n += 1
                body = wire.encode_raw(wav * (1 + 1e-3 * (i * 10_000 + n)) if rng.random() < 0.5 else wav)
                t = time.perf_counter()
                r = http.post("/v1/embed", content=body, headers=headers)
                with lock:
                    latencies.append(time.perf_counter() - t)
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    if r.status_code == 200:
                        answered.add((token, body))

    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(client, range(CLIENTS)))
    lat = np.array(latencies)
    return {
        "statuses": statuses,
        "requests": len(lat),
        "per_second": len(lat) / seconds,
        "p50_ms": float(np.percentile(lat, 50) * 1000),
        "p99_ms": float(np.percentile(lat, 99) * 1000),
        "distinct": len(answered),
    }


@pytest.mark.parametrize("seconds", [10, pytest.param(60, marks=pytest.mark.slow)])
def test_32_concurrent_clients_get_no_server_error(tmp_path, tiny_hf, speech_clips, seconds):
    wavs = [c.load() for c in speech_clips[0][:16]]
    with Server(tmp_path, f"hf:{tiny_hf['hubert']}?layers=all") as server:
        names = [f"client-{i}" for i in range(4)]
        tokens = [server.key(n) for n in names]
        report = hammer(server, wavs, tokens, seconds)
        print(f"\n{CLIENTS} clients for {seconds} s: {report}")
        assert not [s for s in report["statuses"] if s >= 500]
        assert report["statuses"].get(200, 0) == report["requests"]  # nothing refused: no limits were set
        charged = sum(server.usage(n).requests for n in names)
        assert charged == report["distinct"] < report["requests"]  # the rest were replays, free
